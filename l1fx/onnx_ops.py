"""The ``l1fx`` ONNX domain: op schemas, reference function bodies, exporter translations.

Three ops, one node per l1 layer:

* ``l1fx.L1Linear(X[..., K], W[M, K], B[M]) -> Y[..., M]``,
  ``Y = -sum_k |X[..., k] - W[m, k]| + B[m]``;
* ``l1fx.L1Conv(X[N, C, *S], W[M, C/group, *k], B[M]) -> Y[N, M, *out]`` with the
  attributes of ONNX ``Conv``: ``strides``, ``pads`` (``[begin..., end...]``),
  ``dilations``, ``group``; the negative l1 distance between every zero-padded
  input patch and every filter of its group.

* ``l1fx.L1ConvTranspose(X[N, C, *S], W[C, M/group, *k], B[M]) -> Y[N, M, *out]`` with the
  attributes of ONNX ``ConvTranspose`` (``strides``, ``pads``, ``output_padding``, ``dilations``,
  ``group``): ``-sum |x - w|`` over the real (input, tap) pairs of each output (docs/l1_ops.md).

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

What comes from the layer registry (:mod:`l1fx.layers`): the op names and
domain (each kind's ``LayerSpec.onnx``), the schemas (one per distinct
``spec.onnx``: its inputs, outputs and attributes, typed as in ONNX
``Conv``/``ConvTranspose``) and the keys of the translation table (each kind's
``l1_op``). What a new ONNX op needs besides its spec: a translation in
:data:`TRANSLATIONS` and a function body in :data:`FUNCTION_BODIES` (both keyed
by the ONNX op type; a plug-in adds its entries from its own module).
"""
from __future__ import annotations

from typing import Callable, Collection, Optional

import onnx
from onnx import TensorProto, helper

from . import layers

# The ONNX ops of the built-in kinds, as their specs declare them.
LINEAR = layers.get("linear").onnx.op_type
CONV = layers.get("conv2d").onnx.op_type  # conv1d/2d/3d share one op
CONV_TRANSPOSE = layers.get("conv_transpose2d").onnx.op_type  # conv_transpose1d/2d/3d share one op
DOMAIN = layers.get("linear").onnx.domain
DOMAIN_VERSION = layers.get("linear").onnx.version
DISTANCE = "L1Distance"  # the shared helper of the function bodies: not a layer kind's op

# Row-block budget of the function body. Blocks that stay in cache run faster in
# onnxruntime than the reference kernel's 64 MiB (measured: bench/bench_onnx.py,
# docs/onnx.md), so the body uses min(this, l1fx.kernels.chunk_bytes()).
ONNX_CHUNK_BYTES = 4 * 2**20

_FLOAT_TYPES = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]


# ---------------------------------------------------------------- schemas
# Documentation of the built-in ops in onnx's schema registry (a new kind's op gets a generic one).
_DOCS = {
    "L1Linear": ("Y[..., m] = -sum_k |X[..., k] - W[m, k]| + B[m] (l1 / adder linear layer).",
                 {"X": "input [..., K]", "W": "weight [M, K]", "B": "bias [M]", "Y": "output [..., M]"}),
    "L1Conv": ("Negative l1 distance between every zero-padded patch of X and every filter of its group, "
               "plus B; attributes as ONNX Conv.",
               {"X": "input [N, C, *spatial]", "W": "weight [M, C/group, *kernel]", "B": "bias [M]",
                "Y": "output [N, M, *out]", "strides": "stride per spatial axis",
                "pads": "zero padding [begin..., end...]", "dilations": "dilation per spatial axis",
                "group": "groups"}),
    "L1ConvTranspose": ("Y[n, m, o] = B[m] - sum |X[n, c, i] - W[c, m, k]| over the real (input i, tap k) pairs "
                        "with o = i*stride + k*dilation - pad_begin (no zero-stuffed input); attributes as ONNX "
                        "ConvTranspose.",
                        {"X": "input [N, C, *spatial]", "W": "weight [C, M/group, *kernel]", "B": "bias [M]",
                         "Y": "output [N, M, *out]", "strides": "stride per spatial axis",
                         "pads": "padding [begin..., end...]", "output_padding": "extra output size at the end",
                         "dilations": "dilation per spatial axis", "group": "groups"}),
}


