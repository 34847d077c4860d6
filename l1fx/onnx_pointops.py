"""Point-cloud helpers of PointNet++-style models as ONNX nodes (used by :func:`l1fx.export.export_onnx`).

Farthest point sampling is written as a Python loop over the sample count
(``for i in range(npoint)``), usually starting at ``torch.randint``. The
torch exporter unrolls that loop: ~10 graph nodes per iteration, each traced,
decomposed and translated (22 s for 16 + 4 samples, minutes for 512 + 128),
and a graph specialised to ``npoint``. Before exporting a ``torch.fx``
GraphModule (what :func:`l1fx.convert.convert` returns), ``export_onnx``
therefore looks at each helper function the graph calls as one node (an
``l1fx_helpers`` module or an fx-wrapped function) and, where the helper
*computes* farthest point sampling (checked by running it on the example
inputs' own values, with two seeds, against :func:`fps_reference`), replaces
the call by:

* ``l1fx.points.FarthestPointSample(xyz[B, N, C], start[B]) -> idx[B, npoint]``
  (attribute ``npoint``), whose model-local function body is one ONNX ``Loop``;
* for a random start, ``l1fx.points.FpsRandomStart(xyz) -> start[B]`` (body:
  ``RandomUniformLike`` scaled to ``[0, N)``); a start at point 0 becomes a
  constant.

Random starts and verification: onnxruntime's random numbers cannot equal
torch's, so verification runs PyTorch with the starts drawn from a fixed
generator (:class:`StartControl`) and feeds the same numbers to onnxruntime in
place of the ``FpsRandomStart`` nodes (a copy of the graph whose start nodes
are inputs, :func:`feed_random_starts`); the result says so. The file itself
keeps the random start.

Helpers that stay opaque are measured: one that makes more than
:data:`MAX_HELPER_TORCH_CALLS` torch calls on the example inputs (a Python loop
the exporter would unroll) is refused by name before the export starts.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import onnx
import torch
from onnx import TensorProto, helper
from torch import Tensor, nn

from .passes.rng import preserved_rng

DOMAIN = "l1fx.points"
DOMAIN_VERSION = 1
FPS = "FarthestPointSample"
START = "FpsRandomStart"
OP_TYPES = (FPS, START)
# A helper making more torch calls than this on the example inputs is a loop the exporter would unroll.
MAX_HELPER_TORCH_CALLS = 4000


class PointOpsError(Exception):
    """Internal: raised with a message for :class:`l1fx.export.OnnxExportError`."""


# ---------------------------------------------------------------- the reference and the torch ops
def fps_reference(xyz: Tensor, start: Tensor, npoint: int) -> Tensor:
    """Farthest point sampling of ``xyz [B, N, C]`` from ``start [B]``: indices ``[B, npoint]`` (int64).

    The usual definition: each step takes the point farthest (squared distance, first index on ties) from the
    points taken so far. The ONNX ``Loop`` body computes exactly these operations."""
    b, n = xyz.shape[0], xyz.shape[1]
    idx = torch.empty(b, npoint, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    far = start.to(torch.long)
    batch = torch.arange(b, device=xyz.device)
    for i in range(npoint):
        idx[:, i] = far
        d = xyz - xyz[batch, far][:, None]
        dist = torch.minimum(dist, (d * d).sum(-1))
        far = dist.argmax(-1)
    return idx


class StartControl:
    """Where the random FPS starts come from in PyTorch: the global RNG (default, as the user's code), or,
    inside :meth:`run`, a generator seeded with ``seed`` afresh for every forward, the draws kept in ``last``."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.last: list[Tensor] = []
        self._gen: Optional[torch.Generator] = None

    @contextlib.contextmanager
    def run(self) -> Iterator[list[Tensor]]:
        global _CONTROL
        outer, _CONTROL = _CONTROL, self
        self._gen, self.last = torch.Generator().manual_seed(self.seed), []
        try:
            yield self.last
        finally:
            _CONTROL, self._gen = outer, None

    def draw(self, n: int, b: int, device) -> Tensor:
        start = torch.randint(0, n, (b,), dtype=torch.long, generator=self._gen).to(device)
        self.last.append(start.cpu())
        return start


_CONTROL: Optional[StartControl] = None


@torch.library.custom_op("l1fx_points::fps_random_start", mutates_args=())
def _random_start(xyz: Tensor) -> Tensor:
    b, n = xyz.shape[0], xyz.shape[1]
    if _CONTROL is not None:
        return _CONTROL.draw(n, b, xyz.device)
    return torch.randint(0, n, (b,), dtype=torch.long, device=xyz.device)  # as the user's helper draws it


@_random_start.register_fake
def _(xyz):
    return xyz.new_empty((xyz.shape[0],), dtype=torch.long)


@torch.library.custom_op("l1fx_points::farthest_point_sample", mutates_args=())
def _fps(xyz: Tensor, start: Tensor, npoint: int) -> Tensor:
    return fps_reference(xyz, start, npoint)


@_fps.register_fake
def _(xyz, start, npoint):
    return xyz.new_empty((xyz.shape[0], npoint), dtype=torch.long)


def fps_random_start(xyz: Tensor, npoint: int) -> Tensor:
    """Farthest point sampling from a random start (``torch.randint``): one exportable node."""
    return torch.ops.l1fx_points.farthest_point_sample(xyz, torch.ops.l1fx_points.fps_random_start(xyz), npoint)


def fps_first_start(xyz: Tensor, npoint: int) -> Tensor:
    """Farthest point sampling from point 0: one exportable node."""
    start = torch.zeros_like(xyz[:, 0, 0], dtype=torch.long)
    return torch.ops.l1fx_points.farthest_point_sample(xyz, start, npoint)


# ---------------------------------------------------------------- recognising the helpers of a graph
@dataclass
class Replacement:
    node: str          # graph node name
    helper: str        # the helper's qualified name
    where: str         # file:line of its definition
    kind: str          # "fps-random" | "fps-first"

    def describe(self) -> str:
        start = "random start (torch.randint)" if self.kind == "fps-random" else "start at point 0"
        return (f"{self.helper} ({self.where}) recognised as farthest point sampling, {start}: exported as "
                f"{DOMAIN}.{FPS} (an ONNX Loop)")


@dataclass
class Substitution:
    model: nn.Module
    replaced: list[Replacement] = field(default_factory=list)

    @property
    def random(self) -> bool:
        return any(r.kind == "fps-random" for r in self.replaced)


def _helper_function(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[Callable]:
    """The Python function a node calls as one opaque unit, if any."""
    if node.op == "call_module":
        fn = getattr(gm.get_submodule(node.target), "fn", None)  # l1fx's OpaqueFunction modules
        return fn if inspect.isfunction(fn) else None
    if node.op == "call_function" and inspect.isfunction(node.target):
        module = getattr(node.target, "__module__", "") or ""
        if not module.startswith(("torch", "l1fx.onnx_pointops")):
            return node.target
    return None


def _where(fn: Callable) -> str:
    try:
        return f"{os.path.basename(inspect.getsourcefile(fn) or '?')}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return "?"


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


class _CallCounter(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class _Probe(torch.fx.Interpreter):
    """Runs the graph once, keeping each helper node's first arguments and its torch call count."""

    def __init__(self, gm, helpers: dict[str, Callable]):
        super().__init__(gm)
        self.helpers = helpers
        self.args: dict[str, tuple] = {}
        self.calls: dict[str, int] = {}

    def run_node(self, n):
        if n.name not in self.helpers:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        counter = _CallCounter()
        with counter:
            out = super().run_node(n)
        self.args.setdefault(n.name, (args, kwargs))
        self.calls[n.name] = max(self.calls.get(n.name, 0), counter.count)
        return out


def _probe_inputs(xyz: Tensor, npoint: int) -> list[Tensor]:
    """The example's points and clouds it may not exercise: a far point at the origin (a helper that skips
    zero rows, padding, is not FPS), another scale and offset, and more points (a helper fixed to one N)."""
    b, n = xyz.shape[0], xyz.shape[1]
    g = torch.Generator().manual_seed(0)  # not the user's generator

    def cloud(points: int, scale: float, shift: float) -> Tensor:
        return (torch.randn(b, points, 3, generator=g, dtype=torch.float64) * scale + shift).to(xyz)

    far_origin = cloud(n, 1.0, 10.0)
    far_origin[:, min(1, n - 1)] = 0.0
    return [xyz, far_origin, cloud(n, 100.0, -50.0), cloud(n + 5, 1.0, 0.0)]


def _fps_kind(fn: Callable, args: tuple, kwargs: dict) -> Optional[str]:
    """``"fps-random"`` / ``"fps-first"`` when ``fn(xyz, npoint)`` computes farthest point sampling.

    Decided by running ``fn`` on the example's points and on probe clouds (:func:`_probe_inputs`) under two
    seeds, against :func:`fps_reference`: a test, not a proof; verification then compares the exported file
    with the model on the example inputs."""
    if kwargs or len(args) != 2:
        return None
    xyz, npoint = args
    if not (isinstance(xyz, Tensor) and xyz.is_floating_point() and xyz.dim() == 3 and xyz.shape[-1] == 3
            and isinstance(npoint, int) and 0 < npoint <= xyz.shape[1]):
        return None
    kinds = {_fps_kind_on(fn, cloud, npoint) for cloud in _probe_inputs(xyz, npoint)}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else None


def _fps_kind_on(fn: Callable, xyz: Tensor, npoint: int) -> Optional[str]:
    b, n = xyz.shape[0], xyz.shape[1]
    outs, draws = [], []
    with torch.no_grad():
        for seed in (12345, 54321):
            with preserved_rng(seed=seed):  # the user's CPU and CUDA generators are left as they were
                try:
                    outs.append(fn(xyz, npoint))
                except Exception:  # noqa: BLE001 - not an FPS helper after all
                    return None
            with preserved_rng(seed=seed):
                draws.append(torch.randint(0, n, (b,), dtype=torch.long).to(xyz.device))
    if not all(isinstance(o, Tensor) and o.shape == (b, npoint) and not o.is_floating_point() for o in outs):
        return None
    first = fps_reference(xyz, torch.zeros(b, dtype=torch.long, device=xyz.device), npoint)
    if all(torch.equal(o.long(), first) for o in outs):
        return "fps-first"
    if all(torch.equal(o.long(), fps_reference(xyz, d, npoint)) for o, d in zip(outs, draws)):
        return "fps-random"
    return None


_REPLACEMENTS = {"fps-random": fps_random_start, "fps-first": fps_first_start}


def substitute(model: nn.Module, inputs: tuple[Tensor, ...]) -> Substitution:
    """``model`` with its farthest-point-sampling helpers replaced by exportable nodes (a new GraphModule that
    shares ``model``'s parameters; ``model`` is not changed). Models that are not GraphModules are returned
    as they are. Raises :class:`PointOpsError` for a helper that would unroll into too large a graph."""
    if not isinstance(model, torch.fx.GraphModule):
        return Substitution(model)
    helpers = {n.name: fn for n in model.graph.nodes if (fn := _helper_function(model, n)) is not None}
    if not helpers:
        return Substitution(model)
    probe = _Probe(model, helpers)
    with preserved_rng(), torch.no_grad():
        probe.run(*inputs)
    replaced = []
    for name, fn in helpers.items():
        if name not in probe.args:
            continue
        kind = _fps_kind(fn, *probe.args[name])
        if kind is not None:
            replaced.append(Replacement(name, _name(fn), _where(fn), kind))
        elif probe.calls.get(name, 0) > MAX_HELPER_TORCH_CALLS:
            raise PointOpsError(
                f"helper {_name(fn)} ({_where(fn)}) makes {probe.calls[name]} torch calls on the example inputs "
                f"(a Python loop over the data): torch.onnx would unroll every call into the graph (minutes of "
                f"export, a graph fixed to these sizes), so it is refused before exporting. What to do: write it "
                f"with batched tensor ops (no Python loop over points or samples); l1fx exports farthest point "
                f"sampling itself when the helper computes the standard one (start 0 or torch.randint)")
    if not replaced:
        return Substitution(model)
    graph = _copy_graph(model.graph)
    by_name = {r.node: r for r in replaced}
    for node in graph.nodes:
        if node.name in by_name:
            node.op, node.target = "call_function", _REPLACEMENTS[by_name[node.name].kind]
    new = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    new.train(model.training)
    return Substitution(new, replaced)


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


# ---------------------------------------------------------------- ONNX: schemas, translations, function bodies
def _schemas() -> list[onnx.defs.OpSchema]:
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    floats = ["tensor(float)", "tensor(double)", "tensor(float16)"]
    return [
        onnx.defs.OpSchema(
            FPS, DOMAIN, DOMAIN_VERSION, "Farthest point sampling of xyz[B, N, C] from start[B]: idx[B, npoint].",
            inputs=[P("xyz", "T", "points [B, N, C]"), P("start", "I", "first index [B]")],
            outputs=[P("idx", "I", "sampled indices [B, npoint]")],
            type_constraints=[("T", floats, "float tensors"), ("I", ["tensor(int64)"], "indices")],
            attributes=[A("npoint", onnx.defs.OpSchema.AttrType.INT, "number of samples")]),
        onnx.defs.OpSchema(
            START, DOMAIN, DOMAIN_VERSION, "A uniformly random index in [0, N) per batch element of xyz[B, N, C].",
            inputs=[P("xyz", "T", "points [B, N, C]")], outputs=[P("start", "I", "[B]")],
            type_constraints=[("T", floats, "float tensors"), ("I", ["tensor(int64)"], "indices")]),
    ]


def register_schemas() -> None:
    for schema in _schemas():
        try:
            onnx.defs.get_schema(schema.name, schema.since_version, schema.domain)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)


def translation_table() -> dict:
    """Entries of ``custom_translation_table`` for the replacement ops, and for ``aten._cdist_forward``
    (which torch.onnx cannot translate; PointNet++ ball queries and kNN use ``torch.cdist``)."""
    import onnxscript
    from onnxscript import opset18 as op

    register_schemas()
    pts = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def farthest_point_sample(xyz, start, npoint: int):
        return getattr(pts, FPS)(xyz, start, npoint=npoint)

    def fps_random_start(xyz):
        return getattr(pts, START)(xyz)

    def cdist(x1, x2, p: float = 2.0, compute_mode=None):
        # Exact differences (not the |a|^2 + |b|^2 - 2ab expansion): [.., N, 1, C] - [.., 1, M, C].
        d = op.Sub(op.Unsqueeze(x1, op.Constant(value_ints=[-2])), op.Unsqueeze(x2, op.Constant(value_ints=[-3])))
        axes = op.Constant(value_ints=[-1])
        if p == 2.0:
            return op.Sqrt(op.ReduceSum(op.Mul(d, d), axes, keepdims=0))
        if p == 1.0:
            return op.ReduceSum(op.Abs(d), axes, keepdims=0)
        if p == float("inf"):
            return op.ReduceMax(op.Abs(d), axes, keepdims=0)
        power = op.CastLike(op.Constant(value_float=float(p)), x1)
        inverse = op.CastLike(op.Constant(value_float=1.0 / float(p)), x1)
        return op.Pow(op.ReduceSum(op.Pow(op.Abs(d), power), axes, keepdims=0), inverse)

    return {torch.ops.l1fx_points.farthest_point_sample.default: farthest_point_sample,
            torch.ops.l1fx_points.fps_random_start.default: fps_random_start,
            torch.ops.aten._cdist_forward.default: cdist}


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                             [len(values)], values))


