"""The registry of layer kinds: one :class:`LayerSpec` per dense kind, in torchao's handler style.

A layer kind (``linear``, ``conv1d`` ... ) is everything l1fx knows about one
inner-product layer: how to recognise it in an fx graph (module type,
``call_function`` targets, where the weight argument is), in source code
(qualified names for the libcst codemod), how to build its replacement, its
multiply-accumulates (:func:`count_macs`, the one MAC counter), its ℓ1 custom
op and that op's ONNX schema. Passes and tools iterate :func:`specs` instead of
keeping their own type sets, so a new kind is one new file that calls
:func:`register_layer` (see ``linear.py``, ``conv.py``, ``conv_transpose.py``
and docs/architecture.md).

Like torchao's ``register_quantize_module_handler(ConfigType)``, which maps a
config type to the function that transforms a module, replacements are
functions registered per ``(variant, kind)`` with :func:`register_replacement`;
``"l1"`` is the built-in variant (the spec's ``l1_module.from_dense``), and an
ℓp or int8 variant is one more file registering its own builders.

The ℓ1 replacements are named by qualified name (``"l1fx.nn.L1Conv2d"``) and
imported on first use, so this package imports neither ``l1fx.nn`` nor
``l1fx.functional`` (which may therefore import it) and the codemod and the
fx passes read the same names. Importing this package registers the FLOP
formula of the ℓ1 custom ops with ``torch.utils.flop_counter``, so a plain
``FlopCounterMode`` counts ℓ1 layers.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "LayerSpec", "OnnxSchema", "register_layer", "unregister_layer", "specs", "get", "spec_for_module",
    "spec_for_function", "spec_for_l1_op", "function_targets", "l1_op_overloads", "count_macs", "l1_flops",
    "register_l1_flop_formulas", "source_table", "l1_source_names", "register_replacement", "build_replacement",
    "resolve", "FunctionNames",
]


# ---------------------------------------------------------------- the one MAC counter
def count_macs(out_shape: Sequence[int], weight_shape: Sequence[int],
               in_shape: Optional[Sequence[int]] = None) -> int:
    """Multiply-accumulates of one inner-product call: each output element reads one weight row.

    ``prod(out_shape) * prod(weight_shape[1:])`` for ``F.linear`` (``[M, K]``) and
    ``F.conv*d`` (``[M, C/groups, *kernel]``) alike, and so for their ℓ1 ops, where
    each "MAC" is one subtraction and one accumulation. The bias is not counted
    (as FlopCounterMode does not count it). ``in_shape`` (the input's shape) is
    part of the ``LayerSpec.macs`` protocol for kinds that need it (a transposed
    convolution reads each *input* element once per weight row); unused here.
    """
    return math.prod(out_shape) * math.prod(weight_shape[1:])


def l1_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOP formula of ``torch.ops.l1fx.linear``/``conv`` for FlopCounterMode: 2 per MAC (its convention)."""
    return 2 * count_macs(out_shape, w_shape, x_shape)


# ---------------------------------------------------------------- specs
@dataclass(frozen=True)
class OnnxSchema:
    """The ONNX op an ℓ1 layer exports to (built into onnx schemas by ``l1fx.onnx_ops``)."""

    op_type: str
    domain: str = "l1fx"
    version: int = 1
    inputs: tuple[str, ...] = ("X", "W", "B")
    outputs: tuple[str, ...] = ("Y",)
    attributes: tuple[str, ...] = ()  # names; the types are ONNX Conv's (ints, ints, ints, int)


def _never(*args, **kwargs) -> bool:
    return False


@dataclass(frozen=True)
class LayerSpec:
    """One dense layer kind and its replacement.

    Recognition: ``module`` (instances, subclasses included, and instances of
    the ℓ1 class count as this kind), ``functions`` (``call_function`` targets,
    weight at ``weight_arg``), ``source_modules``/``source_functions``
    (qualified names the source codemod rewrites). Replacement: ``l1_module``
    and ``l1_function`` (qualified names), ``l1_op`` (the custom op, for
    counting and export), ``onnx``. ``unsupported`` marks a kind that is
    recognised but has no ℓ1 layer yet (the reason becomes the candidate's skip
    note). ``pointwise_module(m)`` / ``pointwise_call(args, kwargs, weight)``
    say whether a layer mixes only channels (shared-MLP units); ``channel_dim``
    and ``features_attr`` give the output features an output norm needs.
    """

    name: str  # kind key, also L1FunctionalCall.op: "linear", "conv2d"
    module: type
    functions: tuple[Callable, ...] = ()
    weight_arg: tuple[int, str] = (1, "weight")  # position and keyword of the weight in a functional call
    source_modules: tuple[str, ...] = ()
    source_functions: tuple[str, ...] = ()
    l1_module: Optional[str] = None  # "l1fx.nn.L1Conv2d"
    l1_function: Optional[str] = None  # "l1fx.functional.l1_conv2d"
    l1_aliases: tuple[str, ...] = ()  # other public spellings of the l1 class ("l1fx.L1Conv2d")
    l1_op: Optional[str] = None  # "l1fx::conv"
    onnx: Optional[OnnxSchema] = None
    channel_dim: int = 1  # where the output features are: -1 for linear, 1 for convolutions
    features_attr: str = "out_channels"
    # the weight dim of the input channels: 1 for [out, in/groups, *k] (linear, conv), 0 for [in, out/groups, *k]
    weight_in_dim: int = 1
    # output features of a functional call from (weight, args, kwargs); None: the weight's first dim
    call_features: Optional[Callable[[torch.Tensor, tuple, dict], int]] = None
    pointwise_module: Callable[[nn.Module], bool] = _never
    pointwise_call: Callable[[tuple, dict, torch.Tensor], bool] = _never
    macs: Callable[..., int] = count_macs  # macs(out_shape, weight_shape, in_shape) of one call
    unsupported: Optional[str] = None
    label_of: Optional[Callable[[nn.Module], str]] = None  # candidate op label; default module.__name__

    @property
    def module_op(self) -> str:
        """The op label of a module candidate of this kind: ``"Conv2d"``."""
        return self.module.__name__

    @property
    def function_op(self) -> str:
        """The op label of a functional candidate: ``"F.conv2d"``."""
        return f"F.{self.name}"

    def label(self, m: nn.Module) -> str:
        return self.label_of(m) if self.label_of is not None else self.module_op

    @property
    def l1_class(self) -> Optional[type]:
        return None if self.l1_module is None else resolve(self.l1_module)

    @property
    def l1_callable(self) -> Optional[Callable]:
        return None if self.l1_function is None else resolve(self.l1_function)

    def weight_of(self, args: tuple, kwargs: dict) -> Any:
        index, key = self.weight_arg
        return args[index] if len(args) > index else kwargs.get(key)

    def features_of_call(self, weight: torch.Tensor, args: tuple = (), kwargs: Optional[dict] = None) -> int:
        """Output features of a functional call of this kind on ``weight``."""
        if self.call_features is None:
            return weight.shape[0]
        return self.call_features(weight, args, kwargs or {})

    def features(self, layer: nn.Module) -> tuple[int, int]:
        """(output features, channel dim) of a layer of this kind (dense or ℓ1 module)."""
        return getattr(layer, self.features_attr), self.channel_dim

    def is_instance(self, m: nn.Module) -> bool:
        if isinstance(m, self.module):
            return True
        cls = self.l1_class
        return cls is not None and isinstance(m, cls)


_SPECS: dict[str, LayerSpec] = {}
_CACHE: dict[str, Any] = {}


def resolve(qualified: str) -> Any:
    """The object named ``"package.module.attr"`` (imported on first use)."""
    obj = _CACHE.get(qualified)
    if obj is None:
        module, _, attr = qualified.rpartition(".")
        obj = getattr(importlib.import_module(module), attr)
        _CACHE[qualified] = obj
    return obj


def register_layer(spec: LayerSpec, *, replace: bool = False) -> LayerSpec:
    """Add a layer kind; every pass that iterates :func:`specs` sees it from now on.

    A kind whose name, module type or function is registered already raises,
    unless ``replace=True`` (which replaces the kind of that name).
    """
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"register_layer expects a LayerSpec, got {type(spec).__name__}")
    if not replace:
        if spec.name in _SPECS:
            raise ValueError(f"layer kind {spec.name!r} is registered already; pass replace=True to replace it")
        for other in _SPECS.values():
            if other.module is spec.module or set(other.functions) & set(spec.functions):
                raise ValueError(f"layer kind {spec.name!r} recognises what {other.name!r} does "
                                 f"({spec.module.__name__}); pass replace=True or unregister {other.name!r} first")
    _SPECS[spec.name] = spec
    if spec.l1_op is not None:
        register_l1_flop_formulas()
    return spec


