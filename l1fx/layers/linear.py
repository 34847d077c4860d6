"""Layer kind ``linear``: ``nn.Linear`` / ``F.linear`` -> ``l1fx.nn.L1Linear`` / ``l1fx.functional.l1_linear``."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from . import LayerSpec, OnnxSchema, register_layer

LINEAR = register_layer(LayerSpec(
    name="linear",
    module=nn.Linear,
    functions=(F.linear,),
    source_modules=("torch.nn.Linear", "torch.nn.modules.Linear", "torch.nn.modules.linear.Linear"),
    source_functions=("torch.nn.functional.linear",),
    l1_module="l1fx.nn.L1Linear",
    l1_function="l1fx.functional.l1_linear",
    l1_aliases=("l1fx.L1Linear",),
    l1_op="l1fx::linear",
    onnx=OnnxSchema("L1Linear"),
    channel_dim=-1,
    features_attr="out_features",
    # A linear layer only mixes features: always pointwise (a shared MLP over points).
    pointwise_module=lambda m: True,
    pointwise_call=lambda args, kwargs, weight: True,
))
