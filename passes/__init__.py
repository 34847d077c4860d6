"""torch.fx passes of l1fx (installed as ``l1fx.passes``).

``l1fx.convert`` runs :data:`DEFAULT_PIPELINE`, five functions
``ConversionState -> ConversionState``:

    trace -> analyse -> select -> rewrite -> verify

Unless ``init="dense"`` (the default is ``"auto"``) it runs :func:`pipeline_for` ``(config)``,
which adds :func:`init_l1_weights` between rewrite and verify. The trace pass also
checks the graph against the eager model (:mod:`l1fx.passes.trace_check`).

Build your own pipeline by running some of them, replacing one, or adding
your own pass between them, e.g.::

    from l1fx import passes
    from l1fx.convert import ConvertConfig

    def keep_first_layer_dense(state):
        first = min(state.units, key=lambda u: u.order)
        for c in first.members:
            c.selected = False
        return state

    pipeline = (passes.trace, passes.analyse, passes.select, keep_first_layer_dense,
                passes.rewrite, passes.verify)
    state = passes.run_pipeline(model, ConvertConfig(ratio=1.0), pipeline)
    l1_model = state.result

The layer kinds the passes look for come from :mod:`l1fx.layers`; the
selection rules are :func:`choose` (also used for source rewriting); the
fixed vocabularies (``Candidate.status``, ``Unit.kind``, ...) are the str
enums of :mod:`l1fx.passes.status`. See docs/architecture.md.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

from torch import nn

from .analyse import analyse, build_nx_graph, find_candidates, group_units, measure
from .init import INIT_CHOICES, init_l1_weights, template_init
from .rewrite import rewrite, swap_module
from .rng import preserved_rng
from .select import Choice, Layer, Matcher, check_ratio, choose, choose_in_order, nearest_count, select
from .state import Candidate, ConversionState, Summary, TraceReport, Unit
from .status import CandidateKind, Status, Strategy, UnitKind
from .trace import _TRACE_LOCK, L1Tracer, OpaqueFunction, trace, trace_model
from .verify import verify

__all__ = [
    "trace", "analyse", "select", "rewrite", "init_l1_weights", "verify", "DEFAULT_PIPELINE", "pipeline_for",
    "run_pipeline", "template_init", "INIT_CHOICES",
    "ConversionState", "Candidate", "Unit", "TraceReport", "Summary",
    "L1Tracer", "OpaqueFunction", "trace_model", "build_nx_graph", "find_candidates", "group_units",
    "measure", "Matcher", "nearest_count", "swap_module",
    "choose", "choose_in_order", "check_ratio", "Layer", "Choice", "Status", "CandidateKind", "UnitKind", "Strategy",
]

Pass = Callable[[ConversionState], ConversionState]

DEFAULT_PIPELINE: tuple[Pass, ...] = (trace, analyse, select, rewrite, verify)


def pipeline_for(config) -> tuple[Pass, ...]:
    """:data:`DEFAULT_PIPELINE`, plus :func:`init_l1_weights` before verify unless ``config.init == "dense"``."""
    if getattr(config, "init", "dense") == "dense":
        return DEFAULT_PIPELINE
    i = DEFAULT_PIPELINE.index(verify)
    return DEFAULT_PIPELINE[:i] + (init_l1_weights,) + DEFAULT_PIPELINE[i:]


def run_pipeline(model: nn.Module, config, pipeline: Optional[Sequence[Pass]] = None) -> ConversionState:
    """Run ``pipeline`` (default :func:`pipeline_for` ``(config)``) on ``model``, deep-copied unless ``config.inplace``.

    ``config`` is a :class:`~l1fx.convert.ConvertConfig` (validated here) or any object with its
    attributes. The global RNG states (:func:`~l1fx.passes.rng.preserved_rng`) are restored on return.
    """
    if hasattr(config, "validate"):
        config = config.validate()
    if pipeline is None:
        pipeline = pipeline_for(config)
    if getattr(config, "inplace", False):
        working = model
    else:
        try:
            working = copy.deepcopy(model)
        except Exception as e:
            raise TypeError(f"l1fx.convert: cannot copy {type(model).__name__} to leave it untouched "
                            f"({type(e).__name__}: {e}); pass inplace=True to convert it in place") from e
    state = ConversionState(model=working, config=config)
    # The passes run the model (tracing, the example run, init='data'): any pipeline leaves the
    # caller's random number generators as they were. One conversion at a time (the tracing lock,
    # re-entrant): the trace check and init='data' seed the global generators, which another
    # thread's conversion would reseed or restore under them.
    with _TRACE_LOCK, preserved_rng():
        for p in pipeline:
            state = p(state)
    return state