def unregister_layer(name: str) -> LayerSpec:
    """Remove a layer kind (tests, or a plug-in replacing a built-in kind)."""
    return _SPECS.pop(name)


def specs() -> tuple[LayerSpec, ...]:
    """All layer kinds, in registration order (lookups take the first match)."""
    return tuple(_SPECS.values())


def get(name: str) -> LayerSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"no layer kind {name!r}; registered: {', '.join(_SPECS)}") from None


def spec_for_module(m: nn.Module) -> Optional[LayerSpec]:
    """The kind of a dense or ℓ1 module (an ``L1FunctionalCall`` is the kind of its op), or None."""
    if isinstance(m, resolve("l1fx.nn.L1FunctionalCall")):
        return _SPECS.get(m.op)
    for spec in _SPECS.values():
        if spec.is_instance(m):
            return spec
    return None


def spec_for_function(fn: Any) -> Optional[LayerSpec]:
    """The kind whose ``functions`` include the ``call_function`` target ``fn``, or None."""
    for spec in _SPECS.values():
        if any(fn is f for f in spec.functions):
            return spec
    return None


def _packet(op: Any) -> Any:
    return getattr(op, "overloadpacket", op)


def spec_for_l1_op(op: Any) -> Optional[LayerSpec]:
    """The first kind whose ℓ1 custom op is ``op`` (an OpOverload or its packet); conv kinds share one op."""
    packet = _packet(op)
    for spec in _SPECS.values():
        if spec.l1_op is not None and _l1_packet(spec.l1_op) is packet:
            return spec
    return None


