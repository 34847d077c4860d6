"""``nn.ConvTranspose1d/2d/3d``: recognised, left dense (no ℓ1 transposed convolution yet).

Registering them makes analyse list them with the reason, instead of calling
them "not an inner-product layer". Giving them an ℓ1 layer is this file:
set ``l1_module``/``l1_function``/``l1_op``/``onnx`` (and ``functions`` for
``F.conv_transpose*d``) and drop ``unsupported``.
"""
from __future__ import annotations

from torch import nn

from . import LayerSpec, register_layer

REASON = "transposed convolution has no l1 analogue"

CONV_TRANSPOSE = tuple(
    register_layer(LayerSpec(
        name=f"conv_transpose{nd}d",
        module=module,
        source_modules=(f"torch.nn.ConvTranspose{nd}d", f"torch.nn.modules.ConvTranspose{nd}d",
                        f"torch.nn.modules.conv.ConvTranspose{nd}d"),
        unsupported=REASON,
        label_of=lambda m: type(m).__name__,  # LazyConvTranspose2d stays "LazyConvTranspose2d"
    ))
    for nd, module in ((1, nn.ConvTranspose1d), (2, nn.ConvTranspose2d), (3, nn.ConvTranspose3d))
)
