"""l1fx: turn inner-product 3D CNNs and point networks into l1-norm networks."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: F401,E402
    BackendUnavailable, CheckpointError, ConversionError, ConversionFailed, ConversionTypeError, ExportError,
    KernelBuildError, KernelError, L1fxError, RewriteError, TrainingError, UsageError, VerificationError,
)
from . import functional, kernels, nn, ops, passes, train  # noqa: F401,E402
from .convert import ConvertConfig, convert, summary  # noqa: F401,E402
from .nn import L1Conv1d, L1Conv2d, L1Conv3d, L1Linear  # noqa: F401,E402
from .nn import L1ConvTranspose1d, L1ConvTranspose2d, L1ConvTranspose3d  # noqa: F401,E402
from .nn import LpConv1d, LpConv2d, LpConv3d, LpLinear  # noqa: F401,E402  (ℓp layers, issue 16)
from .train import DLC, MGS, TrainingWrapper  # noqa: F401,E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: F401,E402
from . import metrics  # noqa: F401,E402  (l1fx.metrics.chamfer_distance, the garment task's metrics)
from .ort_runtime import OrtFallbackWarning, OrtOptionsWarning, ort_session  # noqa: F401,E402
from .quantized import Int8L1Config, quantize  # noqa: F401,E402

# Submodules that are also `python -m` entry points are imported lazily:
# importing them here would make runpy warn that the module is already loaded.
_LAZY = {
    "energy_report": "energy",
    "compare": "energy",
    "export_onnx": "onnx_export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'l1fx' has no attribute {name!r}")