def fps_function(opset: int) -> onnx.FunctionProto:
    """``FarthestPointSample`` as one ``Loop`` over ``npoint``: the operations of :func:`fps_reference`."""
    n = helper.make_node
    body_nodes = [
        _ints("b_axis12", [1, 2]), _ints("b_last", [-1]),
        n("Identity", ["cond_in"], ["cond_out"]),
        n("Identity", ["far"], ["taken"]),                               # scan output: this step's index
        n("Unsqueeze", ["far", "b_axis12"], ["far3"]),                    # [B, 1, 1]
        n("Shape", ["xyz"], ["c"], start=2),
        n("Shape", ["far3"], ["b11"], start=0, end=2),
        n("Concat", ["b11", "c"], ["g_shape"], axis=0),                   # [B, 1, C]
        n("Expand", ["far3", "g_shape"], ["far_c"]),
        n("GatherElements", ["xyz", "far_c"], ["centre"], axis=1),       # [B, 1, C]
        n("Sub", ["xyz", "centre"], ["d"]),
        n("Mul", ["d", "d"], ["d2"]),
        n("ReduceSum", ["d2", "b_last"], ["sq"], keepdims=0),            # [B, N]
        n("Min", ["dist", "sq"], ["dist_out"]),
        n("ArgMax", ["dist_out"], ["far_out"], axis=-1, keepdims=0),      # first index on ties, as torch
    ]
    u = onnx.ValueInfoProto
    body = helper.make_graph(
        body_nodes, "fps_step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), u(name="dist"), u(name="far")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), u(name="dist_out"), u(name="far_out"),
         u(name="taken")])
    npoint = onnx.AttributeProto(name="value_int", ref_attr_name="npoint", type=onnx.AttributeProto.INT)
    count = n("Constant", [], ["count"])
    count.attribute.append(npoint)
    nodes = [
        count,
        n("Constant", [], ["inf"], value=helper.make_tensor("inf", TensorProto.FLOAT, [1], [float("inf")])),
        n("Constant", [], ["true"], value=helper.make_tensor("true", TensorProto.BOOL, [], [True])),
        n("Shape", ["xyz"], ["bn"], start=0, end=2),
        n("Expand", ["inf", "bn"], ["inf_bn"]),
        n("CastLike", ["inf_bn", "xyz"], ["dist0"]),                      # [B, N] of +inf
        n("Loop", ["count", "true", "dist0", "start"], ["dist_end", "far_end", "steps"], body=body),
        n("Transpose", ["steps"], ["idx"], perm=[1, 0]),                  # [npoint, B] -> [B, npoint]
    ]
    return helper.make_function(DOMAIN, FPS, ["xyz", "start"], ["idx"], nodes, [helper.make_opsetid("", opset)],
                                attributes=["npoint"])


