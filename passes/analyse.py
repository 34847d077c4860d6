"""Analyse pass: find the inner-product layers, group them into units and order them.

The fx graph becomes a networkx DiGraph (one vertex per fx node, edges from
inputs to users). Candidates are ``nn.Linear``/``nn.Conv1d/2d/3d`` modules
called in the graph and ``F.linear``/``F.conv1d/2d/3d`` calls whose weight is
a model parameter (a ``get_attr`` node). Pointwise candidates (Linear,
kernel-1 Conv1d, 1x1 Conv2d, 1x1x1 Conv3d; stride 1, no padding, groups 1)
that are joined only through normalisation, activation or dropout form one
shared-MLP unit; every other candidate is a unit of its own. Units are
ordered by their depth from the inputs (longest path, in fx nodes).

Layers inside swapped (untraced) modules have no graph: they are ordered by
where their swapped module sits in the graph, then by registration order, and
consecutive pointwise layers of one container form a shared-MLP unit.

With ``example_inputs`` the model is run once (eval mode, no grad, RNG state
restored) under a TorchFunctionMode that records the multiply-accumulates of
every linear/convolution call per weight, and the output shapes for verify.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from l1fx.nn import DENSE_TO_L1, L1FunctionalCall, L1Module, L1OutputNorm

from .state import Candidate, ConversionState, Unit
from .trace import HELPERS, OpaqueFunction

__all__ = ["analyse", "build_nx_graph", "find_candidates", "group_units", "measure", "JOINER_MODULES",
           "NORM_MODULES", "FUNCTIONS"]

FUNCTIONS = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d"}

NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, L1OutputNorm)
_ACTIVATION_MODULES = tuple(
    cls for cls in vars(nn.modules.activation).values()
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls is not nn.MultiheadAttention
    and cls.__module__ == nn.modules.activation.__name__ and cls not in (nn.Softmax, nn.Softmin, nn.LogSoftmax,
                                                                         nn.Softmax2d)
)
_DROPOUT_MODULES = (nn.modules.dropout._DropoutNd, nn.Identity)
JOINER_MODULES = NORM_MODULES + _ACTIVATION_MODULES + _DROPOUT_MODULES

NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, torch.batch_norm, torch.layer_norm,
                  torch.group_norm, torch.instance_norm}
_ACTIVATION_FUNCTIONS = {F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.gelu, F.silu, F.elu, F.selu,
                         F.celu, F.hardtanh, F.hardswish, F.mish, F.softplus, F.tanh, F.sigmoid, F.prelu,
                         torch.relu, torch.relu_, torch.tanh, torch.sigmoid, torch.selu}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout}
JOINER_FUNCTIONS = NORM_FUNCTIONS | _ACTIVATION_FUNCTIONS | _DROPOUT_FUNCTIONS
JOINER_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
PASS_THROUGH_MODULES = _DROPOUT_MODULES
PASS_THROUGH_FUNCTIONS = _DROPOUT_FUNCTIONS


# ------------------------------------------------------------------ candidates
def _module_op(m: nn.Module) -> Optional[str]:
    if isinstance(m, L1FunctionalCall):
        return f"F.{m.op}"
    for dense, l1 in DENSE_TO_L1.items():
        if isinstance(m, (dense, l1)):
            return dense.__name__
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return type(m).__name__
    return None


def skip_reason(m: nn.Module) -> Optional[str]:
    """Why a dense module cannot become an l1 layer, or None."""
    if isinstance(m, L1Module):
        return None
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "transposed convolution has no l1 analogue"
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return "lazy module not initialised yet: run one forward pass before converting"
    dense = next((d for d in DENSE_TO_L1 if isinstance(m, d)), None)
    if dense is None:
        return "not an inner-product layer"
    if torch.nn.utils.parametrize.is_parametrized(m) or any(
            type(h).__name__ in ("WeightNorm", "SpectralNorm") for h in m._forward_pre_hooks.values()):
        return ("weight is reparametrized (weight_norm/spectral_norm/parametrize); converting would drop that: "
                "remove it first (torch.nn.utils.parametrize.remove_parametrizations) or leave the layer dense")
    if type(m).forward is not dense.forward:
        return f"subclass {type(m).__name__} overrides {dense.__name__}.forward; converting would drop its logic"
    if not m.weight.is_floating_point():
        return f"unsupported weight dtype {m.weight.dtype} (l1 layers need floating point)"
    if m.weight.is_meta:
        return "weights on the meta device"
    return None


def _pointwise_module(m: nn.Module) -> bool:
    if isinstance(m, (nn.Linear, DENSE_TO_L1[nn.Linear])):
        return True
    if isinstance(m, L1FunctionalCall):
        return m.op == "linear"
    if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
        return (all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride) and m.groups == 1
                and (m.padding == "valid" or m.padding == "same" or all(p == 0 for p in m.padding)))
    return False


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pointwise_call(op: str, node: fx.Node, weight: torch.Tensor) -> bool:
    if op == "linear":
        return True
    stride, padding, groups = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0), _arg(node, 6, "groups", 1)

    def all_eq(v, want):
        return v == want if isinstance(v, int) else isinstance(v, (tuple, list)) and all(e == want for e in v)

    return (all(k == 1 for k in weight.shape[2:]) and all_eq(stride, 1) and groups == 1
            and (padding in ("valid", "same") or all_eq(padding, 0)))


def _param_names(root: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in root.named_parameters(remove_duplicate=True)}


def find_candidates(state: ConversionState) -> list[Candidate]:
    """Traced candidates (from the graph), then candidates inside swapped regions."""
    root = state.root
    gm = state.trace.graph_module if state.trace else None
    out: list[Candidate] = []
    seen: set[int] = set()
    registration = {id(m): i for i, (_, m) in enumerate(root.named_modules())}
    if gm is not None:
        graph = state.graph
        depth, topo = graph.graph["depth"], graph.graph["topo"]
        params = dict(gm.named_parameters(remove_duplicate=False))
        leaves = {}
        for node in gm.graph.nodes:
            key = (depth[node.name], topo[node.name])
            if node.op == "call_module":
                m = gm.get_submodule(node.target)
                if isinstance(m, (OpaqueFunction, L1OutputNorm)):
                    continue
                if node.target in state.trace.leaves:
                    leaves.setdefault(node.target, key)
                    continue
                op = _module_op(m)
                if op is None or id(m) in seen:
                    continue
                seen.add(id(m))
                c = _module_candidate(node.target, m, op, "traced", key + (registration.get(id(m), 0),))
                c.node = node.name
                if isinstance(m, L1FunctionalCall):  # converted before: same unit as the first time
                    c.pointwise = _pointwise_call(m.op, node, params[m.weight_name])
                out.append(c)
            elif node.op == "call_function" and node.target in FUNCTIONS:
                w = _arg(node, 1, "weight")
                if not (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(params.get(w.target), nn.Parameter)):
                    continue  # weight computed in forward (hypernetworks, T-Net products): not a layer
                weight = params[w.target]
                c = Candidate(name=w.target, kind="function", op=f"F.{FUNCTIONS[node.target]}", region="traced",
                              node=node.name, order=key + (0,))
                c.pointwise = _pointwise_call(FUNCTIONS[node.target], node, weight)
                if not weight.is_floating_point():
                    c.skip = f"unsupported weight dtype {weight.dtype}"
                out.append(c)
        for leaf, key in leaves.items():
            out.extend(_swapped_candidates(root, leaf, key, seen, registration))
        # Layers never called as modules in the graph (unused, or weights applied functionally).
        for name, m in root.named_modules():
            if id(m) in seen or name.startswith(HELPERS) or _module_op(m) is None or _inside(name, leaves):
                continue
            seen.add(id(m))
            c = _module_candidate(name, m, _module_op(m), "traced", (math.inf, math.inf, registration[id(m)]))
            c.skip = c.skip or "not called as a module in forward (unused, or its weight is applied functionally)"
            out.append(c)
    else:
        out.extend(_swapped_candidates(root, "", (0, 0), seen, registration))
    return out


def _inside(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_candidate(name: str, m: nn.Module, op: str, region: str, order: tuple) -> Candidate:
    c = Candidate(name=name, kind="function" if isinstance(m, L1FunctionalCall) else "module", op=op,
                  region=region, order=order)
    c.already_l1 = isinstance(m, L1Module)
    c.skip = skip_reason(m)
    c.pointwise = c.skip is None and _pointwise_module(m)
    if isinstance(m, L1FunctionalCall):
        c.name = m.weight_name
        c.module_path = name
    return c


def _swapped_candidates(root: nn.Module, region: str, key: tuple, seen: set, registration: dict) -> list[Candidate]:
    base = root.get_submodule(region) if region else root
    out = []
    for sub, m in base.named_modules():
        name = f"{region}.{sub}" if region and sub else (region or sub)
        if not sub and region:
            continue
        op = _module_op(m)
        if op is None or id(m) in seen or name.startswith(HELPERS):
            continue
        seen.add(id(m))
        out.append(_module_candidate(name, m, op, region, key + (registration.get(id(m), 0),)))
    return out


# ------------------------------------------------------------------ graph and units
def build_nx_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The fx graph as a networkx DiGraph, with per-node depth (longest path from the inputs).

    Output normalisations inserted by an earlier conversion count zero, so a
    converted model has the same depths (and the same selection) as the original.
    """
    g = nx.DiGraph()
    inserted = set()
    for i, node in enumerate(gm.graph.nodes):
        g.add_node(node.name, op=node.op, target=node.target, index=i)
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), L1OutputNorm):
            inserted.add(node.name)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    depth = {}
    for n in nx.topological_sort(g):
        depth[n] = max((depth[p] + (p not in inserted) for p in g.predecessors(n)), default=0)
    g.graph["depth"] = depth
    g.graph["topo"] = {n: d["index"] for n, d in g.nodes(data=True)}
    return g


