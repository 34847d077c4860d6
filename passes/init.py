"""Init pass: put the converted l1 layers' weights at the scale of their inputs.

An l1 layer computes ``-sum_k |x_k - w_ok|``: its weights are *templates*
compared with the inputs, not coefficients. The dense init (about
``±1/sqrt(fan_in)``) is ~10x smaller than the BatchNorm + ReLU activations
an inner layer sees, so ``|x - w| ≈ |x|`` for every output channel: all
channels are ≈ ``-||x||_1``, the following normalisation removes that common
part and the gradient passed down shrinks ~100x per layer (examples/RESULTS.md).

``init="data"`` (:func:`init_l1_weights`) gives every template the
distribution of the layer's input, one input channel at a time::

    z = (w - mean(w)) / std(w)                      # the dense weight, standardised over the layer
    w[o, c, ...] <- mean_c + std_c * z[o, c, ...]   # mean_c, std_c: input channel c on example_inputs

so templates lie among the inputs, and which template is nearest differs from
output channel to output channel. The dense weight only supplies the random
pattern ``z``. (For grouped convolutions ``c`` is the input channel the patch
position reads.) The statistics come from one forward of ``example_inputs``
with normalisation layers on batch statistics (what training sees; a fresh
model's running statistics would be meaningless) and everything else in eval
mode, under ``no_grad`` with torch seeded (0) inside :func:`~l1fx.passes.rng.preserved_rng`,
so the init does not depend on, or change, the caller's RNG state; all buffers (running
statistics, ``num_batches_tracked``) and train flags are restored afterwards. A
weight shared with other layers is set once, in place, so it stays one Parameter.
Layers are initialised in execution order from a forward pre-hook, so each
layer's statistics already see the re-initialised layers before it (like
LSUV); a layer called several times per forward is set from its first call.

``init="auto"`` (the default of :func:`l1fx.convert`) is ``"data"`` when
``example_inputs`` are given, else a rule that needs no data (:func:`_scale_rule`):
the same ``mean + std * z`` with the statistics an l1 layer's input has in
these networks, ``ReLU(N(0, 1))`` (mean 0.40, std 0.58) when the layer's input
comes from a ReLU, ``N(0, 1)`` otherwise. The dense init is ~1/sqrt(fan_in)
of that scale, which is what made the weight gradients of a converted
untrained model 1e-4..1e-28 of the dense model's; with the rule they are within
~2.7 orders of magnitude on every bundled model (median within 1;
tests/test_init_auto.py). ``init="dense"`` (``pretrained=True``) keeps the dense
weights exactly.

``init=<number>`` multiplies the converted l1 weights by that factor instead
(no example inputs needed). Layers that were already l1 before this
conversion are never touched, so converting twice still changes nothing.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from l1fx import layers
from l1fx._util import evaluating
from l1fx.errors import ConversionError
from l1fx.nn import L1FunctionalCall

from .rng import preserved_rng
from .state import ConversionFailed, ConversionState, shared_groups
from .status import Status
from .trace import first_line

__all__ = ["init_l1_weights", "template_init", "INIT_CHOICES"]

INIT_CHOICES = ("auto", "dense", "data")

# mean and std of ReLU(N(0, 1)): what a layer after a normalisation and a ReLU sees
RELU_MEAN, RELU_STD = 1 / math.sqrt(2 * math.pi), math.sqrt(0.5 - 1 / (2 * math.pi))


def template_init(weight: Tensor, mean: Tensor, std: Tensor, in_dim: int = 1) -> Tensor:
    """``mean_c + std_c * standardised(weight)`` per input channel ``c`` (``mean``/``std``: [C_in]).

    ``in_dim``: the weight dim of the input channels, the kind's ``weight_in_dim`` (1: ``[out, in/groups,
    *k]``; 0: a transposed convolution's ``[in, out/groups, *k]``, where input channel ``c`` is row ``c``).
    """
    out_ch, per_group = weight.shape[:2]
    groups = mean.numel() // per_group
    w = weight.detach().double()
    spread = w.std() if w.numel() > 1 else w.new_zeros(())
    if spread > 0:
        z = (w - w.mean()) / spread
    else:  # a constant weight has no pattern to keep: draw one, reproducibly
        z = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # output channel o of group g reads input channels g*per_group ... (g+1)*per_group - 1
    def per_output(v: Tensor) -> Tensor:
        if in_dim == 0:
            return v.double().view(-1, *([1] * (weight.dim() - 1)))
        v = v.double().view(groups, 1, per_group).expand(groups, out_ch // groups, per_group)
        return v.reshape(out_ch, per_group, *([1] * (weight.dim() - 2)))

    return (per_output(mean) + per_output(std) * z).to(weight.dtype)


def _channel_stats(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    x = x.detach().double().movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
    if x.shape[1] < 2:
        return x.mean(1), torch.zeros_like(x[:, 0])
    std, mean = torch.std_mean(x, dim=1)
    return mean, std


def _spread_floor(std: Tensor, mean: Tensor) -> Tensor:
    """``std`` with channels constant on the batch given the median spread of the others (else 1).

    A template set exactly to a constant input gives ``x - w = 0`` there for every output channel,
    so the input gradient (``HardTanh(w - x)``) and the weight gradient of that channel are exactly 0
    (measured: PointNet2PartSeg's max-pooled set-abstraction features are constant on a 4-cloud batch,
    and every layer below got no gradient).
    """
    tiny = std <= 1e-6 * (mean.abs() + 1)
    if not tiny.any():
        return std
    rest = std[~tiny]
    fill = rest.median() if rest.numel() else std.new_ones(())
    return torch.where(tiny, fill, std)


def _layer_input(module: nn.Module, args: tuple, kwargs: dict) -> Optional[Tensor]:
    x = args[0] if args else kwargs.get("input")
    return x if isinstance(x, Tensor) and x.is_floating_point() else None


def _l1_targets(state: ConversionState) -> dict[str, nn.Module]:
    """Qualified module path -> l1 module, for the layers converted by this run."""
    root = state.root
    return {c.module_path or c.name: root.get_submodule(c.module_path or c.name)
            for c in state.candidates if c.status == Status.CONVERTED}


def _weight(module: nn.Module, root: nn.Module) -> Tensor:
    if isinstance(module, L1FunctionalCall):
        return root.get_parameter(module.weight_name)
    return module.weight


def _scale(state: ConversionState, factor: float) -> list[str]:
    done: dict[int, str] = {}
    with torch.no_grad():
        for path, m in _l1_targets(state).items():
            w = _weight(m, state.root)
            if id(w) not in done:  # a weight shared by two layers is scaled once
                w.mul_(factor)
                done[id(w)] = path
    return list(done.values())


class _Snapshot:
    """Buffers of a module tree, restored on exit; normalisation layers on batch statistics inside.

    Used inside :func:`l1fx._util.evaluating`, which puts the rest in eval mode and gives every
    module its train flag back.
    """

    def __init__(self, root: nn.Module, calibrate: bool = False) -> None:
        self.root = root
        # calibrate: untrained norms (running statistics never updated) keep the batch statistics
        # of this forward (momentum None: exactly them), so that the model's eval output is not the
        # same for every input; everything else is restored as before
        self.fresh = [m for m in root.modules() if isinstance(m, _BatchNorm) and _fresh(m)] if calibrate else []

    def __enter__(self):
        keep = {id(m) for m in self.fresh}
        self.buffers = [(m, name, b, b.clone()) for m in self.root.modules() if id(m) not in keep
                        for name, b in m._buffers.items() if b is not None]
        self.momenta = [(m, m.momentum) for m in self.fresh]
        for m in self.fresh:
            m.momentum = None
        for m in self.root.modules():
            if isinstance(m, (_BatchNorm, _InstanceNorm)):
                m.train()
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, name, original, saved in self.buffers:
                original.copy_(saved)
                m._buffers[name] = original
            for m, momentum in self.momenta:
                m.momentum = momentum
                if exc[0] is not None:  # failed part-way: the fresh statistics as they were
                    m.reset_running_stats()
                else:
                    m.num_batches_tracked.zero_()  # still untrained as far as later calibrations know
        return False


def _data(state: ConversionState, calibrate: bool = False) -> tuple[list[str], list[str]]:
    """Set each converted layer's templates from its input; returns (initialised, never reached).

    With ``calibrate`` (init='auto'), untrained norms keep this batch's statistics (:class:`_Snapshot`).
    """
    root = state.root
    targets = _l1_targets(state)
    done: dict[int, str] = {}

    def make_hook(path: str):
        def hook(module, args, kwargs):
            w = _weight(module, root)
            x = _layer_input(module, args, kwargs)
            if id(w) in done or x is None:
                return None
            # the input's channels sit where the kind's outputs have theirs (-1 for linear, 1 for conv)
            spec = layers.spec_for_module(module)
            mean, std = _channel_stats(x, spec.channel_dim)
            in_dim = spec.weight_in_dim
            if (mean.numel() != w.shape[0]) if in_dim == 0 else (mean.numel() % w.shape[1] != 0):
                raise ConversionFailed(f"l1fx.convert(init='data'): layer '{path}' got {mean.numel()} input "
                                   f"channels for a weight of shape {tuple(w.shape)}")
            with torch.no_grad():
                w.copy_(template_init(w, mean, _spread_floor(std, mean), in_dim))
            done[id(w)] = path
            return None
        return hook

    handles = [m.register_forward_pre_hook(make_hook(p), with_kwargs=True) for p, m in targets.items()]
    try:
        # seed 0 for whatever the forward draws (dropout is off, random calls in forward are not):
        # the same init on every run, and the user's generators are restored afterwards
        with evaluating(root), _Snapshot(root, calibrate), preserved_rng(seed=0):
            root(*state.config.example_inputs)
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionFailed(
            f"l1fx.convert(init='data'): the converted {type(state.model).__name__} failed on example_inputs "
            f"with normalisation layers on batch statistics ({first_line(e)}); pass a batch of at "
            f"least 2 samples, or use init='dense'") from e
    finally:
        for h in handles:
            h.remove()
    reached = set(done.values())
    unreached = [p for p, m in targets.items() if id(_weight(m, root)) not in done]
    return [p for p in targets if p in reached], unreached


_RELUS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)
_RELU_FUNCTIONS = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu6,
                   torch.nn.functional.leaky_relu}
_PASS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.Flatten, nn.Unflatten)


def _after_relu(state: ConversionState, path: str) -> bool:
    """Whether the layer at ``path`` reads a ReLU's output (through dropout/identity): in the graph, or in
    a swapped region as the next child of the same ``nn.Sequential``."""
    root = state.root
    if isinstance(root, fx.GraphModule):
        for node in root.graph.nodes:
            if node.op == "call_module" and node.target == path:
                return bool(node.args) and _relu_like(root, node.args[0], 8)
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if not isinstance(parent, nn.Sequential):
        return False
    before = None
    for key, child in parent._modules.items():
        if key == name:
            break
        if not isinstance(child, _PASS):
            before = child
    return isinstance(before, _RELUS)


# ops that keep a ReLU's output nonnegative with about its statistics (reshapes, pooling, selection)
_KEEPS = frozenset({"view", "reshape", "permute", "transpose", "contiguous", "unsqueeze", "squeeze", "expand",
                    "repeat", "flatten", "max", "amax", "getitem", "max_pool1d", "max_pool2d", "max_pool3d",
                    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate"})


def _relu_like(root: fx.GraphModule, x, depth: int) -> bool:
    """Whether graph value ``x`` is a ReLU's output, up to reshapes and pooling (a ``cat``: most of its parts)."""
    if not isinstance(x, fx.Node) or depth < 0:
        return False
    if x.op == "call_module":
        m = root.get_submodule(x.target)
        if isinstance(m, _RELUS):
            return True
        keeps = isinstance(m, _PASS) or isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Upsample))
        return keeps and bool(x.args) and _relu_like(root, x.args[0], depth - 1)
    if x.op == "call_function" and x.target in _RELU_FUNCTIONS or x.op == "call_method" and x.target in ("relu",
                                                                                                         "relu_"):
        return True
    name = x.target if x.op == "call_method" else getattr(x.target, "__name__", "")
    if x.op in ("call_function", "call_method") and name == "cat" and x.args and isinstance(x.args[0], (list, tuple)):
        parts = x.args[0]
        return 2 * sum(_relu_like(root, p, depth - 1) for p in parts) > len(parts)
    if x.op in ("call_function", "call_method") and name in _KEEPS and x.args:
        return _relu_like(root, x.args[0], depth - 1)
    return False


