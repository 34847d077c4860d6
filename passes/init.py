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

``init=<number>`` multiplies the converted l1 weights by that factor instead
(no example inputs needed). Layers that were already l1 before this
conversion are never touched, so converting twice still changes nothing.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
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

INIT_CHOICES = ("dense", "data")


def template_init(weight: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``mean_c + std_c * standardised(weight)`` per input channel ``c`` (``mean``/``std``: [C_in])."""
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
        v = v.double().view(groups, 1, per_group).expand(groups, out_ch // groups, per_group)
        return v.reshape(out_ch, per_group, *([1] * (weight.dim() - 2)))

    return (per_output(mean) + per_output(std) * z).to(weight.dtype)


def _channel_stats(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    x = x.detach().double().movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
    if x.shape[1] < 2:
        return x.mean(1), torch.zeros_like(x[:, 0])
    std, mean = torch.std_mean(x, dim=1)
    return mean, std


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

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __enter__(self):
        self.buffers = [(m, name, b, b.clone()) for m in self.root.modules()
                        for name, b in m._buffers.items() if b is not None]
        for m in self.root.modules():
            if isinstance(m, (_BatchNorm, _InstanceNorm)):
                m.train()
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, name, original, saved in self.buffers:
                original.copy_(saved)
                m._buffers[name] = original
        return False


def _data(state: ConversionState) -> tuple[list[str], list[str]]:
    """Set each converted layer's templates from its input; returns (initialised, never reached)."""
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
            mean, std = _channel_stats(x, layers.spec_for_module(module).channel_dim)
            if mean.numel() % w.shape[1] != 0:
                raise ConversionFailed(f"l1fx.convert(init='data'): layer '{path}' got {mean.numel()} input "
                                   f"channels for a weight of shape {tuple(w.shape)}")
            with torch.no_grad():
                w.copy_(template_init(w, mean, std))
            done[id(w)] = path
            return None
        return hook

    handles = [m.register_forward_pre_hook(make_hook(p), with_kwargs=True) for p, m in targets.items()]
    try:
        # seed 0 for whatever the forward draws (dropout is off, random calls in forward are not):
        # the same init on every run, and the user's generators are restored afterwards
        with evaluating(root), _Snapshot(root), preserved_rng(seed=0):
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


def init_l1_weights(state: ConversionState) -> ConversionState:
    """Pass (between rewrite and verify): re-initialise the converted l1 weights per ``config.init``."""
    init = getattr(state.config, "init", "dense")
    if init == "dense":
        return state
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
