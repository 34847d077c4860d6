"""Training checkpoints that survive a crash during the save and resume bit-exactly.

::

    l1fx.save_checkpoint("run/last.pt", model=model, optimizer=opt, wrapper=wrapper, epoch=epoch)
    ...
    extra = l1fx.load_checkpoint("run/last.pt", model=model, optimizer=opt, wrapper=wrapper)
    start_epoch = extra["epoch"] + 1

``save_checkpoint`` writes a temporary file next to ``path``, fsyncs it,
renames it over ``path`` and fsyncs the directory (l1fx/_atomicfile.py): a
process killed at any moment leaves either the previous checkpoint or the new
one, both loadable, never a truncated file. ``torch.save(obj, path)`` writes
``path`` in place, so a kill during it leaves neither.

The file is an ordinary ``torch.save`` file (a dict: the state dicts, the
extra values and the global RNG states), loaded with ``weights_only=True``
unless asked otherwise. See docs/training.md ("Checkpoints and exact resume").
"""
from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ._atomicfile import atomic_write
from .errors import CheckpointError, TrainingError
from .passes.rng import capture_rng_state, restore_rng_state
from .train import TrainingWrapper

__all__ = ["save_checkpoint", "load_checkpoint"]

_FORMAT = "l1fx-checkpoint"
_VERSION = 1
_KINDS = {"model": nn.Module, "optimizer": torch.optim.Optimizer, "wrapper": TrainingWrapper}


def _as_path(path) -> Path:
    try:
        return Path(os.fspath(path))
    except TypeError:
        raise CheckpointError(f"checkpoint path must be a str or os.PathLike (a file object cannot be replaced "
                              f"atomically), got {type(path).__name__}") from None


def _parts(path: Path, **objects) -> dict[str, Any]:
    """The given model/optimizer/wrapper, type-checked."""
    parts = {}
    for name, obj in objects.items():
        if obj is None:
            continue
        if not isinstance(obj, _KINDS[name]):
            raise CheckpointError(f"{path}: {name}= must be a {_KINDS[name].__module__}.{_KINDS[name].__name__}, "
                                  f"got {type(obj).__name__}")
        parts[name] = obj
    return parts


# ------------------------------------------------------------------ save / load

