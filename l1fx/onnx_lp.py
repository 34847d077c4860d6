"""The ℓp ops of the ``l1fx`` ONNX domain: ``LpLinear``, ``LpConv`` (attribute ``p``) and ``LpDistance``.

* ``l1fx.LpLinear(X[..., K], W[M, K], B[M]; p) -> Y[..., M]``, ``Y = -||X - W[m]||_p + B[m]``;
* ``l1fx.LpConv(X, W, B; strides, pads, dilations, group, p)``: ``L1Conv`` with the ℓp distance.

``p`` is a float attribute (``inf`` for the max norm). The model-local function
bodies are those of ``L1Linear``/``L1Conv`` (:mod:`l1fx.onnx_ops`) with the
distance helper swapped for ``LpDistance(X, W, P)``, which computes, per row
block (the same ``Scan`` blocking), the scaled norm of the kernels:
``a = |x - w|``, ``m = max a``, ``r = m * (sum (a / m)^p)^(1/p)``, with ``r = m``
where ``m`` is 0 or inf and NaN where any ``a`` is NaN. ``Pow(t, inf)`` is 1 for
``t = 1`` and 0 for ``t < 1``, so the same body gives ``r = m`` for ``p = inf``.
Plain onnxruntime inlines and runs them (no custom kernel is needed).
"""
from __future__ import annotations

from typing import Optional

import onnx
from onnx import helper

from . import onnx_ops

LP_LINEAR, LP_CONV, LP_DISTANCE = "LpLinear", "LpConv", "LpDistance"
OPS = (LP_LINEAR, LP_CONV)  # the layer ops (their bodies are attached to models that use them)
DOMAIN, VERSION = onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION
_CONV_ATTRS = ("strides", "pads", "dilations", "group")


def _schemas() -> list[onnx.defs.OpSchema]:
    P = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.Attribute
    F = onnx.defs.OpSchema.AttrType.FLOAT
    conv = onnx.defs.get_schema("Conv").attributes
    floats = ("T", onnx_ops._FLOAT_TYPES, "float tensors")
    xwb = [P("X", "T", "input"), P("W", "T", "weight"), P("B", "T", "bias [M]")]
    return [
        onnx.defs.OpSchema(LP_LINEAR, DOMAIN, VERSION, "Y[..., m] = -||X[..., :] - W[m, :]||_p + B[m] (ℓp layer).",
                           inputs=xwb, outputs=[P("Y", "T", "output [..., M]")], type_constraints=[floats],
                           attributes=[A("p", F, "the norm: a number >= 1, or inf")]),
        onnx.defs.OpSchema(LP_CONV, DOMAIN, VERSION, "Negative ℓp distance between every zero-padded patch of X "
                           "and every filter of its group, plus B; attributes as ONNX Conv, and p.",
                           inputs=xwb, outputs=[P("Y", "T", "output [N, M, *out]")], type_constraints=[floats],
                           attributes=[A(a, conv[a].type, a) for a in _CONV_ATTRS]
                           + [A("p", F, "the norm: a number >= 1, or inf")]),
        onnx.defs.OpSchema(LP_DISTANCE, DOMAIN, VERSION, "Y[r, g, m] = -||X[r, g, :] - W[g, m, :]||_p "
                           "(grouped ℓp distance, scaled by the max, computed in row blocks).",
                           inputs=[P("X", "T", "rows [R, G, Kg]"), P("W", "T", "filters [G, Mg, Kg]"),
                                   P("P", "T", "p, a scalar")],
                           outputs=[P("Y", "T", "[R, G, Mg]")], type_constraints=[floats]),
    ]




