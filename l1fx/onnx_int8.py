"""ONNX export of int8 ℓ1 layers: QuantizeLinear -> one integer l1fx node -> DequantizeLinear.

Each int8 layer (:mod:`l1fx.quantized`) exports as

    QX  = QuantizeLinear(X, s, z)                       uint8 (the same codes as l1fx: x / s, half to even)
    ACC = l1fx.L1Int8Linear(QX, QW)                      int32, sum_k |QX - QW|
        | l1fx.L1Int8Conv(QX, QW, z; strides, pads, dilations, group)
    Y   = B - DequantizeLinear(ACC, s)                   float32 (-(s * ACC) without a bias)

so ``l1fx.export_onnx`` of a quantised model needs nothing new from the
caller. The integer ops carry model-local function bodies that plain
onnxruntime inlines: the codes (minus the zero point, for the conv, so that
the standard zero padding is the code ``z``) go as float32 through the fp32
``l1fx.L1Linear`` / ``l1fx.L1Conv`` bodies and the result is cast back to
int32. That is exact while every partial sum is an integer below 2^24, i.e.
for ``K <= 65,793`` terms per output (``255 K < 2^24``); a layer with a larger
``K`` is refused at export (:class:`~l1fx.errors.ExportError`).

Registered into :mod:`l1fx.onnx_ops` (its ``EXTRA_*`` tables) on import, which
``l1fx.onnx_ops`` does on first use.
"""
from __future__ import annotations

from typing import Optional

import onnx
import torch
from onnx import TensorProto, helper

from . import onnx_ops
from .errors import ExportError

LINEAR = "L1Int8Linear"
CONV = "L1Int8Conv"
EXACT_MAX_K = (2**24 - 1) // 255  # 65,793: the float32 bodies stay exact up to here


def _schemas():
    P = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.Attribute
    ints = onnx.defs.OpSchema.AttrType
    u8 = [("T", ["tensor(uint8)"], "uint8 codes"), ("I", ["tensor(int32)"], "int32 sums")]
    linear = onnx.defs.OpSchema(
        LINEAR, onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION,
        "Y[..., m] = sum_k |QX[..., k] - QW[m, k]| (int8 l1 linear on codes of one shared grid).",
        inputs=[P("QX", "T", "input codes [..., K]"), P("QW", "T", "weight codes [M, K]")],
        outputs=[P("Y", "I", "sums [..., M]")], type_constraints=u8)
    conv = onnx.defs.OpSchema(
        CONV, onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION,
        "Y = sum |patch - filter| over the codes of every input patch padded with ZP and every filter of its "
        "group; attributes as ONNX Conv.",
        inputs=[P("QX", "T", "input codes [N, C, *S]"), P("QW", "T", "weight codes [M, C/group, *k]"),
                P("ZP", "T", "zero point (the padding code)")],
        outputs=[P("Y", "I", "sums [N, M, *out]")], type_constraints=u8,
        attributes=[A("strides", ints.INTS, "stride"), A("pads", ints.INTS, "pads [begin..., end...]"),
                    A("dilations", ints.INTS, "dilation"), A("group", ints.INT, "groups")])
    return linear, conv


