"""Verify pass: the rewritten module is well formed and, with example inputs, shaped like the original."""
from __future__ import annotations

import torch.fx as fx

from .analyse import _shapes, run_example
from .state import ConversionFailed, ConversionState
from .status import Status
from .trace import first_line

__all__ = ["verify"]


def verify(state: ConversionState) -> ConversionState:
    """Pass 5: ``graph.lint()``, recompile, and compare output shapes on ``example_inputs``."""
    result = state.result if state.result is not None else state.root
    if isinstance(result, fx.GraphModule):
        result.graph.lint()
        result.recompile()
    inputs = getattr(state.config, "example_inputs", None)
    if inputs is not None and state.original_outputs is not None:
        try:
            got = _shapes(run_example(result, inputs))  # seeded, RNG states restored
        except Exception as e:
            raise ConversionFailed(
                f"l1fx.convert: the converted {type(state.model).__name__} fails on example_inputs "
                f"({first_line(e)}). Converted layers: "
                f"{', '.join(c.name for c in state.candidates if c.status == Status.CONVERTED) or 'none'}"
            ) from e
        if got != state.original_outputs:
            raise ConversionFailed(
                f"l1fx.convert: output shapes changed from {state.original_outputs} to {got} for "
                f"{type(state.model).__name__}; please report this with the model"
            )
    return state
