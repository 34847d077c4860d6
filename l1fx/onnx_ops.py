"""The ``l1fx`` ONNX domain: op schemas, reference function bodies, exporter translations.

Two ops, one node per l1 layer:

* ``l1fx.L1Linear(X[..., K], W[M, K], B[M]) -> Y[..., M]``,
  ``Y = -sum_k |X[..., k] - W[m, k]| + B[m]``;
* ``l1fx.L1Conv(X[N, C, *S], W[M, C/group, *k], B[M]) -> Y[N, M, *out]`` with the
  attributes of ONNX ``Conv``: ``strides``, ``pads`` (``[begin..., end...]``),
  ``dilations``, ``group``; the negative l1 distance between every zero-padded
  input patch and every filter of its group.

``B`` is a required input (the translation feeds zeros for bias-free layers),
because a function body cannot test whether an optional input is present.

The model carries each op's definition as a model-local ``FunctionProto``, so
plain onnxruntime (which has no kernel for ``l1fx``) inlines and runs it.
Both bodies share ``l1fx.L1Distance(X[R, G, Kg], W[G, Mg, Kg]) -> Y[R, G, Mg]``
(``-sum |x - w|`` per group), which works through the rows in blocks with a
``Scan`` so the ``R x M x K`` difference tensor never exists whole: each block
holds at most ``chunk_bytes`` of it (by default the smaller of ``ONNX_CHUNK_BYTES`` and the
reference kernel's budget).
``chunk_bytes=None`` builds the unchunked broadcast body instead (for benchmarks).

The conv body extracts patches with a ``Conv`` against one-hot kernels
(im2col with standard ops; the multiplies are by 0 and 1 only, exact for
finite inputs), then calls ``L1Distance``.
"""
from __future__ import annotations

from typing import Optional

import onnx
from onnx import TensorProto, helper

DOMAIN = "l1fx"
DOMAIN_VERSION = 1
LINEAR = "L1Linear"
CONV = "L1Conv"
DISTANCE = "L1Distance"

# Row-block budget of the function body. Blocks that stay in cache run faster in
# onnxruntime than the reference kernel's 64 MiB (measured: bench/bench_onnx.py,
# docs/onnx.md), so the body uses min(this, l1fx.kernels.chunk_bytes()).
ONNX_CHUNK_BYTES = 4 * 2**20

_FLOAT_TYPES = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]


# ---------------------------------------------------------------- schemas
def _schemas() -> list[onnx.defs.OpSchema]:
    P = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.Attribute
    ints = onnx.defs.OpSchema.AttrType.INTS
    linear = onnx.defs.OpSchema(
        LINEAR, DOMAIN, DOMAIN_VERSION,
        "Y[..., m] = -sum_k |X[..., k] - W[m, k]| + B[m] (l1 / adder linear layer).",
        inputs=[P("X", "T", "input [..., K]"), P("W", "T", "weight [M, K]"), P("B", "T", "bias [M]")],
        outputs=[P("Y", "T", "output [..., M]")],
        type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
    )
    conv = onnx.defs.OpSchema(
        CONV, DOMAIN, DOMAIN_VERSION,
        "Negative l1 distance between every zero-padded patch of X and every filter of its group, "
        "plus B; attributes as ONNX Conv.",
        inputs=[P("X", "T", "input [N, C, *spatial]"), P("W", "T", "weight [M, C/group, *kernel]"),
                P("B", "T", "bias [M]")],
        outputs=[P("Y", "T", "output [N, M, *out]")],
        type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
        attributes=[A("strides", ints, "stride per spatial axis"),
                    A("pads", ints, "zero padding [begin..., end...]"),
                    A("dilations", ints, "dilation per spatial axis"),
                    A("group", onnx.defs.OpSchema.AttrType.INT, "groups")],
    )
    distance = onnx.defs.OpSchema(
        DISTANCE, DOMAIN, DOMAIN_VERSION,
        "Y[r, g, m] = -sum_k |X[r, g, k] - W[g, m, k]| (grouped l1 distance, computed in row blocks).",
        inputs=[P("X", "T", "rows [R, G, Kg]"), P("W", "T", "filters [G, Mg, Kg]")],
        outputs=[P("Y", "T", "[R, G, Mg]")],
        type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
    )
    return [linear, conv, distance]


def register_schemas() -> None:
    """Register the ``l1fx`` op schemas with onnx (idempotent).

    onnxscript, and so the dynamo exporter, refuses ops it has no schema for.
    """
    for schema in _schemas():
        try:
            onnx.defs.get_schema(schema.name, DOMAIN_VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)


# ---------------------------------------------------------------- function bodies
def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _untyped(name: str) -> onnx.ValueInfoProto:
    # Function bodies are type-polymorphic, so their Scan subgraph leaves types open.
    return onnx.ValueInfoProto(name=name)