def _linear_function(opset: int, chunk_bytes: Optional[int] = None) -> list[onnx.FunctionProto]:
    n = helper.make_node
    nodes = [
        n("Cast", ["QX"], ["xf"], to=TensorProto.FLOAT),
        n("Cast", ["QW"], ["wf"], to=TensorProto.FLOAT),
        n("Shape", ["QW"], ["m"], start=0, end=1),
        n("ConstantOfShape", ["m"], ["b0"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        n(onnx_ops.LINEAR, ["xf", "wf", "b0"], ["neg"], domain=onnx_ops.DOMAIN),  # -sum |x - w|, exact
        n("Neg", ["neg"], ["pos"]),
        n("Cast", ["pos"], ["Y"], to=TensorProto.INT32),
    ]
    return [helper.make_function(onnx_ops.DOMAIN, LINEAR, ["QX", "QW"], ["Y"], nodes,
                                 [helper.make_opsetid("", opset),
                                  helper.make_opsetid(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION)])]


def _conv_function(opset: int, chunk_bytes: Optional[int] = None) -> list[onnx.FunctionProto]:
    n = helper.make_node
    ref = helper.make_attribute_ref
    A = onnx.AttributeProto
    conv = n(onnx_ops.CONV, ["xc", "wc", "b0"], ["neg"], domain=onnx_ops.DOMAIN)
    conv.attribute.extend([ref("strides", A.INTS), ref("pads", A.INTS), ref("dilations", A.INTS),
                           ref("group", A.INT)])
    nodes = [
        n("Cast", ["ZP"], ["zf"], to=TensorProto.FLOAT),
        n("Cast", ["QX"], ["xf"], to=TensorProto.FLOAT),
        n("Sub", ["xf", "zf"], ["xc"]),  # codes - z: the zero padding of L1Conv is then the code z
        n("Cast", ["QW"], ["wf"], to=TensorProto.FLOAT),
        n("Sub", ["wf", "zf"], ["wc"]),
        n("Shape", ["QW"], ["m"], start=0, end=1),
        n("ConstantOfShape", ["m"], ["b0"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        conv,
        n("Neg", ["neg"], ["pos"]),
        n("Cast", ["pos"], ["Y"], to=TensorProto.INT32),
    ]
    return [helper.make_function(onnx_ops.DOMAIN, CONV, ["QX", "QW", "ZP"], ["Y"], nodes,
                                 [helper.make_opsetid("", opset),
                                  helper.make_opsetid(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION)],
                                 attributes=["strides", "pads", "dilations", "group"])]


def _check_k(weight_codes, what: str) -> None:
    k = 1
    for d in weight_codes.shape[1:]:
        k *= int(d)
    if k > EXACT_MAX_K:
        raise ExportError(f"export_onnx: an int8 {what} layer has K = {k} terms per output; its ONNX body is exact "
                          f"only up to K = {EXACT_MAX_K}; keep that layer in float (Int8L1Config(skip=...))")


def _grid(op, scale: float, zero_point: int):
    s = op.Constant(value=helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)]))
    z = op.Constant(value=helper.make_tensor("z", TensorProto.UINT8, [], [int(zero_point)]))
    return s, z


def _output(op, acc, s, bias, nd: int):
    p = op.DequantizeLinear(acc, s)  # float32(acc) * s, exactly as the torch layer rounds it
    if bias is None:
        return op.Neg(p)
    if nd:
        bias = op.Reshape(bias, op.Constant(value=helper.make_tensor("bs", TensorProto.INT64, [nd + 1],
                                                                     [-1] + [1] * nd)))
    return op.Sub(bias, p)


def _translate_linear(l1, op):
    def int8_linear(x, weight_codes, weight_packed, scale: float, zero_point: int, bias=None):
        _check_k(weight_codes, "linear")
        s, z = _grid(op, scale, zero_point)
        acc = getattr(l1, LINEAR)(op.QuantizeLinear(x, s, z), weight_codes)
        return _output(op, acc, s, bias, 0)

    return int8_linear


def _translate_conv(l1, op):
    def int8_conv(x, weight_codes, weight_packed, scale: float, zero_point: int, bias, stride, padding, dilation,
                  groups: int):
        _check_k(weight_codes, "conv")
        s, z = _grid(op, scale, zero_point)
        acc = getattr(l1, CONV)(op.QuantizeLinear(x, s, z), weight_codes, z, strides=list(stride),
                                pads=list(padding) * 2, dilations=list(dilation), group=int(groups))
        return _output(op, acc, s, bias, len(stride))

    return int8_conv


def _register() -> None:
    from . import quantized  # noqa: F401  (defines the custom ops)

    onnx_ops.EXTRA_SCHEMAS.extend([lambda: _schemas()[0], lambda: _schemas()[1]])
    onnx_ops.EXTRA_FUNCTIONS[LINEAR] = _linear_function
    onnx_ops.EXTRA_FUNCTIONS[CONV] = _conv_function
    onnx_ops.EXTRA_TRANSLATIONS[torch.ops.l1fx.int8_linear.default] = _translate_linear
    onnx_ops.EXTRA_TRANSLATIONS[torch.ops.l1fx.int8_conv.default] = _translate_conv


_register()