def onnx_specs() -> list[layers.OnnxSchema]:
    """Each distinct ``spec.onnx`` of the registered kinds, in registration order.

    Kinds may share an op (conv1d/2d/3d: ``L1Conv``) only with the same declaration: two different
    declarations of one ``domain.op_type`` version would give onnx two schemas of one name.
    """
    seen: dict[tuple[str, str, int], tuple[str, layers.OnnxSchema]] = {}
    for spec in layers.specs():
        op = spec.onnx
        if op is None:
            continue
        key = (op.domain, op.op_type, op.version)
        if key not in seen:
            seen[key] = (spec.name, op)
        elif seen[key][1] != op:
            raise ValueError(f"l1fx layer registry: kinds {seen[key][0]!r} and {spec.name!r} declare the ONNX op "
                             f"{op.domain}.{op.op_type} v{op.version} differently ({seen[key][1]} vs {op}); give "
                             f"one of them another op_type or version")
    return [op for _, op in seen.values()]


def _attribute_type(name: str, op: layers.OnnxSchema) -> "onnx.defs.OpSchema.AttrType":
    """The type ONNX ``Conv`` (or ``ConvTranspose``) gives an attribute of this name: ints, or int for group."""
    for reference in ("Conv", "ConvTranspose"):
        attributes = onnx.defs.get_schema(reference).attributes
        if name in attributes:
            return attributes[name].type
    raise ValueError(f"l1fx layer registry: the ONNX op {op.domain}.{op.op_type} has attribute {name!r}, which "
                     f"ONNX Conv/ConvTranspose do not define, so its type is unknown; use their attribute names")


def schema_for(op: layers.OnnxSchema) -> onnx.defs.OpSchema:
    """The onnx ``OpSchema`` of one ``LayerSpec.onnx``: float tensors in and out, Conv-typed attributes."""
    P = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.Attribute
    doc, notes = _DOCS.get(op.op_type, (f"l1fx layer op {op.op_type} (see l1fx.layers).", {}))
    return onnx.defs.OpSchema(
        op.op_type, op.domain, op.version, doc,
        inputs=[P(name, "T", notes.get(name, name)) for name in op.inputs],
        outputs=[P(name, "T", notes.get(name, name)) for name in op.outputs],
        type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
        attributes=[A(name, _attribute_type(name, op), notes.get(name, name)) for name in op.attributes],
    )


def _distance_schema() -> onnx.defs.OpSchema:
    P = onnx.defs.OpSchema.FormalParameter
    return onnx.defs.OpSchema(
        DISTANCE, DOMAIN, DOMAIN_VERSION,
        "Y[r, g, m] = -sum_k |X[r, g, k] - W[g, m, k]| (grouped l1 distance, computed in row blocks).",
        inputs=[P("X", "T", "rows [R, G, Kg]"), P("W", "T", "filters [G, Mg, Kg]")],
        outputs=[P("Y", "T", "[R, G, Mg]")],
        type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
    )


# ---------------------------------------------------------------- ops that are not a layer kind's
# (the ℓp layers: l1fx.onnx_lp; the int8 layers: l1fx.onnx_int8). A module named in EXTRA_MODULES is
# imported on first use and adds its entries: EXTRA_TRANSLATIONS {torch op overload: make(l1_opset, onnx_opset)},
# EXTRA_FUNCTIONS {ONNX op type: builder(opset, chunk_bytes) -> [FunctionProto, ...]} (attached only to models
# that use the op; a helper body two ops share is attached once) and EXTRA_SCHEMAS (factories of their OpSchemas).
EXTRA_MODULES = ["l1fx.onnx_lp", "l1fx.onnx_int8"]
EXTRA_TRANSLATIONS: dict = {}
EXTRA_FUNCTIONS: dict[str, Callable[[int, Optional[int]], list]] = {}
EXTRA_SCHEMAS: list[Callable[[], onnx.defs.OpSchema]] = []