def save_checkpoint(path: Union[str, os.PathLike], *, model: Optional[nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, wrapper: Optional[TrainingWrapper] = None,
                    **extra: Any) -> Path:
    """Save the state of ``model``, ``optimizer`` and ``wrapper`` and the ``extra`` values to ``path``, atomically.

    A process killed during the save leaves the previous file at ``path`` (or
    none) intact; a temporary file left by a kill (SIGKILL, or SIGTERM with its
    default action) is removed by the next save to the same path. The global
    RNG states are saved too (``load_checkpoint(..., rng=True)`` restores
    them). Parent directories are created. Raises :class:`CheckpointError`
    naming the path if the file cannot be written; then nothing at ``path``
    changed.
    """
    path = _as_path(path)
    parts = _parts(path, model=model, optimizer=optimizer, wrapper=wrapper)
    if not parts and not extra:
        raise CheckpointError(f"{path}: nothing to save; pass model=, optimizer=, wrapper= and/or extra values")
    payload = {"format": _FORMAT, "version": _VERSION, "extra": extra, "rng": capture_rng_state()}
    payload.update({name: obj.state_dict() for name, obj in parts.items()})
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except Exception as e:  # noqa: BLE001  (disk full, permissions, an extra value that cannot be pickled...)
        raise CheckpointError(f"{path}: cannot save the checkpoint ({type(e).__name__}: {e}); the file at this "
                              "path, if any, is unchanged") from e
    return path


def load_checkpoint(path: Union[str, os.PathLike], *, model: Optional[nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, wrapper: Optional[TrainingWrapper] = None,
                    rng: bool = False, map_location=None, weights_only: bool = True) -> dict:
    """Load a :func:`save_checkpoint` file into the given objects; returns the extra values.

    Each object given must have been saved. What can be checked first is
    checked before anything is loaded (model keys and shapes, the wrapper's
    schedule), and a copy of each object's state is kept while loading, so
    any failure (a mismatch, the optimizer's groups, a ``set_extra_state``
    that refuses the state) raises :class:`CheckpointError` naming the path
    and leaves the objects (and the RNG states) as they were; the copy needs
    memory for one more model and optimizer state while loading. ``rng=True``
    also restores the global RNG states saved with the file (torch, CUDA,
    Python ``random``, NumPy), which a bit-exact resume of a loop that draws
    random numbers (dropout, shuffling, augmentation) needs. ``map_location``
    is ``torch.load``'s; ``weights_only=False`` allows extra values that are
    arbitrary Python objects (only for files you trust: it runs pickle).
    """
    path = _as_path(path)
    parts = _parts(path, model=model, optimizer=optimizer, wrapper=wrapper)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file" if not path.exists() else
                              f"{path}: not a file")
    payload = _read(path, map_location, weights_only)
    missing = [name for name in parts if name not in payload]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint has no {' or '.join(missing)} state (it was saved without "
                              f"{', '.join(n + '=' for n in missing)}); load without that argument")

    # Checks first, so a mismatch changes nothing.
    if model is not None:
        _check_model_state(path, model, payload["model"])
    if wrapper is not None:
        try:
            wrapper._check_state_dict(payload["wrapper"])
        except TrainingError as e:
            raise CheckpointError(f"{path}: {e}") from None
    # Then load, model first (its load can still fail: set_extra_state, a load_state_dict hook); on any
    # failure every object given is put back as it was, so the promise above holds.
    saved = {name: _snapshot(obj) for name, obj in parts.items()}
    touched: dict[str, Any] = {}  # what a failure has to put back: the parts loaded so far and the failing one
    loading = "model"
    try:
        for loading in ("model", "optimizer", "wrapper"):  # the optimizer validates its groups first
            if loading in parts:
                touched[loading] = parts[loading]
                parts[loading].load_state_dict(payload[loading])
        if rng:
            loading = "RNG states"
            saved["rng"] = capture_rng_state()
            restore_rng_state(payload["rng"])
    except Exception as e:  # noqa: BLE001 - any failure: put everything back, one error naming the file
        undone = _put_back(touched, saved)
        raise CheckpointError(f"{path}: the {loading} state cannot be loaded ({type(e).__name__}: {e}); "
                              f"{undone}") from e
    return dict(payload["extra"])


def _snapshot(obj) -> Any:
    """A copy of ``obj``'s state that later loads cannot change (state dicts hold the live tensors)."""
    return copy.deepcopy(obj.state_dict())


def _put_back(parts: dict, saved: dict) -> str:
    """Reload each saved state; says whether everything is as it was."""
    failed = []
    for name, obj in parts.items():
        try:
            obj.load_state_dict(saved[name])
        except Exception:  # noqa: BLE001 - reported in the message
            failed.append(name)
    if "rng" in saved:
        restore_rng_state(saved["rng"])
    if failed:
        return f"the {' and '.join(failed)} could not be restored and may be partly loaded"
    return "nothing was changed"


def _read(path: Path, map_location, weights_only: bool) -> dict:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only and "weights_only" in str(e):
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{path}: holds Python objects that weights_only loading refuses ({first}); "
                                  "pass weights_only=False if you trust the file") from None
        raise CheckpointError(f"{path}: cannot be read (UnpicklingError: {e}); it is not a complete torch "
                              "checkpoint") from None
    except Exception as e:  # noqa: BLE001  (truncated zip, not a torch file, I/O error...)
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); it is not a complete torch "
                              "checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not an l1fx checkpoint (not written by l1fx.save_checkpoint); read it "
                              "with torch.load")
    if payload.get("version") != _VERSION:
        raise CheckpointError(f"{path}: l1fx checkpoint version {payload.get('version')!r}; this l1fx reads "
                              f"version {_VERSION}")
    return payload


def _check_model_state(path: Path, model: nn.Module, state: dict) -> None:
    """The checks ``load_state_dict(strict=True)`` makes, done before it copies anything.

    (``load_state_dict`` copies every tensor it can and raises at the end, leaving a half-loaded model.)
    """
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''}")
    for k, mine in own.items():
        theirs = state.get(k)
        if isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) \
                and not isinstance(mine, nn.parameter.UninitializedParameter) and mine.shape != theirs.shape:
            problems.append(f"{k}: shape {tuple(theirs.shape)} in the checkpoint, {tuple(mine.shape)} in the model")
    if problems:
        raise CheckpointError(f"{path}: the model state does not fit this model ({'; '.join(problems[:6])}); "
                              "nothing was loaded")
