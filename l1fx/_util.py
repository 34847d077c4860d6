"""Small helpers that several l1fx modules need: one implementation each.

* :func:`evaluating` - run a model in eval mode without grad, then give every
  submodule its own train flag back (not ``model.train(old)``, which would
  overwrite submodules the user had set differently);
* :func:`as_input_tuple` - "a tensor or a tuple/list of forward() arguments" as a tuple.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["evaluating", "as_input_tuple"]


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
