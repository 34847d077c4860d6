"""Rewrite pass: selected layers become l1 layers, with output normalisation where needed.

* A selected module is replaced by its ``l1fx.nn`` counterpart under the same
  qualified name, everywhere it is referenced, so every original ``state_dict``
  key keeps its shape. The new layer uses the dense layer's own Parameter
  objects (``from_dense(share_parameters=True)``), so weights tied to anything
  else (an embedding, a kept layer, another converted layer) stay one Parameter.
* A selected ``F.linear``/``F.conv*d`` call node becomes a call of an
  :class:`l1fx.nn.L1FunctionalCall` module (registered under ``l1fx_calls``;
  it owns no parameters) with the same arguments.
* ``normalize="auto"``: a converted layer whose output does not go (through
  dropout/identity only) into a normalisation layer gets an
  :class:`l1fx.nn.L1OutputNorm` child named ``l1fx_norm``; in the graph it is a
  new node after the layer, in swapped regions a forward hook applies it.
  Its keys (``<layer>.l1fx_norm.*``) cannot collide with original keys,
  because the original layer had only ``weight`` and ``bias``.

Layers already l1 are left as they are, so converting twice changes nothing.
"""
from __future__ import annotations

import contextlib
import re
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from l1fx import layers
from l1fx.errors import ConversionError
from l1fx.nn import L1FunctionalCall, L1OutputNorm, LpFunctionalCall, l1_output_norm_hook

from .analyse import NORM_FUNCTIONS, NORM_MODULES, PASS_THROUGH_FUNCTIONS, PASS_THROUGH_MODULES
from .state import Candidate, ConversionFailed, ConversionState
from .status import CandidateKind, Normalize, Status
from .trace import first_line

__all__ = ["rewrite", "swap_module", "CALLS", "NORM_NAME"]

CALLS = "l1fx_calls"  # root attribute holding L1FunctionalCall modules
NORM_NAME = "l1fx_norm"


def swap_module(roots: list[nn.Module], old: nn.Module, new: nn.Module) -> int:
    """Replace ``old`` by ``new`` at every place it is registered under any of ``roots``."""
    places = set()
    for root in roots:
        for _, parent in root.named_modules(remove_duplicate=False):
            for attr, child in parent._modules.items():
                if child is old:
                    places.add((id(parent), attr, parent))
    for _, attr, parent in places:
        parent._modules[attr] = new
    return len(places)


def _to_l1(m: nn.Module, name: str, p: float = 1.0) -> nn.Module:
    """The l1 layer for ``m``, using ``m``'s own Parameter and buffer objects.

    Reusing the objects (rather than copying) keeps every tie: to an embedding
    (``head.weight = emb.weight``), to a layer that stays dense, between two
    converted layers, and in swapped regions as in the graph.
    """
    # p = 1: the registry's "l1" variant; any other p its "lp" variant (l1fx/layers/lp.py)
    new = (layers.build_replacement(m, share_parameters=True) if p == 1.0
           else layers.build_replacement(m, "lp", p=p, share_parameters=True))
    new.l1fx_name = name
    # anything else registered on the dense layer (an extra parameter, buffer or child) stays, same object
    for registry in ("_parameters", "_buffers", "_modules"):
        theirs, ours = getattr(m, registry), getattr(new, registry)
        for key, value in theirs.items():
            if key not in ours:
                ours[key] = value
    new._non_persistent_buffers_set |= m._non_persistent_buffers_set
    # keep user-visible hooks (e.g. feature extraction) on the new layer
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
        getattr(new, hooks).update(getattr(m, hooks))
    return new


def _convert_function(gm: fx.GraphModule, c: Candidate, p: float = 1.0) -> None:
    node = next(n for n in gm.graph.nodes if n.name == c.node)
    holder = getattr(gm, CALLS, None)
    if holder is None:
        holder = nn.Module()
        gm.add_module(CALLS, holder)
    key = node.name
    spec = layers.spec_for_function(node.target)
    call = (L1FunctionalCall(spec.name, c.name, gm.get_parameter(c.name)) if p == 1.0
            else LpFunctionalCall(spec.name, c.name, gm.get_parameter(c.name), p=p))
    holder.add_module(key, call)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(f"{CALLS}.{key}", node.args, node.kwargs)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    c.node = new.name
    c.module_path = f"{CALLS}.{key}"


# ------------------------------------------------------------------ normalisation
def _features(layer: nn.Module, root: nn.Module, call: Optional[fx.Node] = None) -> tuple[int, int, torch.Tensor]:
    """(number of output features, channel dim, weight) of an l1 layer, as its kind's spec says."""
    spec = layers.spec_for_module(layer)
    if isinstance(layer, L1FunctionalCall):  # no attributes of its own: from the weight and the call's arguments
        w = root.get_parameter(layer.weight_name)
        args, kwargs = (call.args, call.kwargs) if call is not None else ((), {})
        return spec.features_of_call(w, args, kwargs), spec.channel_dim, w
    features, channel_dim = spec.features(layer)
    return features, channel_dim, layer.weight