def _load_extras() -> None:
    import importlib

    for name in EXTRA_MODULES:
        importlib.import_module(name)


def _schemas() -> list[onnx.defs.OpSchema]:
    """The schemas of every registered kind's ONNX op, then the shared ``L1Distance``, then the extra ops'."""
    _load_extras()
    return [schema_for(op) for op in onnx_specs()] + [_distance_schema()] + [make() for make in EXTRA_SCHEMAS]


def register_schemas() -> None:
    """Register the ``l1fx`` op schemas with onnx (idempotent).

    onnxscript, and so the dynamo exporter, refuses ops it has no schema for.
    """
    for schema in _schemas():
        try:
            onnx.defs.get_schema(schema.name, schema.since_version, schema.domain)
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


def distance_function(opset: int, chunk_bytes: Optional[int], *, block: Optional[Callable] = None,
                      name: str = DISTANCE, inputs: tuple[str, ...] = ("X", "W")) -> onnx.FunctionProto:
    """``l1fx.L1Distance``: blocked over rows so one block's difference tensor fits ``chunk_bytes``.

    The block size is computed in the graph from the runtime shapes:
    ``rows = clamp(budget // (G*Mg*Kg), 1, R)`` with ``budget = chunk_bytes // 4``
    (float32 elements); rows are zero-padded to whole blocks, a ``Scan`` maps
    each block, and the padding rows are sliced off. ``block(x, w, y, prefix)`` (default the l1 one)
    gives the nodes of one block; ``name`` and ``inputs`` (extra inputs are read from the outer scope)
    let the ℓp ops (l1fx/onnx_lp.py) reuse this.
    """
    n = helper.make_node
    block = block or _broadcast_distance
    if chunk_bytes is None:
        nodes = block("X", "W", "Y", "")
    else:
        body = helper.make_graph(
            block("xb", "W", "yb", "b_"), "l1_block", [_untyped("xb")], [_untyped("yb")])
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
    return helper.make_function(DOMAIN, name, list(inputs), ["Y"], nodes, [helper.make_opsetid("", opset)])


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


def _add_channel_bias() -> list[onnx.NodeProto]:
    """``Y = y + B`` with ``B[M]`` reshaped to ``[M, 1, ...]`` (one 1 per kernel dim of ``k``): the conv bodies' tail."""
    n = helper.make_node
    return [
        n("Shape", ["k"], ["nd"]),
        n("ConstantOfShape", ["nd"], ["ones_nd"], value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
        n("Concat", ["m", "ones_nd"], ["b_shape"], axis=0),
        n("Reshape", ["B", "b_shape"], ["b"]),                   # [M, 1, ...]
        n("Add", ["y", "b"], ["Y"]),
    ]


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
    ] + _add_channel_bias()
    return helper.make_function(
        DOMAIN, CONV, ["X", "W", "B"], ["Y"], nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        attributes=["strides", "pads", "dilations", "group"],
    )