def _scale_rule(state: ConversionState) -> tuple[int, int]:
    """init='auto' without data: ``mean + std * z`` (z: the standardised dense weight), ReLU statistics for a
    layer after a ReLU, N(0, 1) otherwise; returns (after ReLU, others)."""
    done: set[int] = set()
    counts = [0, 0]
    with torch.no_grad():
        for path, m in _l1_targets(state).items():
            w = _weight(m, state.root)
            if id(w) in done:  # a weight shared by two layers is set once
                continue
            done.add(id(w))
            relu = _after_relu(state, path)
            in_dim = layers.spec_for_module(m).weight_in_dim
            c = w.shape[in_dim]
            w.copy_(template_init(w, torch.full((c,), RELU_MEAN if relu else 0.0),
                                  torch.full((c,), RELU_STD if relu else 1.0), in_dim))
            counts[0 if relu else 1] += 1
    return counts[0], counts[1]


# ------------------------------------------------------------------ fresh running statistics
def _fresh(norm: nn.Module) -> bool:
    """Running statistics never updated (an untrained model): mean 0, var 1, no batch tracked."""
    return (getattr(norm, "track_running_stats", False) and norm.running_mean is not None
            and int(norm.num_batches_tracked) == 0 and not norm.running_mean.any()
            and bool((norm.running_var == 1).all()))


