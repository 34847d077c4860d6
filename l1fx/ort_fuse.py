"""Graph rewrites for :func:`l1fx.ort_session`'s native path, on an in-memory copy of the file.

onnxruntime fuses a dense ``Conv`` with the ``BatchNormalization`` and ``Relu`` after it, but it cannot
fuse anything into a custom op, so in an exported l1 model each ``l1fx.L1Conv`` is followed by two more
passes over its output, and a ``Concat`` feeding it copies its input once more. These passes hand
that work to the native library's ``l1fx.L1FusedConv`` (kernels/csrc/ort_ops.cpp):

    Y = act(scale * (COL - sum |X - W|) + shift)

one pass per layer, each a small function over the graph, run in this order by :func:`fuse`:

1. ``to_fused``: every float32 ``L1Conv`` becomes an ``L1FusedConv`` (COL = its bias, no affine, no ReLU);
2. ``fold_norm``: an inference ``BatchNormalization`` that alone reads it becomes the affine
   ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``;
3. ``fold_relu``: a ``Relu`` that alone reads it becomes ``relu = 1``;
4. ``read_concat``: for kernel 1 / stride 1 / no padding (PointNet's shared MLPs), X read straight from
   the inputs of the ``Concat`` (channel axis) that makes it, without the copy;
5. ``split_constant_channels``: of those inputs, the ones that are an ``Expand`` of a tensor with one
   position (PointNet's global feature and one-hot class, repeated for every point) are the same for
   every position, so their part of the sum is computed once per sample (an ``L1Linear`` of the
   unexpanded values, with the bias) and becomes COL [B, M];
6. ``unfuse_plain``: an ``L1FusedConv`` that nothing was fused into goes back to ``L1Conv``;
7. ``drop_unused``: nodes and initializers that nothing reads any more.

Each output keeps its terms ``|fl(x - w)|``; only the order of the sum changes (the constant channels'
part is added once), so the l1 part stays within ~K eps of its exact value, and the folded norm rounds
like onnxruntime's own Conv + BatchNormalization fusion (one multiply and one add per output).
Anything a pass cannot prove (a shape it cannot infer, an input read inside a subgraph, a norm
whose parameters are not initializers, another dtype) is left as it is.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Optional

import numpy as np

DOMAIN = "l1fx"
FUSED = "L1FusedConv"
_CONV_ATTRS = ("strides", "pads", "dilations", "group")


@dataclasses.dataclass
class FuseReport:
    """What :func:`fuse` changed: counts per pass (``sess.l1fx_fused`` on a native session)."""

    norms: int = 0
    relus: int = 0
    concats: int = 0
    constant_channels: int = 0

    def any(self) -> bool:
        return any(dataclasses.astuple(self))


class _Graph:
    """The top-level graph with its producer/consumer maps (rebuilt after every pass)."""

    def __init__(self, model, original):
        self.model, self.g = model, model.graph
        self._names = itertools.count()
        self._shapes = _shapes_or_nothing(original)  # the file's, before any pass: see _shapes_or_nothing
        self.refresh()

    @property
    def shapes(self) -> dict:
        return self._shapes()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.readers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.outer = _subgraph_reads(self.g.node)  # names read inside Loop/If/Scan bodies
        self.outputs = {o.name for o in self.g.output}
        self.init = {t.name: t for t in self.g.initializer}

    def sole_reader(self, name: str, op_type: str):
        """The one node reading ``name`` if it has type ``op_type`` and ``name`` is read nowhere else."""
        readers = self.readers.get(name, [])
        if len(readers) != 1 or name in self.outputs or name in self.outer:
            return None
        return readers[0] if readers[0].op_type == op_type and readers[0].domain in ("", "ai.onnx") else None

    def array(self, name: str) -> Optional[np.ndarray]:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.init[name]) if name in self.init else None

    def add_initializer(self, hint: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        self.init[name] = self.g.initializer[-1]
        return name

    def fresh(self, hint: str) -> str:
        taken = set(self.producer) | set(self.init) | {i.name for i in self.g.input}
        while True:
            name = f"{hint}__l1fx_fused_{next(self._names)}"
            if name not in taken:
                return name


def _subgraph_reads(nodes: Iterable) -> set:
    from onnx import AttributeProto

    names: set = set()
    for n in nodes:
        for a in n.attribute:
            graphs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else []
            for sub in graphs:
                for m in sub.node:
                    names.update(m.input)
                names |= _subgraph_reads(sub.node)
    return names


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _is_fused(node) -> bool:
    return node.op_type == FUSED and node.domain == DOMAIN


# Inputs of an L1FusedConv: W, COL, SCALE, SHIFT, X...
W_, COL_, SCALE_, SHIFT_, X_ = range(5)


def _pointwise(gr: _Graph, node) -> bool:
    w = gr.init.get(node.input[W_])
    return (w is not None and all(d == 1 for d in w.dims[2:]) and all(s == 1 for s in _attr(node, "strides", []))
            and all(p == 0 for p in _attr(node, "pads", [])) and _attr(node, "group", 1) == 1)


# ---------------------------------------------------------------- passes
def to_fused(gr: _Graph, report: FuseReport) -> None:
    from onnx import TensorProto

    empty = None
    for node in gr.g.node:
        if node.op_type != "L1Conv" or node.domain != DOMAIN or len(node.input) != 3:
            continue
        w = gr.init.get(node.input[1])
        if w is None or w.data_type != TensorProto.FLOAT:
            continue
        empty = empty or gr.add_initializer("empty", np.zeros(0, np.float32))
        x, weight, bias = node.input
        del node.input[:]
        node.input.extend([weight, bias, empty, empty, x])
        node.op_type = FUSED
        _keep_conv_attributes(node)
        _set_attr(node, "relu", 0)


def fold_norm(gr: _Graph, report: FuseReport) -> None:
    drop = []
    for node in gr.g.node:
        if not _is_fused(node) or gr.array(node.input[SCALE_]).size or _attr(node, "relu", 0):
            continue
        bn = gr.sole_reader(node.output[0], "BatchNormalization")
        if bn is None or len(bn.output) != 1 or _attr(bn, "training_mode", 0) != 0:
            continue
        params = [gr.array(i) for i in bn.input[1:5]]
        m = gr.init[node.input[W_]].dims[0]
        if any(p is None or p.dtype != np.float32 or p.shape != (m,) for p in params):
            continue
        gamma, beta, mean, var = params
        eps = np.float32(_attr(bn, "epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)  # float32, as onnxruntime folds a norm into a Conv
        shift = beta - mean * scale
        node.input[SCALE_] = gr.add_initializer("scale", scale)
        node.input[SHIFT_] = gr.add_initializer("shift", shift)
        node.output[0] = bn.output[0]
        drop.append(bn)
        report.norms += 1
    _remove(gr, drop)


def fold_relu(gr: _Graph, report: FuseReport) -> None:
    drop = []
    for node in gr.g.node:
        if not _is_fused(node) or _attr(node, "relu", 0):
            continue
        relu = gr.sole_reader(node.output[0], "Relu")
        if relu is None:
            continue
        _set_attr(node, "relu", 1)
        node.output[0] = relu.output[0]
        drop.append(relu)
        report.relus += 1
    _remove(gr, drop)


def read_concat(gr: _Graph, report: FuseReport) -> None:
    for node in gr.g.node:
        if not _is_fused(node) or len(node.input) != X_ + 1 or not _pointwise(gr, node):
            continue
        cat = gr.producer.get(node.input[X_])
        rank = len(gr.init[node.input[W_]].dims)
        if cat is None or cat.op_type != "Concat" or _attr(cat, "axis") not in (1, 1 - rank) or not cat.input:
            continue
        del node.input[X_:]
        node.input.extend(cat.input)  # the Concat itself goes if nothing else reads it (drop_unused)
        report.concats += 1


def split_constant_channels(gr: _Graph, report: FuseReport) -> None:
    from onnx import helper

    candidates = [n for n in gr.g.node if _is_fused(n) and len(n.input) > X_ + 1 and gr.array(n.input[COL_]).ndim == 1
                  and any(_expand_of(gr, x) for x in n.input[X_:])]
    shapes = gr.shapes
    for node in candidates:
        xs = list(node.input[X_:])
        dims = [shapes.get(x) for x in xs]
        if any(d is None or len(d) < 3 or not isinstance(d[1], int) for d in dims):
            continue
        const, local, offset, ci, li = [], [], 0, [], []
        for x, d in zip(xs, dims):
            src = _expand_of(gr, x)
            sd = shapes.get(src) if src else None
            is_const = (sd is not None and len(sd) == len(d) and sd[1] == d[1] and sd[0] == d[0]
                        and isinstance(sd[0], (int, str)) and all(s == 1 for s in sd[2:]))
            (const if is_const else local).append(src if is_const else x)
            (ci if is_const else li).extend(range(offset, offset + d[1]))
            offset += d[1]
        w = gr.array(node.input[W_])
        if not const or not local or offset != w.shape[1]:
            continue
        flat = []
        for src in const:
            flat.append(gr.fresh("flat"))
            gr.g.node.append(helper.make_node("Flatten", [src], [flat[-1]], axis=1))
        if len(flat) > 1:
            joined = gr.fresh("constant_channels")
            gr.g.node.append(helper.make_node("Concat", flat, [joined], axis=1))
        else:
            joined = flat[0]
        col = gr.fresh("col")
        w_const = gr.add_initializer("w_const", w[:, ci].reshape(w.shape[0], len(ci)))
        gr.g.node.append(helper.make_node("L1Linear", [joined, w_const, node.input[COL_]], [col], domain=DOMAIN))
        node.input[W_] = gr.add_initializer("w_local", w[:, li])
        node.input[COL_] = col
        del node.input[X_:]
        node.input.extend(local)
        report.constant_channels += 1
    _toposort(gr)


def unfuse_plain(gr: _Graph, report: FuseReport) -> None:
    for node in gr.g.node:
        if (_is_fused(node) and len(node.input) == X_ + 1 and not gr.array(node.input[SCALE_]).size
                and not _attr(node, "relu", 0) and gr.array(node.input[COL_]) is not None
                and gr.array(node.input[COL_]).ndim == 1):
            weight, bias, x = node.input[W_], node.input[COL_], node.input[X_]
            del node.input[:]
            node.input.extend([x, weight, bias])
            node.op_type = "L1Conv"
            _keep_conv_attributes(node)


def drop_unused(gr: _Graph, report: FuseReport) -> None:
    while True:
        read = {i for n in gr.g.node for i in n.input} | _subgraph_reads(gr.g.node) | gr.outputs
        dead = [n for n in gr.g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        _remove(gr, dead)
    read = {i for n in gr.g.node for i in n.input} | _subgraph_reads(gr.g.node) | gr.outputs
    keep = [t for t in gr.g.initializer if t.name in read]
    del gr.g.initializer[:]
    gr.g.initializer.extend(keep)
    produced = {o for n in gr.g.node for o in n.output}
    infos = [v for v in gr.g.value_info if v.name in produced]  # none left for values that are gone
    del gr.g.value_info[:]
    gr.g.value_info.extend(infos)


PASSES = (to_fused, fold_norm, fold_relu, read_concat, split_constant_channels, unfuse_plain, drop_unused)


def fuse(model) -> tuple:
    """``(rewritten copy of model, FuseReport)``; ``model`` (an ``onnx.ModelProto``) is not changed."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    gr = _Graph(copy, model)
    report = FuseReport()
    for p in PASSES:
        p(gr, report)
        gr.refresh()
    return copy, report