def conv_transpose_function(opset: int) -> onnx.FunctionProto:
    """``l1fx.L1ConvTranspose``: per-(input, tap) distances by ``L1Distance``, placed by a one-hot ``ConvTranspose``.

    ``D[n, i, m, k] = -sum_{c in group} |X[n, c, i] - W[c, m_g, k]|`` is one ``L1Distance`` of the input rows
    ``[N*I, G, C_g]`` against the filters ``[G, M_g*K, C_g]``; output ``o`` then needs the sum of ``D`` over the
    pairs ``o = i*stride + k*dilation - pad``, which is a ``ConvTranspose`` of ``D`` (channels: the K taps)
    with one-hot kernels ``E[K, 1, *k]`` (tap ``p`` at kernel offset ``p``): multiplies by 0 and 1 only, so
    exact for finite values (as the one-hot patch ``Conv`` of ``L1Conv``; a non-finite ``D`` would also reach
    the other taps of its input through ``0 * inf``).
    """
    n = helper.make_node
    ref = helper.make_attribute_ref
    A = onnx.AttributeProto
    place = n("ConvTranspose", ["dk", "E"], ["placed"])
    place.attribute.extend([ref("strides", A.INTS), ref("pads", A.INTS), ref("dilations", A.INTS),
                            ref("output_padding", A.INTS)])
    nodes = [
        _ints("minus1", [-1]), _ints("one", [1]),
        n("Shape", ["X"], ["nb"], start=0, end=1),               # [N]
        n("Shape", ["X"], ["c"], start=1, end=2),                # [C]
        n("Shape", ["X"], ["spatial"], start=2),                 # I
        n("Shape", ["W"], ["mg"], start=1, end=2),               # [M / group]
        n("Shape", ["W"], ["k"], start=2),                       # kernel
        n("ReduceProd", ["k"], ["p"], keepdims=1),               # [P] kernel elements (taps)
        n("Shape", ["B"], ["m"]),                                # [M]
        n("Div", ["m", "mg"], ["g"]),
        n("Div", ["c", "g"], ["cg"]),
        # Input rows [N*L, G, Cg].
        n("Concat", ["nb", "g", "cg", "minus1"], ["x4_shape"], axis=0),
        n("Reshape", ["X", "x4_shape"], ["x4"]),                 # [N, G, Cg, L]
        n("Transpose", ["x4"], ["x4t"], perm=[0, 3, 1, 2]),       # [N, L, G, Cg]
        n("Concat", ["minus1", "g", "cg"], ["rows_shape"], axis=0),
        n("Reshape", ["x4t", "rows_shape"], ["rows"]),
        # Filters [G, Mg*P, Cg] from W [C, Mg, *k] = [G, Cg, Mg*P].
        n("Mul", ["mg", "p"], ["mgp"]),
        n("Concat", ["g", "cg", "mgp"], ["w3_shape"], axis=0),
        n("Reshape", ["W", "w3_shape"], ["w3"]),
        n("Transpose", ["w3"], ["wg"], perm=[0, 2, 1]),
        n(DISTANCE, ["rows", "wg"], ["d"], domain=DOMAIN),       # [N*L, G, Mg*P]
        # [N, L, M*P] -> [N, M*P, L] -> [N*M, P, *I]
        n("Mul", ["m", "p"], ["mp"]),
        n("Concat", ["nb", "minus1", "mp"], ["d3_shape"], axis=0),
        n("Reshape", ["d", "d3_shape"], ["d3"]),
        n("Transpose", ["d3"], ["dt"], perm=[0, 2, 1]),
        n("Concat", ["minus1", "p", "spatial"], ["dk_shape"], axis=0),
        n("Reshape", ["dt", "dk_shape"], ["dk"]),
        # One-hot kernels E[P, 1, *k].
        n("Concat", ["p", "p"], ["pp"], axis=0),
        n("ConstantOfShape", ["pp"], ["zpp"]),
        n("EyeLike", ["zpp"], ["eye"]),
        n("CastLike", ["eye", "X"], ["eye_t"]),
        n("Concat", ["p", "one", "k"], ["e_shape"], axis=0),
        n("Reshape", ["eye_t", "e_shape"], ["E"]),
        place,                                                   # [N*M, 1, *O]
        n("Shape", ["placed"], ["out"], start=2),
        n("Concat", ["nb", "m", "out"], ["y_shape"], axis=0),
        n("Reshape", ["placed", "y_shape"], ["y"]),
    ] + _add_channel_bias()
    return helper.make_function(
        DOMAIN, CONV_TRANSPOSE, ["X", "W", "B"], ["Y"], nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        attributes=["strides", "pads", "output_padding", "dilations", "group"],
    )


def default_chunk_bytes() -> int:
    from l1fx.kernels import chunk_bytes

    return min(ONNX_CHUNK_BYTES, chunk_bytes())


# ONNX op type -> builder of its model-local definition, ``builder(opset) -> FunctionProto``. Looked up at
# call time (not bound here), so the functions of this module can be replaced (tests do).
FUNCTION_BODIES: dict[str, Callable[[int], onnx.FunctionProto]] = {
    LINEAR: lambda opset: linear_function(opset),
    CONV: lambda opset: conv_function(opset),
    CONV_TRANSPOSE: lambda opset: conv_transpose_function(opset),
}