def _rule_note(state: ConversionState, why: str) -> str:
    relu, other = _scale_rule(state)
    return (f"init='auto' ({why}): {relu + other} l1 weight(s) set by the no-data scale rule, mean + std * "
            f"standardised dense weight with ReLU statistics ({RELU_MEAN:.2f}, {RELU_STD:.2f}) for {relu} layer(s) "
            f"after a ReLU and N(0, 1) for {other}; untrained norms keep mean 0 / var 1 until trained (eval "
            f"output of an untrained model may not depend on the input: pass example_inputs to calibrate them); "
            f"pass pretrained=True (init='dense') to keep dense weights")


def init_l1_weights(state: ConversionState) -> ConversionState:
    """Pass (between rewrite and verify): re-initialise the converted l1 weights per ``config.init``."""
    init = getattr(state.config, "init", "dense")
    if init == "dense":
        state.notes.append("init='dense': the dense weights are kept exactly (pretrained)")
        return state
    if init == "auto":
        if not _l1_targets(state):
            return state
        if getattr(state.config, "example_inputs", None) is None:
            state.notes.append(_rule_note(state, "no example_inputs"))
            return _note_shared(state, list(_l1_targets(state)))
        # layers before a failure already hold data-init weights: put the dense ones back before the rule
        saved = [(w, w.detach().clone()) for w in {id(w): w for w in
                 (_weight(m, state.root) for m in _l1_targets(state).values())}.values()]
        try:
            done, unreached = _data(state, calibrate=True)
        except ConversionFailed as e:  # e.g. a batch of one under batch statistics: the rule needs no data
            with torch.no_grad():
                for w, dense in saved:
                    w.copy_(dense)
            state.notes.append(_rule_note(state, f"init='data' failed: {' '.join(str(e).split())[:160]}"))
            return _note_shared(state, list(_l1_targets(state)))
        note = (f"init='auto' -> 'data' (example_inputs given): {len(done)} l1 weight(s) set to mean_c + std_c * "
                f"standardised dense weight from their input channels, untrained norms given the batch's "
                f"statistics; pass pretrained=True to keep dense weights")
        if unreached:
            note += f"; not reached by example_inputs, dense init kept: {', '.join(unreached)}"
        state.notes.append(note)
        return _note_shared(state, done)
    if init == "data":
        if getattr(state.config, "example_inputs", None) is None:
            raise ConversionError("l1fx.convert: init='data' sets the l1 weights from input statistics, which "
                             "needs example_inputs=(a batch of inputs,)")
        done, unreached = _data(state)
        note = (f"init='data': {len(done)} l1 weight(s) set to mean_c + std_c * standardised dense weight "
                f"from their input channels on example_inputs")
        if unreached:
            note += f"; not reached by example_inputs, dense init kept: {', '.join(unreached)}"
    elif isinstance(init, numbers.Real) and not isinstance(init, bool):
        done = _scale(state, float(init))
        note = f"init={float(init):g}: {len(done)} l1 weight(s) multiplied by {float(init):g}"
    else:
        raise ConversionError(f"l1fx.convert: init must be 'dense', 'data' or a positive number, got {init!r}")
    state.notes.append(note)
    return _note_shared(state, done)


def _note_shared(state: ConversionState, done: list[str]) -> ConversionState:
    shared = _shared_with_others(state, done)
    if shared:
        state.notes.append(f"init: re-initialised weight(s) shared with layers that are not l1 (they see the "
                           f"new values too, as one Parameter): {'; '.join(shared)}")
    return state


def _shared_with_others(state: ConversionState, done: list[str]) -> list[str]:
    """'a.weight = b.weight' for each re-initialised weight also registered outside the converted layers."""
    names = {p: (m.weight_name if isinstance(m, L1FunctionalCall) else f"{p}.weight")
             for p, m in _l1_targets(state).items()}
    converted, l1 = {names[p] for p in done}, set(names.values())
    out = []
    for group in shared_groups(state.root):
        if converted & set(group) and set(group) - l1:
            out.append(" = ".join(group))
    return out
