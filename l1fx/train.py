"""Training ℓ1 networks: Mixed Gradient Strategy schedule, Dynamic Learning-rate Controller.

``TrainingWrapper`` is the one object a training loop touches::

    model = l1fx.convert(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    wrapper = l1fx.train.TrainingWrapper(model, opt, total_steps=len(loader) * epochs)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        wrapper.step()              # instead of opt.step()

Each ``step()`` (1) rescales the gradient of every ℓ1 weight (DLC, AdderNet's
adaptive learning-rate scaling), (2) steps the optimizer and (3) advances the
two schedules: the MGS blend ``mgs_mix`` of every ℓ1 layer and the global
learning-rate factor. The ℓ1 layers are found as :class:`l1fx.nn.L1Module`
instances, also through ``DistributedDataParallel`` and ``torch.compile``
wrappers (both register the user's model as a submodule).

The scaling happens in ``step()``, after ``backward()``: under DDP the
gradients have been all-reduced by then, so every rank scales the same
gradient by the same factor and the replicas stay identical.

See docs/training.md for the formulas, the sources and the choices made
where the sources are silent.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .errors import TrainingError
from .nn import L1Module

__all__ = ["MGS", "DLC", "TrainingWrapper", "find_l1_modules", "ADAPTIVE_OPTIMIZERS", "reestimate_norm_stats"]

Schedule = Union[str, Callable[[float], float]]


def _check_unit(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise TrainingError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def _cosine(p: float) -> float:
    """0 at p=0 rising to 1 at p=1 along half a cosine."""
    return 0.5 * (1.0 - math.cos(math.pi * p))


@dataclass(frozen=True)
class MGS:
    """Mixed Gradient Strategy schedule of the ℓ1 layers' ``mgs_mix``.

    ``mgs_mix`` goes from ``start`` (1 = AdderNet's full-precision, ℓ2-like
    gradient) to ``end`` (0 = the exact ℓ1 gradient, a sign). It is held at
    ``start`` for ``warmup_steps`` steps, then follows ``schedule`` over the
    remaining steps: ``"cosine"``, ``"linear"`` or a callable mapping the
    progress ``p`` in [0, 1] to the fraction of the way from ``start`` to
    ``end`` (0 → ``start``, 1 → ``end``; ``"linear"`` is ``lambda p: p``).

    ``"exponential"`` is the paper's decaying factor: after the warm-up,
    ``mgs_mix = end + (start - end) · lam**k`` with ``k`` the number of whole
    ``unit_steps``-step units done (``unit_steps=1``: k counts steps; the
    number of steps per epoch: k counts epochs). It does not depend on
    ``total_steps`` and need not reach ``end``. :meth:`paper` builds it.
    """

    start: float = 1.0
    end: float = 0.0
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    lam: float = 0.99
    unit_steps: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _check_unit(self.start, "MGS start"))
        object.__setattr__(self, "end", _check_unit(self.end, "MGS end"))
        if isinstance(self.schedule, str):
            if self.schedule not in ("cosine", "linear", "exponential"):
                raise TrainingError("MGS schedule must be 'cosine', 'linear', 'exponential' or a callable, "
                                    f"got {self.schedule!r}")
        elif not callable(self.schedule):
            raise TrainingError("MGS schedule must be 'cosine', 'linear', 'exponential' or a callable, "
                                f"got {self.schedule!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, numbers.Integral) \
                or self.warmup_steps < 0:
            raise TrainingError(f"MGS warmup_steps must be a non-negative int, got {self.warmup_steps!r}")
        lam = _check_unit(self.lam, "MGS lam")
        if lam == 0.0:
            raise TrainingError("MGS lam must be in (0, 1] (the factor of the decay per unit), got 0")
        object.__setattr__(self, "lam", lam)
        if isinstance(self.unit_steps, bool) or not isinstance(self.unit_steps, numbers.Integral) \
                or self.unit_steps < 1:
            raise TrainingError(f"MGS unit_steps must be a positive int (steps per unit of k), got {self.unit_steps!r}")

    @classmethod
    def paper(cls, lam: float = 0.99, unit: str = "step", steps_per_epoch: Optional[int] = None) -> "MGS":
        """The paper's blend with a decaying factor: ``mgs_mix = lam**k``, k = steps or epochs done.

        The paper gives the factor ``λ^k`` with ``λ = 0.99`` as an example and does not say whether ``k``
        counts iterations or epochs, so ``unit`` is explicit: ``"step"`` (k = steps done) or ``"epoch"``
        (k = whole epochs done; ``steps_per_epoch`` needed). See docs/training.md.
        """
        if unit == "step":
            if steps_per_epoch is not None:
                raise TrainingError("MGS.paper(unit='step') takes no steps_per_epoch (k counts steps)")
            return cls(start=1.0, end=0.0, schedule="exponential", lam=lam, unit_steps=1)
        if unit == "epoch":
            if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, numbers.Integral) \
                    or steps_per_epoch < 1:
                raise TrainingError("MGS.paper(unit='epoch') needs steps_per_epoch, a positive int (the "
                                    f"number of wrapper.step() calls per epoch), got {steps_per_epoch!r}")
            return cls(start=1.0, end=0.0, schedule="exponential", lam=lam, unit_steps=int(steps_per_epoch))
        raise TrainingError(f"MGS.paper unit must be 'step' or 'epoch', got {unit!r}")

    @classmethod
    def constant(cls, mix: float) -> "MGS":
        """A fixed blend, e.g. ``MGS.constant(0.0)`` for plain ℓ1 ("vanilla") training."""
        return cls(start=mix, end=mix, schedule="linear")

    def value(self, step: int, total_steps: int) -> float:
        """``mgs_mix`` for 0-based ``step`` of ``total_steps``."""
        if self.schedule == "exponential":
            k = max(0, step - self.warmup_steps) // self.unit_steps
            return min(1.0, max(0.0, self.end + (self.start - self.end) * self.lam ** k))
        span = total_steps - self.warmup_steps
        if step < self.warmup_steps or span <= 0:
            p = 0.0 if step < self.warmup_steps else 1.0
        else:
            p = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "cosine":
            frac = _cosine(p)
        elif self.schedule == "linear":
            frac = p
        else:
            frac = float(self.schedule(p))
            if not 0.0 <= frac <= 1.0 or math.isnan(frac):
                raise TrainingError(f"MGS schedule callable returned {frac} at progress {p:.4f}; it must return "
                                    "the fraction of the way from start to end, in [0, 1]")
        mix = self.start + (self.end - self.start) * frac
        return min(1.0, max(0.0, mix))  # guard rounding so the op's [0, 1] check never trips


@dataclass(frozen=True)
class DLC:
    """Dynamic Learning-rate Controller.

    Two parts, each can be switched off:

    * ``scale_gradients``: every ℓ1 weight gradient ``g`` becomes
      ``eta * sqrt(g.numel()) * g / ||g||_2`` (AdderNet's adaptive learning-rate
      scaling, one factor per layer). ``eta=0.2`` is the value of AdderNet's
      released code (``/5``). Biases and non-ℓ1 parameters are untouched.
    * ``lr_schedule``: a global factor on each parameter group's base learning
      rate (the ``lr`` it had when the wrapper was built). ``"default"`` is the
      shape of the paper's released training code: constant for the first
      ``hold`` fraction of training, then cosine decay from 1 to ``min_factor``,
      multiplied by the factor of the last ``drops`` milestone passed
      (default ÷10 from 75%, ÷100 from 94%). A callable maps progress in
      [0, 1] to the factor; ``None`` leaves the learning rates alone (use your
      own scheduler then).

    ``mode`` says where the per-layer factor goes (docs/training.md, "With
    Adam", has the measurements): ``"gradient"`` rescales the gradient before
    ``optimizer.step()`` (AdderNet's rule; right for SGD, whose step is
    proportional to the gradient); ``"update"`` lets the optimizer step and then
    rescales each ℓ1 weight's *update* to RMS ``update_eta · lr`` (its group's
    current ``lr``): under Adam-type optimizers a gradient factor cancels in
    ``m / sqrt(v)``, a factor on the step does not. ``update_eta=20`` gives, at
    the paper's AdamW lr 1e-3, the per-step movement of the ℓ1 weights measured
    under the SGD recipe (lr 0.05, η 0.2: RMS ≈ 0.022). ``"auto"`` (default) picks
    ``"update"`` for the optimizers that normalise by a running RMS
    (:data:`ADAPTIVE_OPTIMIZERS`) and ``"gradient"`` for every other one, so SGD
    training is exactly what it was.

    ``groups`` says which parameter groups the global schedule drives:
    ``"all"`` (default; the whole network is trained with one schedule, as in the
    released code, and a single-group optimizer, the common case, could not be
    split anyway) or ``"l1"`` (only groups that contain an ℓ1 weight; the other
    groups keep exactly the optimizer's own learning rate).
    """

    eta: float = 0.2
    scale_gradients: bool = True
    lr_schedule: Union[str, Callable[[float], float], None] = "default"
    hold: float = 0.025
    drops: Sequence[tuple[float, float]] = ((0.75, 0.1), (0.94, 0.01))
    min_factor: float = 0.0
    groups: str = "all"
    eps: float = 0.0
    mode: str = "auto"
    update_eta: float = 20.0

    @classmethod
    def paper(cls, eta: float = 0.2, **kwargs) -> "DLC":
        """The paper's recipe: per-layer scaling ``eta · sqrt(k) / ||g||`` and a plain cosine global schedule.

        The paper trains with a cosine learning-rate schedule (no hold, no milestone drops, decay to 0);
        the hold and the ÷10/÷100 drops of the default are from its released code, not its text. The
        placement of the factor under Adam (``mode``) is not in the paper: ``"auto"`` (docs/training.md).
        """
        return cls(eta=eta, **{"lr_schedule": "default", "hold": 0.0, "drops": (), "min_factor": 0.0, **kwargs})

    def __post_init__(self) -> None:
        if not isinstance(self.eta, numbers.Real) or not self.eta > 0:
            raise TrainingError(f"DLC eta must be a positive number, got {self.eta!r}")
        if not (self.lr_schedule is None or self.lr_schedule == "default" or callable(self.lr_schedule)):
            raise TrainingError(f"DLC lr_schedule must be 'default', None or a callable, got {self.lr_schedule!r}")
        object.__setattr__(self, "hold", _check_unit(self.hold, "DLC hold"))
        if self.hold >= 1.0:
            raise TrainingError("DLC hold must be below 1 (it is the fraction of training kept at the full rate)")
        object.__setattr__(self, "min_factor", _check_unit(self.min_factor, "DLC min_factor"))
        drops = []
        for item in self.drops:
            try:
                at, factor = item
            except (TypeError, ValueError):
                raise TrainingError(f"DLC drops must be (fraction, factor) pairs, got {item!r}") from None
            drops.append((_check_unit(at, "DLC drop fraction"), float(factor)))
            if not factor > 0:
                raise TrainingError(f"DLC drop factor must be positive, got {factor!r}")
        object.__setattr__(self, "drops", tuple(sorted(drops)))
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not self.eps >= 0:
            raise TrainingError(f"DLC eps must be a non-negative number, got {self.eps!r}")
        if self.groups not in ("all", "l1"):
            raise TrainingError(f"DLC groups must be 'all' or 'l1', got {self.groups!r}")
        if self.mode not in ("auto", "gradient", "update"):
            raise TrainingError(f"DLC mode must be 'auto', 'gradient' or 'update', got {self.mode!r}")
        if isinstance(self.update_eta, bool) or not isinstance(self.update_eta, numbers.Real) \
                or not self.update_eta > 0:
            raise TrainingError(f"DLC update_eta must be a positive number, got {self.update_eta!r}")

    def mode_for(self, optimizer: torch.optim.Optimizer) -> str:
        """``"gradient"`` or ``"update"``: where the per-layer factor goes for ``optimizer``."""
        if self.mode != "auto":
            return self.mode
        return "update" if isinstance(optimizer, ADAPTIVE_OPTIMIZERS) else "gradient"

    def lr_factor(self, progress: float) -> float:
        """Global learning-rate factor at ``progress`` in [0, 1]."""
        p = min(1.0, max(0.0, progress))
        if self.lr_schedule is None:
            return 1.0
        if callable(self.lr_schedule):
            return float(self.lr_schedule(p))
        if p < self.hold:
            factor = 1.0
        else:
            factor = self.min_factor + (1.0 - self.min_factor) * (1.0 - _cosine((p - self.hold) / (1.0 - self.hold)))
        # Milestone drops replace each other (the last one passed counts), they do not compound.
        passed = [drop for at, drop in self.drops if p >= at]
        return factor * (passed[-1] if passed else 1.0)

    @torch.no_grad()
    def scale_(self, weights: Sequence[torch.Tensor]) -> None:
        """Rescale, in place, the gradient of each ℓ1 weight to ``eta * sqrt(numel)`` norm.

        The whole point of the per-layer scaling is to give layers with
        vanishing gradients a full-size step, so a gradient is normalised
        however small its norm is (deep ℓ1 stacks measure 1e-20 and below in
        their first layers). Only a gradient whose norm is at most ``eps``
        (default 0: an all-zero one) is left as it is. The norm is taken after
        dividing by the largest magnitude, in float32 at least, so squares of
        tiny (or bfloat16/float16) gradients neither underflow nor overflow.
        """
        _check_dense_gradients(weights)  # all of them first: never leave some scaled and some not
        for w in weights:
            g = w.grad
            if g is None:
                continue
            work, norm = _safe_norm(g)
            factor = self.eta * math.sqrt(g.numel()) / norm
            # where() instead of a Python branch: no host sync, and a zero gradient stays zero (not NaN).
            g.copy_(torch.where(norm > self.eps, work * factor, work))

    @torch.no_grad()
    def scale_updates_(self, weights: Sequence[torch.Tensor], before: Sequence[torch.Tensor],
                       lrs: Sequence[float]) -> None:
        """Rescale, in place, each weight's update ``w - before`` to RMS ``update_eta · lr``.

        A zero update (a frozen weight, a step the GradScaler skipped) stays zero; the update is measured
        as the gradient is in :meth:`scale_`, so tiny updates neither underflow nor become NaN.
        """
        for w, w0, lr in zip(weights, before, lrs):
            work, norm = _safe_norm(w - w0)
            factor = self.update_eta * float(lr) * math.sqrt(w.numel()) / norm
            w.copy_(torch.where(norm > self.eps, w0 + work * factor, w))


def _safe_norm(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t in float32 at least, ||t||_2)``; the norm taken after dividing by the peak, so it never under/overflows."""
    work = t.to(torch.promote_types(t.dtype, torch.float32))
    peak = work.abs().amax()
    return work, torch.linalg.vector_norm(work / peak.clamp_min(torch.finfo(work.dtype).tiny)) * peak


# Optimizers that divide the step by a running RMS of the gradient: a per-layer gradient factor cancels there.
ADAPTIVE_OPTIMIZERS = tuple(getattr(torch.optim, name) for name in (
    "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "Adadelta", "RMSprop", "Adafactor")
    if hasattr(torch.optim, name))


def _check_dense_gradients(weights: Sequence[torch.Tensor]) -> None:
    if any(w.grad is not None and w.grad.is_sparse for w in weights):
        raise TrainingError("DLC cannot scale sparse gradients of ℓ1 weights; use dense gradients or "
                            "DLC(scale_gradients=False)")


@torch.no_grad()
def reestimate_norm_stats(model: nn.Module, batches, forward: Optional[Callable] = None) -> None:
    """Recompute the running statistics of every BatchNorm / ``L1OutputNorm`` from ``batches``, weights frozen.

    The ℓ1 layers' outputs (``-Σ|x - w|``) move with their weights far more than an inner product's, so while
    the learning rate is high the running statistics (momentum 0.1) trail the batch statistics and eval-mode
    scores understate the network (measured in examples/RESULTS.md). Each norm's statistics become the
    average over ``batches`` (``momentum=None``); ``forward(model, batch)`` runs one batch (default
    ``model(*batch)`` for a tuple, ``model(batch)`` otherwise). The model's train/eval mode and the norms'
    momenta are put back.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta, was_training = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for batch in batches:
                if forward is not None:
                    forward(model, batch)
                else:
                    model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def find_l1_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every ℓ1 layer in ``model``, each once.

    ``DistributedDataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) register the wrapped model as a submodule, so
    ``named_modules`` reaches through them.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, L1Module)]


def _set_lr(group: dict, value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):  # e.g. Adam(capturable=True) or a tensor lr
        group["lr"].fill_(value)
    else:
        group["lr"] = value


class TrainingWrapper:
    """Drives MGS and DLC around an optimizer; call ``step()`` instead of ``optimizer.step()``.

    ``total_steps`` is the number of ``step()`` calls the schedules span
    (stepping past it holds the final values, with a warning). ``mgs=None``
    leaves every layer's ``mgs_mix`` as it is; ``dlc=None`` steps the optimizer
    unchanged. The schedules for the coming step are applied at construction
    and after every step, so the forward pass always sees the current blend.

    A parameter group added to the optimizer later (``add_param_group``) is
    adopted at the next ``step()``: its ``lr`` then is its base learning rate.
    ``step()`` checks everything that can fail before it touches the
    gradients, the optimizer or the step count, so a :class:`TrainingError`
    leaves the training state as it was.

    ``state_dict()`` holds the schedule position and the base learning rates;
    with the model's and the optimizer's state it resumes training exactly
    (:func:`l1fx.checkpoint.save_checkpoint` saves all three atomically).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                 mgs: Optional[MGS] = MGS(), dlc: Optional[DLC] = DLC()) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise TrainingError(f"TrainingWrapper total_steps must be a positive int, got {total_steps!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"TrainingWrapper expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if mgs is not None and not isinstance(mgs, MGS):
            raise TypeError(f"mgs must be an l1fx.train.MGS or None, got {type(mgs).__name__}")
        if dlc is not None and not isinstance(dlc, DLC):
            raise TypeError(f"dlc must be an l1fx.train.DLC or None, got {type(dlc).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.mgs = mgs
        self.dlc = dlc
        self.step_count = 0
        self.l1_modules = find_l1_modules(model)
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self._check_l1_layers()
        self._warned_past_end = False
        self._apply_schedules()

    # ------------------------------------------------------------ set-up checks
    def _check_l1_layers(self) -> None:
        if not self.l1_modules:
            if self.mgs is not None or (self.dlc is not None and self.dlc.scale_gradients):
                warnings.warn(
                    "TrainingWrapper found no l1fx ℓ1 layers in the model, so MGS and the DLC gradient "
                    "scaling do nothing; convert the model first (l1fx.convert), or pass mgs=None and "
                    "DLC(scale_gradients=False) to use only the learning-rate schedule", stacklevel=3)
            return
        in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [name for name, m in self.l1_modules
                   if m.weight is not None and m.weight.requires_grad and id(m.weight) not in in_optimizer]
        if missing:
            warnings.warn(f"ℓ1 weights not in the optimizer (they will not be trained): "
                          f"{', '.join(n + '.weight' for n in missing)}", stacklevel=3)

    @property
    def l1_weights(self) -> list[torch.Tensor]:
        """The ℓ1 weights, each once (a weight shared by two layers is scaled once).

        Looked up at every step: an ``L1FunctionalCall`` made by convert learns
        its weight tensor on its first call.
        """
        seen, out = set(), []
        for _, m in self.l1_modules:
            w = m.weight
            if w is not None and id(w) not in seen:
                seen.add(id(w))
                out.append(w)
        return out

    # ------------------------------------------------------------ schedules
    @property
    def progress(self) -> float:
        """Fraction of ``total_steps`` done, in [0, 1]."""
        return min(1.0, self.step_count / self.total_steps)

    @property
    def mix(self) -> Optional[float]:
        """The MGS blend the ℓ1 layers use now (``None`` without MGS)."""
        return None if self.mgs is None else self.mgs.value(self.step_count, self.total_steps)

    @property
    def lr_factor(self) -> float:
        """The global learning-rate factor applied now (1 without a DLC schedule)."""
        return 1.0 if self.dlc is None else self.dlc.lr_factor(self.progress)

    def _scheduled_groups(self) -> list[int]:
        if self.dlc is None or self.dlc.lr_schedule is None:
            return []
        groups = self.optimizer.param_groups
        if self.dlc.groups == "all":
            return list(range(len(groups)))
        l1_ids = {id(w) for w in self.l1_weights}
        return [i for i, g in enumerate(groups) if any(id(p) in l1_ids for p in g["params"])]

    def _schedule_at(self, step: int) -> tuple[Optional[float], float]:
        """``(mgs_mix, lr factor)`` for ``step``, checked; computing them changes nothing."""
        mix = None if self.mgs is None else self.mgs.value(step, self.total_steps)
        factor = 1.0 if self.dlc is None else self.dlc.lr_factor(min(1.0, step / self.total_steps))
        if not (math.isfinite(factor) and factor >= 0.0):
            raise TrainingError(f"DLC lr_schedule returned {factor} at step {step} of {self.total_steps}; the "
                                "learning-rate factor must be a finite number >= 0")
        return mix, factor

    def _apply(self, mix: Optional[float], factor: float) -> None:
        if mix is not None:
            for _, m in self.l1_modules:
                m.mgs_mix = mix
        groups = self.optimizer.param_groups
        for i in self._scheduled_groups():
            _set_lr(groups[i], self.base_lrs[i] * factor)

    def _apply_schedules(self) -> None:
        self._sync_groups()
        self._apply(*self._schedule_at(self.step_count))

    def _sync_groups(self) -> None:
        """Adopt parameter groups added since the last step; refuse removed ones. Touches nothing on error.

        An added group (``optimizer.add_param_group``, e.g. to unfreeze a backbone) gets its ``lr`` at that
        moment as its base learning rate and follows the schedule from the current step, as the groups
        present from the start do. A removed group cannot be matched to its base learning rate.
        """
        groups = self.optimizer.param_groups
        if len(groups) < len(self.base_lrs):
            raise TrainingError(
                f"the optimizer has {len(groups)} parameter groups but had {len(self.base_lrs)}: a group was "
                "removed after the TrainingWrapper was built, and the wrapper cannot tell which one; build a "
                "new TrainingWrapper for the changed optimizer (nothing was stepped)")
        if len(groups) > len(self.base_lrs):
            self.base_lrs += [float(g["lr"]) for g in groups[len(self.base_lrs):]]
            self._check_l1_layers()

    # ------------------------------------------------------------ the training step
    def step(self, scaler: Optional["torch.amp.GradScaler"] = None) -> None:
        """DLC gradient scaling, ``optimizer.step()``, then advance both schedules.

        Call it after ``backward()`` (and, under DDP, after the gradients are
        all-reduced, which ``backward()`` does). With a ``GradScaler`` pass it
        here instead of calling ``scaler.step``: the gradients are unscaled
        before DLC measures them, then ``scaler.step`` and ``scaler.update`` run.
        """
        # Everything that can fail is checked before the gradients, the optimizer or the step count are
        # touched, so an error leaves the training state exactly as it was.
        scale = self.dlc is not None and self.dlc.scale_gradients
        mode = self.dlc.mode_for(self.optimizer) if scale else None
        weights = self.l1_weights
        if mode == "gradient":
            _check_dense_gradients(weights)
        after = self._schedule_at(self.step_count + 1)
        if len(self.optimizer.param_groups) != len(self.base_lrs):
            self._sync_groups()
            self._apply(*self._schedule_at(self.step_count))  # an added group's lr for this step

        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if mode == "gradient":
            self.dlc.scale_(weights)
        elif mode == "update":  # the weights before the step, and the lr each one is stepped with
            stepped = [w for w in weights if w.grad is not None]
            before = [w.detach().clone() for w in stepped]
            lrs = self._lrs_of(stepped)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        if mode == "update":
            self.dlc.scale_updates_(stepped, before, lrs)
        self.step_count += 1
        if self.step_count > self.total_steps and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(f"TrainingWrapper stepped past total_steps={self.total_steps}; "
                          "the schedules hold their final values", stacklevel=2)
        self._apply(*after)

    def _lrs_of(self, weights: Sequence[torch.Tensor]) -> list[float]:
        lr_of = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        return [float(lr_of.get(id(w), 0.0)) for w in weights]  # not in the optimizer: not stepped, lr 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"step": self.step_count, "total_steps": self.total_steps, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule position; re-applies ``mgs_mix`` and the learning rates."""
        self._check_state_dict(state)
        self.step_count = int(state["step"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self._apply_schedules()

    def _check_state_dict(self, state: dict) -> None:
        """Raise :class:`TrainingError` if ``state`` cannot be loaded into this wrapper; changes nothing."""
        if not isinstance(state, dict):
            raise TrainingError(f"not a TrainingWrapper state dict: {type(state).__name__}")
        missing = {"step", "total_steps", "base_lrs"} - set(state)
        if missing:
            raise TrainingError(f"not a TrainingWrapper state dict: missing {sorted(missing)}")
        if int(state["total_steps"]) != self.total_steps:
            raise TrainingError(
                f"checkpoint was saved with total_steps={state['total_steps']} but this wrapper has "
                f"total_steps={self.total_steps}; build the wrapper with the same total_steps to resume")
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise TrainingError(f"checkpoint has {len(state['base_lrs'])} parameter groups, the optimizer "
                                f"{len(self.optimizer.param_groups)}")
        self._schedule_at(int(state["step"]))  # a schedule that fails there fails now, before any change

    def __repr__(self) -> str:
        return (f"TrainingWrapper(step={self.step_count}/{self.total_steps}, l1_layers={len(self.l1_modules)}, "
                f"mix={self.mix}, lr_factor={self.lr_factor:.4g}, mgs={self.mgs}, dlc={self.dlc})")