# ---------------------------------------------------------------- helpers
def _shapes_or_nothing(original):
    """A function returning the shapes of ``original`` (the unchanged input of :func:`fuse`), inferred on
    first call (only the channel split needs them). The passes keep every value's name and shape, and the
    new l1fx.L1FusedConv has no schema that shape inference could use, so the input graph is the one to ask.
    onnx's inference does not see through the l1 nodes' function bodies: the shapes past them come from the
    file's value_info, which l1fx's exporter writes; without it the channel split is not done."""
    from onnx import shape_inference

    cache: list = []

    def shapes() -> dict:
        if not cache:
            try:
                cache.append(_shapes(shape_inference.infer_shapes(original)))
            except Exception:  # noqa: BLE001 - no shapes, no proof: the passes that need one change nothing
                cache.append({})
        return cache[0]

    return shapes


def _keep_conv_attributes(node) -> None:
    """Drop every attribute but the conv geometry's (strides, pads, dilations, group)."""
    keep = [a for a in node.attribute if a.name in _CONV_ATTRS]
    del node.attribute[:]
    node.attribute.extend(keep)


def _expand_of(gr: _Graph, name: str) -> Optional[str]:
    n = gr.producer.get(name)
    return n.input[0] if n is not None and n.op_type == "Expand" and n.domain in ("", "ai.onnx") else None


def _shapes(model) -> dict:
    """name -> list of dims (int, a dim_param string, or None) for every typed value of the top graph."""
    out = {}
    g = model.graph
    for v in itertools.chain(g.input, g.value_info, g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


def _remove(gr: _Graph, nodes: list) -> None:
    if not nodes:
        return
    ids = {id(n) for n in nodes}
    keep = [n for n in gr.g.node if id(n) not in ids]
    del gr.g.node[:]
    gr.g.node.extend(keep)
    gr.refresh()


def _toposort(gr: _Graph) -> None:
    """Nodes in an order where each is after what it reads (new nodes were appended at the end)."""
    available = {i.name for i in gr.g.input} | set(gr.init) | {""}
    pending, ordered = list(gr.g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # reads from an enclosing scope or a cycle: keep the rest in place
            ordered.extend(rest)
            break
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del gr.g.node[:]
    gr.g.node.extend(copies)
    gr.refresh()
