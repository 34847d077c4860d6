"""Analyse pass: find the inner-product layers, group them into units and order them.

The fx graph becomes a networkx DiGraph (one vertex per fx node, edges from
inputs to users). Candidates are the layer kinds of :mod:`l1fx.layers`: modules
of a registered kind (``nn.Linear``/``nn.Conv1d/2d/3d``; ``nn.ConvTranspose*d``
are listed and skipped) called in the graph, and calls of a kind's functions
(``F.linear``/``F.conv1d/2d/3d``) whose weight is a model parameter (a
``get_attr`` node). Pointwise candidates (Linear,
kernel-1 Conv1d, 1x1 Conv2d, 1x1x1 Conv3d; stride 1, no padding, groups 1)
that are joined only through normalisation, activation or dropout form one
shared-MLP unit; every other candidate is a unit of its own. Units are
ordered by their depth from the inputs (longest path, in fx nodes).

Layers inside swapped (untraced) modules have no graph: they are ordered by
where their swapped module sits in the graph, then by registration order, and
consecutive pointwise layers of one container form a shared-MLP unit.

With ``example_inputs`` the model is run once (eval mode, no grad, RNG state
restored) and the multiply-accumulates of every candidate are recorded per
layer (the kind's ``macs``, by default the registry's :func:`l1fx.layers.count_macs`):
modules through forward hooks, functional calls under a TorchFunctionMode,
matched to their call site; layers that share a weight each get their own
count. The output shapes are kept for verify.
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

from l1fx import layers
from l1fx._util import evaluating
from l1fx.nn import L1FunctionalCall, L1Module, L1OutputNorm

from .rng import preserved_rng
from .state import Candidate, ConversionState, Unit
from .status import CandidateKind, Region, UnitKind
from .trace import HELPERS, OpaqueFunction

__all__ = ["analyse", "build_nx_graph", "find_candidates", "group_units", "measure", "JOINER_MODULES",
           "NORM_MODULES", "FUNCTIONS"]

# {call_function target: layer kind name}, live over the registry (F.linear -> "linear", ...).
FUNCTIONS = layers.FunctionNames()

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
    """The op label of a module of a registered kind ("Conv2d"; "F.conv2d" for a converted call), or None."""
    spec = layers.spec_for_module(m)
    if spec is None:
        return None
    return spec.function_op if isinstance(m, L1FunctionalCall) else spec.label(m)


def skip_reason(m: nn.Module) -> Optional[str]:
    """Why a dense module cannot become an l1 layer, or None."""
    if isinstance(m, L1Module):
        return None
    spec = layers.spec_for_module(m)
    if spec is not None and spec.unsupported:
        return spec.unsupported
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return "lazy module not initialised yet: run one forward pass before converting"
    if spec is None:
        return "not an inner-product layer"
    dense = spec.module
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
    spec = layers.spec_for_module(m)
    return spec is not None and not spec.unsupported and bool(spec.pointwise_module(m))


def _pointwise_call(op: str, node: fx.Node, weight: torch.Tensor) -> bool:
    """Whether the call ``node`` of kind ``op`` ("linear", "conv2d") with ``weight`` is pointwise."""
    return bool(layers.get(op).pointwise_call(node.args, node.kwargs, weight))


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
                c = _module_candidate(node.target, m, op, Region.TRACED, key + (registration.get(id(m), 0),))
                c.node = node.name
                if isinstance(m, L1FunctionalCall):  # converted before: same unit as the first time
                    c.pointwise = _pointwise_call(m.op, node, params[m.weight_name])
                out.append(c)
            elif node.op == "call_function" and (spec := layers.spec_for_function(node.target)) is not None:
                w = spec.weight_of(node.args, node.kwargs)
                if not (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(params.get(w.target), nn.Parameter)):
                    continue  # weight computed in forward (hypernetworks, T-Net products): not a layer
                weight = params[w.target]
                c = Candidate(name=w.target, kind=CandidateKind.FUNCTION, op=spec.function_op, region=Region.TRACED,
                              node=node.name, order=key + (0,))
                c.pointwise = not spec.unsupported and _pointwise_call(spec.name, node, weight)
                if spec.unsupported:
                    c.skip = spec.unsupported
                elif not weight.is_floating_point():
                    c.skip = f"unsupported weight dtype {weight.dtype}"
                out.append(c)
        for leaf, key in leaves.items():
            out.extend(_swapped_candidates(root, leaf, key, seen, registration))
        # Layers never called as modules in the graph (unused, or weights applied functionally).
        opaque_users = _opaque_weight_users(gm)
        # a subclass traced through (torchvision's Conv3DSimple(nn.Conv3d)) is its F.conv3d call's row
        called = {c.name for c in out if c.kind == CandidateKind.FUNCTION}
        for name, m in root.named_modules():
            if id(m) in seen or name.startswith(HELPERS) or _module_op(m) is None or _inside(name, leaves):
                continue
            if f"{name}.weight" in called:
                continue
            seen.add(id(m))
            c = _module_candidate(name, m, _module_op(m), Region.TRACED, (math.inf, math.inf, registration[id(m)]))
            fn = opaque_users.get(f"{name}.weight")
            if fn is not None:  # e.g. torchvision's fx-wrapped shifted_window_attention(x, qkv.weight, ...)
                c.skip = (f"left dense: its weight is used inside {fn}, a function called as one graph node "
                          f"(torch.fx.wrap or untraceable); it runs as an inner product")
            c.skip = c.skip or "not called as a module in forward (unused, or its weight is applied functionally)"
            out.append(c)
    else:
        out.extend(_swapped_candidates(root, "", (0, 0), seen, registration))
    return out


def _opaque_weight_users(gm: fx.GraphModule) -> dict[str, str]:
    """Parameter name -> the function (not a layer kind's) whose graph node receives it as an argument."""
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        for user in node.users:
            if user.op == "call_function" and layers.spec_for_function(user.target) is None \
                    and getattr(user.target, "__module__", "") not in ("_operator", "operator") \
                    and not str(getattr(user.target, "__module__", "")).startswith("torch"):
                out.setdefault(node.target, getattr(user.target, "__qualname__", str(user.target)))
            elif user.op == "call_module" and user.target.startswith(HELPERS + "."):
                fn = getattr(gm.get_submodule(user.target), "fn", None)
                out.setdefault(node.target, getattr(fn, "__qualname__", user.target))
    return out


def _inside(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_candidate(name: str, m: nn.Module, op: str, region: str, order: tuple) -> Candidate:
    kind = CandidateKind.FUNCTION if isinstance(m, L1FunctionalCall) else CandidateKind.MODULE
    c = Candidate(name=name, kind=kind, op=op,
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
        kind = UnitKind.SHARED_MLP if len(members) > 1 or members[0].pointwise else UnitKind.SINGLE
        for c in members:
            c.unit = i
        units.append(Unit(index=i, members=members, kind=kind))
    return units


# ------------------------------------------------------------------ measurement
L1_OPS = layers.l1_op_overloads()  # the l1 custom ops (as the registry had them at import)


class _Recorder(TorchFunctionMode):
    """MACs per candidate, and which candidates' outputs feed a normalisation directly.

    Counted per layer, not per weight, so layers sharing one Parameter (weight
    ties) each get their own MACs: a module candidate is counted by forward
    hooks on that module (its output and weight shapes, the kind's
    ``macs``); a functional candidate by its calls under this mode, matched
    by weight and, when several call sites use one weight, in graph order.
    Calls inside a module candidate's forward belong to that module.
    """

    def __init__(self, sites: dict[int, list[int]]) -> None:
        super().__init__()
        self.sites = sites  # id(weight) -> functional candidate indices, in graph order
        self.calls: dict[int, int] = {}  # id(weight) -> calls seen so far
        self.kinds = {f: s for s in layers.specs() for f in s.functions}
        self.macs: dict[int, int] = {}  # candidate index -> MACs
        self.produced: dict[int, int] = {}  # id(output tensor) -> candidate index
        self.keep: list = []  # keep outputs alive so their ids stay unique during the run
        self.normed: set[int] = set()
        self.inside = 0  # depth of module candidates being run

    def count(self, index: int, macs: int, out: Any) -> None:
        self.macs[index] = self.macs.get(index, 0) + macs
        if isinstance(out, torch.Tensor):
            self.produced[id(out)] = index
            self.keep.append(out)

    def hooks(self, module: nn.Module, index: int, spec: layers.LayerSpec) -> list:
        """Count one module candidate from its own calls (pre hook: enter, hook: count and leave)."""
        def enter(m, args):
            self.inside += 1

        def leave(m, args, out):
            self.inside -= 1
            w = getattr(m, "weight", None)
            x = args[0] if args else None
            if isinstance(out, torch.Tensor) and isinstance(w, torch.Tensor):
                self.count(index, spec.macs(out.shape, w.shape, _shape(x)), out)

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = args[0] if args else kwargs.get("input")
        spec = self.kinds.get(func)
        if spec is not None:
            w = spec.weight_of(args, kwargs)
            sites = self.sites.get(id(w))
            if sites and not self.inside and isinstance(out, torch.Tensor):
                k = self.calls.get(id(w), 0)
                self.calls[id(w)] = k + 1
                self.count(sites[k % len(sites)], spec.macs(out.shape, w.shape, _shape(first)), out)
        elif func in PASS_THROUGH_FUNCTIONS and id(first) in self.produced and isinstance(out, torch.Tensor):
            self.produced[id(out)] = self.produced[id(first)]
            self.keep.append(out)
        elif func in NORM_FUNCTIONS and id(first) in self.produced:
            self.normed.add(self.produced[id(first)])
        return out


def _shape(x: Any) -> Optional[tuple]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def _shapes(out: Any) -> Any:
    return fx.node.map_aggregate(out, lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__)


def run_example(model: nn.Module, example_inputs) -> Any:
    """Run ``model`` on ``example_inputs`` in eval mode without grad, leaving RNG and train flags as they were."""
    with evaluating(model), preserved_rng(seed=0):
        return model(*example_inputs)


def measure(state: ConversionState) -> None:
    """MACs per candidate and the original output shapes, from one run on example_inputs."""
    inputs = state.config.example_inputs
    root = state.root
    sites: dict[int, list[int]] = {}
    modules: list[tuple[nn.Module, int]] = []
    for i, c in enumerate(state.candidates):
        if c.skip:
            continue
        if c.kind == CandidateKind.FUNCTION and c.module_path is None:  # a call node on a parameter
            sites.setdefault(id(root.get_parameter(c.name)), []).append(i)
        else:  # a module, or an L1FunctionalCall module (a functional call converted before)
            modules.append((root.get_submodule(c.module_path or c.name), i))
    recorder = _Recorder(sites)
    handles = [h for m, i in modules for h in recorder.hooks(m, i, layers.spec_for_module(m))]
    try:
        with recorder:
            out = run_example(state.model, inputs)
    except Exception as e:
        raise RuntimeError(
            f"l1fx.convert: running {type(state.model).__name__} on example_inputs failed "
            f"({type(e).__name__}: {e}); pass inputs the model accepts as a tuple, e.g. (points,)"
        ) from e
    finally:
        for h in handles:
            h.remove()
    state.original_outputs = _shapes(out)
    for i, c in enumerate(state.candidates):
        c.macs = recorder.macs.get(i, 0)
        c.measured_norm = i in recorder.normed


def _candidate_kind(root: nn.Module, c: Candidate) -> Optional[str]:
    if c.kind == CandidateKind.FUNCTION:
        spec = next((s for s in layers.specs() if s.function_op == c.op), None)
    else:
        spec = layers.spec_for_module(root.get_submodule(c.name))
    return spec.name if spec is not None else None


def _skip_kinds_without_variant(state: ConversionState) -> None:
    """With ``p != 1``, a kind that has no ℓp layer (transposed convolutions) stays dense, with the reason."""
    p = getattr(state.config, "p", 1.0)
    if p == 1.0:
        return
    for c in state.candidates:
        if c.skip or c.already_l1:
            continue
        kind = _candidate_kind(state.root, c)
        if kind is not None and not layers.has_replacement(kind, "lp"):
            c.skip = f"no lp layer for {kind} (p={p:g}): left dense; p=1 converts it to an l1 layer"


def analyse(state: ConversionState) -> ConversionState:
    """Pass 2: candidates, units and their order (and MACs/shapes with example_inputs)."""
    gm = state.trace.graph_module if state.trace else None
    state.graph = build_nx_graph(gm) if gm is not None else None
    state.candidates = find_candidates(state)
    _skip_kinds_without_variant(state)
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