def functions(opset: int, chunk_bytes: Optional[int], used: Collection[str] = ()) -> list[onnx.FunctionProto]:
    """The model-local definitions of every registered kind's op (that has a body), then ``L1Distance``,
    then those of the extra ops among ``used`` (the l1fx op types the graph holds)."""
    bodies = [FUNCTION_BODIES[op.op_type](opset) for op in onnx_specs() if op.op_type in FUNCTION_BODIES]
    _load_extras()
    extras: dict[str, onnx.FunctionProto] = {}
    for t, build in EXTRA_FUNCTIONS.items():
        if t in used:
            for f in build(opset, chunk_bytes):
                extras.setdefault(f.name, f)
    return bodies + [distance_function(opset, chunk_bytes)] + list(extras.values())


# ---------------------------------------------------------------- exporter translations
def _bias(op, weight, bias):
    if bias is not None:
        return bias
    # Bias-free layer: B is a required input, so feed zeros of shape [M].
    return op.CastLike(op.ConstantOfShape(op.Shape(weight, start=0, end=1)), weight)


def _translate_linear(l1, op):
    def l1_linear(x, weight, bias=None, mix: float = 1.0):
        return getattr(l1, LINEAR)(x, weight, _bias(op, weight, bias))

    return l1_linear


def _translate_conv(l1, op):
    def l1_conv(x, weight, bias, stride, padding, dilation, groups: int, mix: float = 1.0):
        return getattr(l1, CONV)(x, weight, _bias(op, weight, bias), strides=list(stride), pads=list(padding) * 2,
                                 dilations=list(dilation), group=int(groups))

    return l1_conv


def _translate_conv_transpose(l1, op):
    def l1_conv_transpose(x, weight, bias, stride, padding, output_padding, groups: int, dilation,
                          mix: float = 1.0):
        # ONNX ConvTranspose's bias has M = W.shape[1] * group entries; _bias would give W.shape[0]
        b = bias if bias is not None else op.CastLike(
            op.ConstantOfShape(op.Mul(op.Shape(weight, start=1, end=2), op.Constant(value_ints=[int(groups)]))),
            weight)
        return getattr(l1, CONV_TRANSPOSE)(x, weight, b, strides=list(stride), pads=list(padding) * 2,
                                           output_padding=list(output_padding), dilations=list(dilation),
                                           group=int(groups))

    return l1_conv_transpose


# ONNX op type -> ``make(l1_opset, onnx_opset) -> translation`` of the torch op into one node of that type
# (``l1_opset`` is the onnxscript Opset of the op's domain, ``onnx_opset`` onnxscript's opset18).
TRANSLATIONS: dict[str, Callable] = {LINEAR: _translate_linear, CONV: _translate_conv,
                                     CONV_TRANSPOSE: _translate_conv_transpose}


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: one node per l1 op.

    Keyed by each registered kind's ``l1_op`` (the first kind of an op decides its translation: conv1d/2d/3d
    share ``l1fx::conv``); a kind without ``onnx`` or without a :data:`TRANSLATIONS` entry is left to the
    exporter (which then names the op as having no ONNX translation).
    """
    import onnxscript
    import torch
    from onnxscript import opset18 as op

    register_schemas()
    table: dict = {}
    for spec in layers.specs():
        if spec.l1_op is None or spec.onnx is None or spec.onnx.op_type not in TRANSLATIONS:
            continue
        namespace, _, name = spec.l1_op.partition("::")
        overload = getattr(getattr(torch.ops, namespace), name).default
        if overload not in table:
            l1 = onnxscript.values.Opset(spec.onnx.domain, spec.onnx.version)
            table[overload] = TRANSLATIONS[spec.onnx.op_type](l1, op)
    _load_extras()
    for overload, make in EXTRA_TRANSLATIONS.items():
        table.setdefault(overload, make(onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION), op))
    return table
