"""l1fx: turn inner-product 3D CNNs and point networks into l1-norm networks."""
from __future__ import annotations

__version__ = "0.1.0"

from . import functional, kernels, nn, ops  # noqa: F401,E402
from .nn import L1Conv1d, L1Conv2d, L1Conv3d, L1Linear  # noqa: F401,E402