def _is_norm_node(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return type(m).__name__ if isinstance(m, NORM_MODULES) else None
    if node.op == "call_function" and node.target in NORM_FUNCTIONS:
        return node.target.__name__
    return None


def _passes_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), PASS_THROUGH_MODULES)
    return node.op == "call_function" and node.target in PASS_THROUGH_FUNCTIONS


def _graph_norm_after(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """Type of the normalisation the output of ``node`` goes into (only through dropout/identity)."""
    while len(node.users) == 1:
        (user,) = node.users
        found = _is_norm_node(gm, user)
        if found:
            return found
        if not _passes_through(gm, user):
            return None
        node = user
    return None


def _is_norm_of(m: nn.Module, features: int) -> bool:
    if not isinstance(m, NORM_MODULES):
        return False
    size = getattr(m, "num_features", None) or getattr(m, "num_channels", None)
    if size is None and isinstance(m, nn.LayerNorm):
        size = m.normalized_shape[-1]
    return size is None or size == features


def _named_norm_after(root: nn.Module, name: str, features: int) -> bool:
    """Registration heuristic for swapped code: conv1/bn1, mlp_convs.0/mlp_bns.0, Sequential order."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, nn.Sequential):
        keys = list(parent._modules)
        for nxt in list(parent._modules.values())[keys.index(attr) + 1:]:
            if not isinstance(nxt, PASS_THROUGH_MODULES):
                return _is_norm_of(nxt, features)
        return False
    if attr.isdigit() and parent_name:  # element of a ModuleList: same index in a sibling list
        grand_name = parent_name.rpartition(".")[0]
        grand = root.get_submodule(grand_name) if grand_name else root
        return any(s is not parent and isinstance(s, (nn.ModuleList, nn.Sequential)) and attr in s._modules
                   and _is_norm_of(s._modules[attr], features) for s in grand.children())
    digits = re.search(r"(?<!\d)(\d+)$", attr)
    if digits:
        suffix = digits.group(1)
        return any(re.search(rf"(?<!\d){suffix}$", sib) and sib != attr and _is_norm_of(m, features)
                   for sib, m in parent.named_children())
    return False


def _add_norm(layer: nn.Module, root: nn.Module, call: Optional[fx.Node] = None) -> L1OutputNorm:
    features, channel_dim, w = _features(layer, root, call)
    norm = L1OutputNorm(features, channel_dim, device=w.device, dtype=w.dtype)
    norm.train(layer.training)
    layer.add_module(NORM_NAME, norm)
    return norm


def _normalise(state: ConversionState, c: Candidate) -> None:
    root = state.root
    path = c.module_path or c.name
    layer = root.get_submodule(path)
    if hasattr(layer, NORM_NAME):
        c.norm = "existing"
        return
    gm = root if isinstance(root, fx.GraphModule) and c.traced else None
    if gm is not None:
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is layer]
        followed = [_graph_norm_after(gm, n) for n in calls]
        if calls and all(followed):
            c.norm = f"followed by {followed[0]}"
            return
        _add_norm(layer, root, calls[0] if calls else None)
        for n in calls:
            with gm.graph.inserting_after(n):
                new = gm.graph.call_module(f"{n.target}.{NORM_NAME}", (n,))
            n.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        c.norm = "inserted"
        return
    features, _, _ = _features(layer, root)
    followed = c.measured_norm if c.measured_norm is not None else _named_norm_after(root, path, features)
    if followed:
        c.norm = "followed by a norm" + (" (seen on example_inputs)" if c.measured_norm else " (by name)")
        return
    _add_norm(layer, root)
    layer.register_forward_hook(l1_output_norm_hook)
    c.norm = "inserted (hook)"


@contextlib.contextmanager
def _naming(c: Candidate, doing: str):
    """Re-raise any failure as one line with the layer's name, so no bare fx traceback reaches the user."""
    try:
        yield
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionFailed(f"l1fx.convert: {doing} layer '{c.name}' ({c.op}) failed: "
                               f"{first_line(e)}. Exclude it with exclude=[{c.name!r}] to go on.") from e


def rewrite(state: ConversionState) -> ConversionState:
    """Pass 4: swap modules, rewrite functional calls, insert output normalisation."""
    root = state.root
    roots = [root] + ([state.model] if state.model is not root else [])
    gm = root if isinstance(root, fx.GraphModule) else None
    p = getattr(state.config, "p", 1.0)  # configs without p (older callers) make l1 layers
    for c in state.candidates:
        if c.skip:
            c.status = Status.SKIPPED
        elif c.already_l1:
            c.status = Status.ALREADY_L1
        elif not c.selected:
            c.status = Status.KEPT
        else:
            with _naming(c, "converting"):
                if c.kind == CandidateKind.MODULE:
                    old = root.get_submodule(c.name)
                    swap_module(roots, old, _to_l1(old, c.name, p))
                else:
                    _convert_function(gm, c, p)
            c.status = Status.CONVERTED
    if state.config.normalize == Normalize.AUTO:
        for c in state.candidates:
            if Status.is_l1(c.status):
                with _naming(c, "adding the output normalisation of"):
                    _normalise(state, c)
    elif state.config.normalize is not None:
        raise ConversionError(f"l1fx.convert: normalize must be 'auto' or None, got {state.config.normalize!r}")
    if gm is not None:
        gm.recompile()
    state.result = root
    return state