def start_function(opset: int) -> onnx.FunctionProto:
    """``FpsRandomStart``: ``min(floor(u * N), N - 1)`` with ``u`` uniform in [0, 1), one per batch element."""
    n = helper.make_node
    nodes = [
        _ints("one", [1]),
        n("Shape", ["xyz"], ["b"], start=0, end=1),
        n("Shape", ["xyz"], ["n"], start=1, end=2),
        n("ConstantOfShape", ["b"], ["zeros"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        n("RandomUniformLike", ["zeros"], ["u"], dtype=TensorProto.FLOAT),
        n("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        n("Mul", ["u", "nf"], ["scaled"]),
        n("Floor", ["scaled"], ["fl"]),
        n("Cast", ["fl"], ["i"], to=TensorProto.INT64),
        n("Sub", ["n", "one"], ["last"]),
        n("Min", ["i", "last"], ["start"]),
    ]
    return helper.make_function(DOMAIN, START, ["xyz"], ["start"], nodes, [helper.make_opsetid("", opset)])


def functions_used(model_proto: onnx.ModelProto, opset: int) -> list[onnx.FunctionProto]:
    used = {nd.op_type for nd in model_proto.graph.node if nd.domain == DOMAIN}
    builders = {FPS: fps_function, START: start_function}
    return [builders[t](opset) for t in OP_TYPES if t in used]


def random_start_nodes(model_proto: onnx.ModelProto) -> list[str]:
    """Output names of the graph's ``FpsRandomStart`` nodes, in graph order."""
    return [nd.output[0] for nd in model_proto.graph.node if nd.domain == DOMAIN and nd.op_type == START]


def feed_random_starts(model_proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the model whose ``FpsRandomStart`` nodes are graph inputs (for verification against PyTorch's
    draws); returns it and the new inputs' names in graph order."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model_proto)
    names = []
    keep = []
    for nd in copy.graph.node:
        if nd.domain == DOMAIN and nd.op_type == START:
            names.append(nd.output[0])
            copy.graph.input.append(helper.make_tensor_value_info(nd.output[0], TensorProto.INT64, [None]))
        else:
            keep.append(nd)
    del copy.graph.node[:]
    copy.graph.node.extend(keep)
    return copy, names
