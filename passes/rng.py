"""Leave the user's random number generators as they were.

``l1fx.convert`` runs the model's forward (tracing, the example run, ``init="data"``),
which may draw random numbers; none of that may shift what a seeded script draws
afterwards. :func:`preserved_rng` saves and restores every global generator a
model's code commonly uses: torch's CPU generator, the CUDA generators when CUDA
is already initialised (it is never initialised just to save them), Python's
``random`` and numpy's global ``np.random`` state.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator, Optional

import torch

__all__ = ["preserved_rng"]


def _numpy_random():
    try:
        import numpy
    except ImportError:  # numpy is optional for the user's code
        return None
    return numpy.random


@contextlib.contextmanager
def preserved_rng(seed: Optional[int] = None) -> Iterator[None]:
    """Restore all global RNG states on exit; with ``seed``, seed torch's generators inside."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    np_random = _numpy_random()
    saved = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None, random.getstate(),
             np_random.get_state() if np_random is not None else None)
    try:
        if seed is not None:
            # not torch.manual_seed: before CUDA is initialised it queues a seed for later,
            # which would reach the user's CUDA generator after we restored everything
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed_all(seed)
        yield
    finally:
        cpu, cuda_states, py, np_state = saved
        torch.set_rng_state(cpu)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py)
        if np_state is not None:
            np_random.set_state(np_state)