def _is_joiner(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), JOINER_MODULES)
    if node.op == "call_function":
        return node.target in JOINER_FUNCTIONS
    if node.op == "call_method":
        return node.target in JOINER_METHODS
    return False


def group_units(state: ConversionState) -> list[Unit]:
    """Shared-MLP chains and single layers, ordered by depth from the inputs."""
    live = [c for c in state.candidates if not c.skip and c.order[0] != math.inf]
    links = nx.Graph()
    links.add_nodes_from(c.name for c in live if c.pointwise)
    gm = state.trace.graph_module if state.trace else None
    if gm is not None:
        by_node = {c.node: c for c in live if c.traced and c.pointwise}
        nodes = {n.name: n for n in gm.graph.nodes}
        for c in by_node.values():
            stack, visited = [nodes[c.node]], set()
            while stack:
                for user in stack.pop().users:
                    if user.name in visited:
                        continue
                    visited.add(user.name)
                    if user.name in by_node:
                        links.add_edge(c.name, by_node[user.name].name)
                    elif _is_joiner(gm, user):
                        stack.append(user)
    # Swapped regions: consecutive pointwise layers of one type in one container (registration order).
    swapped = sorted((c for c in live if not c.traced), key=lambda c: c.order)
    for a, b in zip(swapped, swapped[1:]):
        if (a.pointwise and b.pointwise and a.region == b.region and a.op == b.op
                and a.name.rpartition(".")[0] == b.name.rpartition(".")[0]):
            links.add_edge(a.name, b.name)
    by_name = {c.name: c for c in live}
    groups = [sorted((by_name[n] for n in comp), key=lambda c: c.order) for comp in nx.connected_components(links)]
    groups += [[c] for c in live if not c.pointwise]
    groups.sort(key=lambda members: min(c.order for c in members))
    units = []
    for i, members in enumerate(groups):
        kind = "shared-mlp" if len(members) > 1 or members[0].pointwise else "single"
        for c in members:
            c.unit = i
        units.append(Unit(index=i, members=members, kind=kind))
    return units


