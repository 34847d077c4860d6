"""Capture and restore the global random number generators; leave the user's as they were.

``l1fx.convert`` runs the model's forward (tracing, the example run, ``init="data"``),
which may draw random numbers; none of that may shift what a seeded script draws
afterwards. A training checkpoint saves the same states so a resume draws what an
uninterrupted run would have. One implementation serves both:

* :func:`capture_rng_state` - a dict of every global generator a model's code
  commonly uses: torch's CPU generator, the CUDA generators when CUDA is already
  initialised (it is never initialised just to save them), Python's ``random``
  and numpy's global ``np.random`` state when the program has imported numpy. It
  holds only tensors and plain Python values, so ``torch.save`` it and load it
  back with ``weights_only=True``;
* :func:`restore_rng_state` - put such a dict back (also one loaded from a file);
* :func:`preserved_rng` - capture on entry, restore on exit.
"""
from __future__ import annotations

import contextlib
import random
import sys
from typing import Iterator, Optional

import torch

__all__ = ["capture_rng_state", "restore_rng_state", "preserved_rng"]


def capture_rng_state() -> dict:
    """The global RNG states: ``torch``, ``python``, and ``cuda`` / ``numpy`` where those are in use."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:  # only if the program uses numpy at all; the keys as a tensor for weights_only loading
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return state


def restore_rng_state(state: dict) -> None:
    """Put back a :func:`capture_rng_state` dict (CUDA: as many devices as both the state and this machine have)."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        for device, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), device)
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))


def _tuples(value):
    """``random.setstate`` wants tuples; a loaded state may hold lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@contextlib.contextmanager
def preserved_rng(seed: Optional[int] = None) -> Iterator[None]:
    """Restore all global RNG states on exit; with ``seed``, seed torch's generators inside."""
    saved = capture_rng_state()
    try:
        if seed is not None:
            # not torch.manual_seed: before CUDA is initialised it queues a seed for later,
            # which would reach the user's CUDA generator after we restored everything
            torch.default_generator.manual_seed(seed)
            if "cuda" in saved:
                torch.cuda.manual_seed_all(seed)
        yield
    finally:
        restore_rng_state(saved)
