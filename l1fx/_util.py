"""Small helpers that several l1fx modules need: one implementation each.

* :func:`evaluating` - run a model in eval mode without grad, then give every
  submodule its own train flag back (not ``model.train(old)``, which would
  overwrite submodules the user had set differently);
* :func:`default_file_mode` - the permissions a new file gets (the umask, read without changing it);
* :func:`as_input_tuple` - "a tensor or a tuple/list of forward() arguments" as a tuple.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["evaluating", "as_input_tuple", "default_file_mode"]


@contextlib.contextmanager
def evaluating(model: nn.Module, *, no_grad: bool = True) -> Iterator[nn.Module]:
    """``model.eval()`` (and ``torch.no_grad()``) inside; each submodule's ``training`` restored after.

    Restores on any exit, also when ``eval()`` itself or the body raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
    finally:
        for m, mode in modes:
            m.training = mode


def default_file_mode() -> int:
    """The permissions ``open(path, "w")`` would give a new file (0o666 minus the umask).

    Read from a file created for the purpose, not with ``os.umask``: setting the
    umask, even to put it straight back, applies to every thread of the process.
    (Atomic file writes: :func:`l1fx._atomicfile.atomic_write`, the one implementation.)
    """
    with tempfile.TemporaryDirectory(prefix="l1fx-mode-") as d:
        probe = os.path.join(d, "probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return stat.S_IMODE(os.stat(probe).st_mode)


def as_input_tuple(example_inputs: Any, what: str = "example_inputs", *, tensors_only: bool = False) -> tuple:
    """A tensor becomes ``(tensor,)``, a list a tuple; anything else is a TypeError naming ``what``.

    With ``tensors_only`` every element must be a tensor (exporters), and the
    tuple must not be empty.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"{what} must be a tensor or a tuple/list of positional inputs (the arguments of "
                        f"model.forward), got {type(example_inputs).__name__}")
    inputs = tuple(example_inputs)
    if tensors_only:
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a tensor; pass only tensors "
                                f"(fix other forward arguments with functools.partial or a wrapper module)")
        if not inputs:
            raise TypeError(f"{what} is empty; pass the tensors model.forward takes")
    return inputs