# ------------------------------------------------------------------ measurement
L1_OPS = (torch.ops.l1fx.linear.default, torch.ops.l1fx.conv.default)


class _Recorder(TorchFunctionMode):
    """MACs per candidate weight, and which candidates' outputs feed a normalisation directly."""

    def __init__(self, weights: dict[int, str]) -> None:
        super().__init__()
        self.weights = weights
        self.macs: dict[str, int] = {}
        self.produced: dict[int, str] = {}  # id(output tensor) -> candidate name
        self.keep: list = []  # keep outputs alive so their ids stay unique during the run
        self.normed: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = args[0] if args else kwargs.get("input")
        if func in FUNCTIONS or func in L1_OPS:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.weights.get(id(w))
            if name is not None and isinstance(out, torch.Tensor):
                self.macs[name] = self.macs.get(name, 0) + out.numel() * math.prod(w.shape[1:])
                self.produced[id(out)] = name
                self.keep.append(out)
        elif func in PASS_THROUGH_FUNCTIONS and id(first) in self.produced and isinstance(out, torch.Tensor):
            self.produced[id(out)] = self.produced[id(first)]
            self.keep.append(out)
        elif func in NORM_FUNCTIONS and id(first) in self.produced:
            self.normed.add(self.produced[id(first)])
        return out


def _shapes(out: Any) -> Any:
    return fx.node.map_aggregate(out, lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__)


def run_example(model: nn.Module, example_inputs) -> Any:
    """Run ``model`` on ``example_inputs`` in eval mode without grad, leaving RNG and train flags as they were."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return model(*example_inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def measure(state: ConversionState) -> None:
    """MACs per candidate and the original output shapes, from one run on example_inputs."""
    inputs = state.config.example_inputs
    root = state.root
    weights = {}
    for c in state.candidates:
        if c.skip:
            continue
        if c.kind == "function":
            p = root.get_parameter(c.name)
        else:
            p = getattr(root.get_submodule(c.name), "weight", None)
        if isinstance(p, torch.Tensor):
            weights[id(p)] = c.name
    recorder = _Recorder(weights)
    try:
        with recorder:
            out = run_example(state.model, inputs)
    except Exception as e:
        raise RuntimeError(
            f"l1fx.convert: running {type(state.model).__name__} on example_inputs failed "
            f"({type(e).__name__}: {e}); pass inputs the model accepts as a tuple, e.g. (points,)"
        ) from e
    state.original_outputs = _shapes(out)
    for c in state.candidates:
        c.macs = recorder.macs.get(c.name, 0)
        c.measured_norm = c.name in recorder.normed


def analyse(state: ConversionState) -> ConversionState:
    """Pass 2: candidates, units and their order (and MACs/shapes with example_inputs)."""
    gm = state.trace.graph_module if state.trace else None
    state.graph = build_nx_graph(gm) if gm is not None else None
    state.candidates = find_candidates(state)
    state.units = group_units(state)
    if gm is None:
        state.order_note = "no graph: units follow module registration order"
    elif state.trace.leaves:
        state.order_note = ("depth from the inputs; inside swapped modules, registration order "
                            f"({', '.join(state.trace.leaves)})")
    else:
        state.order_note = "depth from the inputs"
    if getattr(state.config, "example_inputs", None) is not None:
        measure(state)
    return state