def _broadcast_distance(x: str, w: str, y: str, prefix: str) -> list[onnx.NodeProto]:
    """``y[r, g, m] = -sum_k |x[r, g, k] - w[g, m, k]|`` by broadcasting (materialises R x M x K)."""
    n = helper.make_node
    return [
        _ints(f"{prefix}axis2", [2]), _ints(f"{prefix}axis_last", [-1]),
        n("Unsqueeze", [x, f"{prefix}axis2"], [f"{prefix}x4"]),          # [R, G, 1, Kg]
        n("Sub", [f"{prefix}x4", w], [f"{prefix}d"]),                    # [R, G, Mg, Kg]
        n("Abs", [f"{prefix}d"], [f"{prefix}a"]),
        n("ReduceSum", [f"{prefix}a", f"{prefix}axis_last"], [f"{prefix}s"], keepdims=0),
        n("Neg", [f"{prefix}s"], [y]),
    ]


def distance_function(opset: int, chunk_bytes: Optional[int]) -> onnx.FunctionProto:
    """``l1fx.L1Distance``: blocked over rows so one block's difference tensor fits ``chunk_bytes``.

    The block size is computed in the graph from the runtime shapes:
    ``rows = clamp(budget // (G*Mg*Kg), 1, R)`` with ``budget = chunk_bytes // 4``
    (float32 elements); rows are zero-padded to whole blocks, a ``Scan`` maps
    each block, and the padding rows are sliced off.
    """
    n = helper.make_node
    if chunk_bytes is None:
        nodes = _broadcast_distance("X", "W", "Y", "")
    else:
        body = helper.make_graph(
            _broadcast_distance("xb", "W", "yb", "b_"), "l1_block", [_untyped("xb")], [_untyped("yb")])
        nodes = [
            _ints("zero", [0]), _ints("one", [1]), _ints("minus1", [-1]), _ints("zeros2", [0, 0]),
            _ints("budget", [max(1, int(chunk_bytes) // 4)]),
            n("Shape", ["X"], ["r"], start=0, end=1),                    # [R]
            n("Shape", ["X"], ["gk"], start=1),                          # [G, Kg]
            n("Shape", ["W"], ["ws"]),
            n("ReduceProd", ["ws"], ["per_row"], keepdims=1),           # [G*Mg*Kg]
            n("Max", ["per_row", "one"], ["per_row1"]),
            n("Div", ["budget", "per_row1"], ["rows_fit"]),
            n("Min", ["rows_fit", "r"], ["rows_min"]),
            n("Max", ["rows_min", "one"], ["block"]),                   # rows per block
            n("Add", ["r", "block"], ["r_plus"]),
            n("Sub", ["r_plus", "one"], ["r_plus1"]),
            n("Div", ["r_plus1", "block"], ["nblocks"]),                # ceil(R / block)
            n("Mul", ["nblocks", "block"], ["padded"]),
            n("Sub", ["padded", "r"], ["extra"]),
            n("Concat", ["zero", "zeros2", "extra", "zeros2"], ["pads"], axis=0),
            n("Pad", ["X", "pads"], ["xp"]),                             # rows padded at the end
            n("Concat", ["nblocks", "block", "gk"], ["blocked_shape"], axis=0),
            n("Reshape", ["xp", "blocked_shape"], ["xblocks"]),          # [nb, block, G, Kg]
            n("Scan", ["xblocks"], ["yblocks"], body=body, num_scan_inputs=1),  # [nb, block, G, Mg]
            n("Shape", ["yblocks"], ["gm"], start=2),                   # [G, Mg]
            n("Concat", ["minus1", "gm"], ["flat_shape"], axis=0),
            n("Reshape", ["yblocks", "flat_shape"], ["yflat"]),
            n("Slice", ["yflat", "zero", "r"], ["Y"]),
        ]
    return helper.make_function(DOMAIN, DISTANCE, ["X", "W"], ["Y"], nodes, [helper.make_opsetid("", opset)])


def linear_function(opset: int) -> onnx.FunctionProto:
    """``l1fx.L1Linear`` as rows ``[R, 1, K]`` against filters ``[1, M, K]``."""
    n = helper.make_node
    nodes = [
        _ints("minus1", [-1]), _ints("zero", [0]), _ints("one", [1]),
        n("Shape", ["W"], ["k"], start=1),                      # [K]
        n("Concat", ["minus1", "k"], ["rows_shape"], axis=0),
        n("Reshape", ["X", "rows_shape"], ["x2"]),              # [R, K]
        n("Unsqueeze", ["x2", "one"], ["x3"]),                   # [R, 1, K]
        n("Unsqueeze", ["W", "zero"], ["w3"]),                   # [1, M, K]
        n(DISTANCE, ["x3", "w3"], ["d3"], domain=DOMAIN),         # [R, 1, M]
        n("Shape", ["X"], ["lead"], start=0, end=-1),
        n("Shape", ["W"], ["m"], start=0, end=1),
        n("Concat", ["lead", "m"], ["out_shape"], axis=0),
        n("Reshape", ["d3", "out_shape"], ["y"]),
        n("Add", ["y", "B"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN, LINEAR, ["X", "W", "B"], ["Y"], nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
    )


def conv_function(opset: int) -> onnx.FunctionProto:
    """``l1fx.L1Conv`` as im2col: one-hot ``Conv`` patch extraction, then ``L1Distance`` per group."""
    n = helper.make_node
    ref = helper.make_attribute_ref
    A = onnx.AttributeProto
    patch_conv = n("Conv", ["x1", "E"], ["patches"])
    patch_conv.attribute.extend([ref("strides", A.INTS), ref("pads", A.INTS), ref("dilations", A.INTS)])
    nodes = [
        _ints("minus1", [-1]), _ints("one", [1]), _ints("minus1_one", [-1, 1]),
        n("Shape", ["X"], ["nb"], start=0, end=1),               # [N]
        n("Shape", ["X"], ["c"], start=1, end=2),                # [C]
        n("Shape", ["X"], ["spatial"], start=2),
        n("Shape", ["W"], ["m"], start=0, end=1),                # [M]
        n("Shape", ["W"], ["cg"], start=1, end=2),               # [C / group]
        n("Shape", ["W"], ["k"], start=2),                       # kernel
        n("ReduceProd", ["k"], ["p"], keepdims=1),               # [P] kernel elements
        # One-hot kernels E[P, 1, *k]: output channel p copies kernel offset p.
        n("Concat", ["p", "p"], ["pp"], axis=0),
        n("ConstantOfShape", ["pp"], ["zpp"]),
        n("EyeLike", ["zpp"], ["eye"]),
        n("CastLike", ["eye", "X"], ["eye_t"]),
        n("Concat", ["p", "one", "k"], ["e_shape"], axis=0),
        n("Reshape", ["eye_t", "e_shape"], ["E"]),
        # Patches of every channel: [N*C, 1, *S] -> [N*C, P, *out].
        n("Concat", ["minus1_one", "spatial"], ["x1_shape"], axis=0),
        n("Reshape", ["X", "x1_shape"], ["x1"]),
        patch_conv,
        n("Shape", ["patches"], ["out"], start=2),
        n("Div", ["c", "cg"], ["g"]),
        n("Mul", ["cg", "p"], ["kg"]),
        n("Div", ["m", "g"], ["mg"]),
        n("Concat", ["nb", "g", "kg", "minus1"], ["p_shape"], axis=0),
        n("Reshape", ["patches", "p_shape"], ["p4"]),            # [N, G, Cg*P, L]
        n("Transpose", ["p4"], ["rows4"], perm=[0, 3, 1, 2]),     # [N, L, G, Kg]
        n("Concat", ["minus1", "g", "kg"], ["rows_shape"], axis=0),
        n("Reshape", ["rows4", "rows_shape"], ["rows"]),         # [N*L, G, Kg]
        n("Concat", ["g", "mg", "kg"], ["wg_shape"], axis=0),
        n("Reshape", ["W", "wg_shape"], ["wg"]),                 # [G, Mg, Kg]
        n(DISTANCE, ["rows", "wg"], ["d"], domain=DOMAIN),       # [N*L, G, Mg]
        n("Concat", ["nb", "minus1", "m"], ["d3_shape"], axis=0),
        n("Reshape", ["d", "d3_shape"], ["d3"]),                 # [N, L, M]
        n("Transpose", ["d3"], ["dt"], perm=[0, 2, 1]),           # [N, M, L]
        n("Concat", ["nb", "m", "out"], ["y_shape"], axis=0),
        n("Reshape", ["dt", "y_shape"], ["y"]),
        n("Shape", ["k"], ["nd"]),
        n("ConstantOfShape", ["nd"], ["ones_nd"], value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
        n("Concat", ["m", "ones_nd"], ["b_shape"], axis=0),
        n("Reshape", ["B", "b_shape"], ["b"]),                   # [M, 1, ...]
        n("Add", ["y", "b"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN, CONV, ["X", "W", "B"], ["Y"], nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        attributes=["strides", "pads", "dilations", "group"],
    )


def default_chunk_bytes() -> int:
    from l1fx.kernels import chunk_bytes

    return min(ONNX_CHUNK_BYTES, chunk_bytes())


def functions(opset: int, chunk_bytes: Optional[int]) -> list[onnx.FunctionProto]:
    """The model-local definitions of every ``l1fx`` op, for a model of default-domain ``opset``."""
    return [linear_function(opset), conv_function(opset), distance_function(opset, chunk_bytes)]


# ---------------------------------------------------------------- exporter translations
def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: one ``l1fx`` node per l1 op."""
    import onnxscript
    import torch
    from onnxscript import opset18 as op

    register_schemas()
    l1 = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def _bias(weight, bias):
        if bias is not None:
            return bias
        # Bias-free layer: B is a required input, so feed zeros of shape [M].
        return op.CastLike(op.ConstantOfShape(op.Shape(weight, start=0, end=1)), weight)

    def l1_linear(x, weight, bias=None, mix: float = 1.0):
        return l1.L1Linear(x, weight, _bias(weight, bias))

    def l1_conv(x, weight, bias, stride, padding, dilation, groups: int, mix: float = 1.0):
        return l1.L1Conv(x, weight, _bias(weight, bias), strides=list(stride), pads=list(padding) * 2,
                         dilations=list(dilation), group=int(groups))

    return {torch.ops.l1fx.linear.default: l1_linear, torch.ops.l1fx.conv.default: l1_conv}