def _l1_packet(qualified: str):
    namespace, _, name = qualified.partition("::")
    return getattr(getattr(torch.ops, namespace), name)


def function_targets() -> frozenset:
    """Every ``call_function`` target of a registered kind."""
    return frozenset(f for s in _SPECS.values() for f in s.functions)


def l1_op_overloads() -> tuple:
    """The default overloads of the kinds' ℓ1 custom ops (what a TorchFunctionMode sees)."""
    seen: list = []
    for s in _SPECS.values():
        if s.l1_op is not None:
            op = _l1_packet(s.l1_op).default
            if op not in seen:
                seen.append(op)
    return tuple(seen)


class FunctionNames(Mapping):
    """Live ``{call_function target: kind name}`` view (``passes.analyse.FUNCTIONS``)."""

    def _table(self) -> dict:
        return {f: s.name for s in _SPECS.values() for f in s.functions}

    def __getitem__(self, fn):
        spec = spec_for_function(fn)
        if spec is None:
            raise KeyError(fn)
        return spec.name

    def __contains__(self, fn) -> bool:
        return spec_for_function(fn) is not None

    def __iter__(self) -> Iterator:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"FunctionNames({self._table()!r})"


# ---------------------------------------------------------------- source names (the codemod's table)
def source_table() -> dict[str, str]:
    """Qualified dense name -> qualified ℓ1 replacement, for every kind that has one."""
    table = {}
    for s in _SPECS.values():
        if s.l1_module is not None:
            table.update(dict.fromkeys(s.source_modules, s.l1_module))
        if s.l1_function is not None:
            table.update(dict.fromkeys(s.source_functions, s.l1_function))
    return table


def l1_source_names() -> frozenset[str]:
    """Qualified names of calls that are already ℓ1 (candidates the codemod never changes)."""
    names = set()
    for s in _SPECS.values():
        names.update(n for n in (s.l1_module, s.l1_function) if n is not None)
        names.update(s.l1_aliases)
    return frozenset(names)


# ---------------------------------------------------------------- replacements (torchao-style handlers)
_REPLACEMENTS: dict[tuple[str, str], Callable[..., nn.Module]] = {}


def register_replacement(variant: str, *kinds: str):
    """Decorator: ``fn(dense_module, **options) -> replacement`` builds the ``variant`` layer for ``kinds``.

    As torchao's ``@register_quantize_module_handler(ConfigType)``: the
    transform lives next to what it handles, and callers look it up by key.
    """
    def decorate(fn):
        for kind in kinds:
            _REPLACEMENTS[(variant, kind)] = fn
        return fn

    return decorate


def has_replacement(kind: str, variant: str = "l1") -> bool:
    """Whether layer kind ``kind`` (a spec name) has a ``variant`` replacement (a registered handler, or for
    ``"l1"`` its ℓ1 class)."""
    if (variant, kind) in _REPLACEMENTS:
        return True
    return variant == "l1" and get(kind).l1_class is not None


def build_replacement(module: nn.Module, variant: str = "l1", **options) -> nn.Module:
    """The ``variant`` replacement of a dense ``module`` (weights and construction arguments copied).

    ``options`` go to the builder (for ``"l1"``: ``from_dense``, e.g. ``share_parameters=True``).
    """
    spec = spec_for_module(module)
    if spec is None:
        raise TypeError(f"{type(module).__name__} is not a registered layer kind "
                        f"(registered: {', '.join(s.module_op for s in _SPECS.values())})")
    fn = _REPLACEMENTS.get((variant, spec.name))
    if fn is not None:
        return fn(module, **options)
    if variant == "l1" and spec.l1_class is not None:
        return spec.l1_class.from_dense(module, **options)
    raise TypeError(f"layer kind {spec.name!r} has no {variant!r} replacement"
                    + (f": {spec.unsupported}" if spec.unsupported else ""))


# ---------------------------------------------------------------- FLOP formulas
def register_l1_flop_formulas() -> None:
    """Register :func:`l1_flops` for every kind's ℓ1 op not yet in torch's flop registry (idempotent)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    from .. import ops as _ops  # noqa: F401  (defines torch.ops.l1fx.*)

    for s in _SPECS.values():
        if s.l1_op is not None:
            p = _l1_packet(s.l1_op)
            if p not in flop_registry:  # the first kind of an op gives its formula (conv kinds share one)
                register_flop_formula(p)(l1_flops if s.macs is count_macs else _flops_of(s.macs))


def _flops_of(macs: Callable[..., int]) -> Callable[..., int]:
    """The FlopCounterMode formula of an ℓ1 op whose kind counts MACs its own way: 2 per MAC."""
    def flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * macs(out_shape, w_shape, x_shape)

    return flops


# The built-in kinds (each file registers its specs; this order is the order of specs()).
from . import linear  # noqa: E402,F401,I001
from . import conv  # noqa: E402,F401
from . import conv_transpose  # noqa: E402,F401
from . import lp  # noqa: E402,F401  (the "lp" replacement variant of linear/conv*d)