def _lp_block(x: str, w: str, y: str, prefix: str) -> list[onnx.NodeProto]:
    """``y[r, g, m] = -||x[r, g, :] - w[g, m, :]||_p`` by broadcasting one block; ``P`` from the outer scope."""
    n = helper.make_node
    q = prefix
    zero = helper.make_tensor(f"{q}zero_v", onnx.TensorProto.FLOAT, [], [0.0])
    return [
        onnx_ops._ints(f"{q}axis2", [2]), onnx_ops._ints(f"{q}axis_last", [-1]),
        n("Unsqueeze", [x, f"{q}axis2"], [f"{q}x4"]),                    # [R, G, 1, Kg]
        n("Sub", [f"{q}x4", w], [f"{q}d"]),                              # [R, G, Mg, Kg]
        n("Abs", [f"{q}d"], [f"{q}a"]),
        n("ReduceMax", [f"{q}a", f"{q}axis_last"], [f"{q}mk"], keepdims=1),
        n("Div", [f"{q}a", f"{q}mk"], [f"{q}t"]),                        # in [0, 1]: no overflow
        n("Pow", [f"{q}t", "P"], [f"{q}tp"]),
        n("ReduceSum", [f"{q}tp", f"{q}axis_last"], [f"{q}s"], keepdims=0),
        n("Reciprocal", ["P"], [f"{q}ip"]),
        n("Pow", [f"{q}s", f"{q}ip"], [f"{q}root"]),
        n("Squeeze", [f"{q}mk", f"{q}axis_last"], [f"{q}m"]),
        n("Mul", [f"{q}m", f"{q}root"], [f"{q}r"]),
        # m = 0 (0/0) or inf (inf/inf): the norm is m itself
        n("Constant", [], [f"{q}zero_f"], value=zero),
        n("CastLike", [f"{q}zero_f", f"{q}m"], [f"{q}zero"]),
        n("Equal", [f"{q}m", f"{q}zero"], [f"{q}is0"]),
        n("IsInf", [f"{q}m"], [f"{q}isinf"]),
        n("Or", [f"{q}is0", f"{q}isinf"], [f"{q}use_m"]),
        n("Where", [f"{q}use_m", f"{q}m", f"{q}r"], [f"{q}r2"]),
        # a NaN anywhere makes the row NaN (whatever ReduceMax does with NaN): sum(a) carries it
        n("ReduceSum", [f"{q}a", f"{q}axis_last"], [f"{q}sa"], keepdims=0),
        n("IsNaN", [f"{q}sa"], [f"{q}nan"]),
        n("Where", [f"{q}nan", f"{q}sa", f"{q}r2"], [f"{q}r3"]),
        n("Neg", [f"{q}r3"], [y]),
    ]


def _with_lp(fn: onnx.FunctionProto, name: str) -> onnx.FunctionProto:
    """``fn`` (the l1 body) as ``name``: attribute ``p`` as the tensor ``P``, ``L1Distance`` -> ``LpDistance``."""
    out = onnx.FunctionProto()
    out.CopyFrom(fn)
    out.name = name
    out.attribute.append("p")
    const = helper.make_node("Constant", [], ["P_f"])
    ref = onnx.AttributeProto(name="value_float", ref_attr_name="p", type=onnx.AttributeProto.FLOAT)
    const.attribute.append(ref)
    nodes = [const, helper.make_node("CastLike", ["P_f", "X"], ["P"])]
    for node in fn.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        if node.op_type == onnx_ops.DISTANCE and node.domain == DOMAIN:
            node.op_type = LP_DISTANCE
            node.input.append("P")
        nodes.append(node)
    del out.node[:]
    out.node.extend(nodes)
    return out


def functions(opset: int, chunk_bytes: Optional[int]) -> list[onnx.FunctionProto]:
    """The model-local definitions of ``LpLinear``, ``LpConv`` and ``LpDistance``."""
    return [_with_lp(onnx_ops.linear_function(opset), LP_LINEAR), _with_lp(onnx_ops.conv_function(opset), LP_CONV),
            onnx_ops.distance_function(opset, chunk_bytes, block=_lp_block, name=LP_DISTANCE,
                                       inputs=("X", "W", "P"))]


def translations(op) -> dict:
    """``{torch.ops.l1fx.lp_linear.default: ..., lp_conv: ...}`` for the exporter's custom_translation_table."""
    import onnxscript
    import torch

    from . import ops_lp  # noqa: F401  (defines the ops)

    lp = onnxscript.values.Opset(DOMAIN, VERSION)

    def lp_linear(x, weight, bias=None, p: float = 2.0, mix: float = 1.0):
        return getattr(lp, LP_LINEAR)(x, weight, onnx_ops._bias(op, weight, bias), p=float(p))

    def lp_conv(x, weight, bias, stride, padding, dilation, groups: int, p: float = 2.0, mix: float = 1.0):
        return getattr(lp, LP_CONV)(x, weight, onnx_ops._bias(op, weight, bias), strides=list(stride),
                                    pads=list(padding) * 2, dilations=list(dilation), group=int(groups),
                                    p=float(p))

    return {torch.ops.l1fx.lp_linear.default: lp_linear, torch.ops.l1fx.lp_conv.default: lp_conv}


def _register() -> None:
    """Add the ℓp ops to the l1fx domain's extension tables (``onnx_ops.EXTRA_*``), as l1fx.onnx_int8 does."""
    onnx_ops.EXTRA_SCHEMAS.extend((lambda i=i: _schemas()[i]) for i in range(3))
    for op_type in OPS:  # each body set includes LpDistance; functions() attaches it once
        onnx_ops.EXTRA_FUNCTIONS[op_type] = functions
    import torch

    from . import ops_lp  # noqa: F401  (defines the ops)

    for overload in (torch.ops.l1fx.lp_linear.default, torch.ops.l1fx.lp_conv.default):
        onnx_ops.EXTRA_TRANSLATIONS[overload] = lambda l1, op, overload=overload: translations(op)[overload]


_register()
