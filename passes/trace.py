"""Trace pass: torch.fx symbolic tracing that narrows failures down instead of giving up.

Most public point-network code does not trace as written (control flow on
shapes, ``torch.zeros(B, npoint)``, loops over the batch, ``.item()``, numpy).
On each failure we look at the traceback for the innermost *user* frame and
make the smallest change that removes it, then trace again:

1. a plain helper function (``farthest_point_sample``) becomes one opaque
   graph node, a call of an :class:`OpaqueFunction` module (no parameters, so
   nothing to convert is hidden and state_dict keys are unchanged);
2. otherwise the submodule whose method failed becomes a leaf; its layers
   are converted later by module swap;
3. if the root module itself fails, no graph is kept and the whole model is
   converted by module swap.

Every step is recorded in the :class:`TraceReport` (and leaves/whole-model
fallbacks are warned about, naming the module and the original error).

Random draws stay random: fx records a call only when an argument is a Proxy,
so ``torch.randn(4)`` would run once at trace time and be baked in as a
constant. While tracing, torch's random functions (:data:`RANDOM_TORCH_FUNCTIONS`),
``nn.functional``'s dropout-like ones (:data:`RANDOM_FUNCTIONAL`) and random
tensor methods (:data:`RANDOM_METHODS`) are wrapped so that they always become
graph nodes; a value drawn at random that decides Python control flow (``if
torch.rand(()) < p``) then fails to trace like any Proxy in a branch, and that
module falls back to a leaf (or the model to a whole-model swap). A tensor
filled by an in-place random method is that call's node in every later op,
traced or not (:class:`_RandomFillGuard`). The patches are process-wide, so
tracing holds one lock (:data:`_TRACE_LOCK`): one thread traces at a time. Likewise
each module's ``training`` is a stand-in while tracing: an argument of a call
becomes a read of the live flag, a Python branch on it falls back.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sysconfig
import threading
import traceback
import types
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from l1fx import layers
from l1fx.nn import L1Module

from .rng import preserved_rng
from .state import ConversionState, TraceReport

__all__ = ["L1Tracer", "OpaqueFunction", "trace", "trace_model", "HELPERS", "RANDOM_TORCH_FUNCTIONS",
           "RANDOM_FUNCTIONAL", "RANDOM_METHODS"]

HELPERS = "l1fx_helpers"  # root attribute holding the OpaqueFunction modules
_MISSING = object()


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class OpaqueFunction(nn.Module):
    """A helper function that cannot be traced, called as one graph node.

    A module (rather than an fx-wrapped function) so that the node survives
    ``copy.deepcopy`` and ``torch.save``/``torch.load`` of the graph module,
    which re-trace the generated code with every module as a leaf.
    """

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return _qualname(self.fn)


def _leaf_types() -> tuple:
    from l1fx import nn as l1nn

    extra = tuple(getattr(l1nn, n) for n in ("L1OutputNorm", "L1FunctionalCall") if hasattr(l1nn, n))
    return (L1Module, OpaqueFunction) + extra


# Functions that draw random numbers. fx records a call only when an argument is a Proxy, so
# ``torch.randn(4)`` in forward would run once while tracing and become a constant: the same
# "noise" on every call, a random branch fixed for good. While tracing, L1Tracer wraps them so
# that they always become call nodes (leaves), whatever their arguments.
RANDOM_TORCH_FUNCTIONS = (
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
    "multinomial", "poisson", "binomial", "dropout", "dropout_", "alpha_dropout", "alpha_dropout_",
    "feature_dropout", "feature_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_", "native_dropout",
    "rrelu", "rrelu_",
)
RANDOM_FUNCTIONAL = (
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "rrelu", "rrelu_",
    "gumbel_softmax", "fractional_max_pool2d", "fractional_max_pool3d", "fractional_max_pool2d_with_indices",
    "fractional_max_pool3d_with_indices",
)
# Tensor methods that draw random numbers (``torch.empty(4).uniform_()``); recorded as call_method.
RANDOM_METHODS = ("uniform_", "normal_", "bernoulli_", "bernoulli", "random_", "exponential_", "geometric_",
                  "log_normal_", "cauchy_", "multinomial")


class _TrainingFlag:
    """A module's ``training`` while tracing: a read of the flag when passed to a call, an error in a branch.

    fx would otherwise bake ``F.dropout(x, 0.5, self.training)`` and ``if self.training:`` with the
    mode the model was traced in, so dropout or noise would stay on after ``.eval()`` (or never run in
    training). Passed to a call, the flag becomes a ``get_attr`` of the module's ``training``; used as a
    Python bool it fails like any traced value in control flow, and the module becomes a leaf.
    """

    __slots__ = ("path", "value")

    def __init__(self, path: str, value: bool) -> None:
        self.path, self.value = path, value

    def _branch(self):
        where = f"module '{self.path}'" if self.path else "the root module"
        raise fx.proxy.TraceError(f"Python control flow on self.training of {where} cannot be traced")

    def __bool__(self) -> bool:
        self._branch()

    __index__ = __int__ = __bool__

    def __eq__(self, other) -> bool:
        self._branch()

    __ne__ = __eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return repr(self.value)


# Re-entrant: a forward that is being traced may itself convert (and so trace) another model.
_TRACE_LOCK = threading.RLock()

# Functions that read only a tensor's metadata, never its values (``n.shape``, ``n.size(0)``).
_METADATA = frozenset({"shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "is_sparse",
                       "is_quantized", "is_meta", "names", "size", "dim", "ndimension", "numel", "nelement",
                       "element_size", "stride", "is_contiguous", "is_floating_point", "is_complex", "__len__",
                       "get_device"})


def _function_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):  # a property such as Tensor.shape: name the property
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


_IN_PLACE_OPERATORS = frozenset(f"__i{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod",
                                                        "pow", "and", "or", "xor", "lshift", "rshift"))


def _in_place(func) -> bool:
    name = _function_name(func)
    return (name.endswith("_") and not name.startswith("__")) or name in _IN_PLACE_OPERATORS


class _RandomFillGuard(torch.overrides.TorchFunctionMode):
    """While tracing: an op on a tensor filled by a recorded in-place random call is recorded too.

    ``n = torch.empty(4); n.uniform_()`` records the fill as a node, and a use of ``n`` in a traced
    call becomes that node (:meth:`L1Tracer.create_arg`). But ``n * 0.1``, with no traced value
    among its arguments, would run once on the trace-time numbers and fx would keep its result as a
    constant: the same "noise" on every call. This mode hands such ops the fill's node instead of
    ``n``, so they are recorded; an in-place op on ``n`` becomes what later uses of ``n`` read. A
    use that needs the values in Python (``n.item()``, ``n.tolist()``, a branch) then fails to trace
    like any traced value, and the module becomes a leaf, which runs eagerly and stays random.
    Metadata reads (``n.shape``) keep the real tensor. (Torch function modes are per thread.)
    """

    def __init__(self, tracer: "L1Tracer") -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        filled = self.tracer.random_values
        if not filled or _function_name(func) in _METADATA:
            return func(*args, **kwargs)

        def traced(a):
            hit = filled.get(id(a)) if isinstance(a, torch.Tensor) else None
            return hit[1] if hit is not None and hit[0] is a else a

        call_args, call_kwargs = pytree.tree_map(traced, (tuple(args), kwargs))
        if _has_proxy(call_args, call_kwargs):  # record it, as fx does for an op on a traced value
            result = fx.Proxy.__torch_function__(func, (fx.Proxy,), call_args, call_kwargs)
        else:
            result = func(*args, **kwargs)
        if args and isinstance(result, fx.Proxy) and _in_place(func):
            hit = filled.get(id(args[0]))
            if hit is not None and hit[0] is args[0]:  # n.mul_(2): later uses of n are this result
                filled[id(args[0])] = (hit[0], result)
        return result


def _has_proxy(args, kwargs) -> bool:
    found = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return bool(found)


class L1Tracer(fx.Tracer):
    """fx tracer with extra leaves (by module identity), opaque helper functions and random calls kept.

    Default-constructible, because loading a pickled GraphModule re-creates
    its tracer class without arguments (and re-traces the generated code, so
    random calls are kept again).
    """

    def __init__(self, leaves: Iterable[nn.Module] = (), opaque: Optional[dict] = None,
                 example_values: Optional[dict] = None) -> None:
        super().__init__()
        self.leaf_ids = {id(m) for m in leaves}
        # placeholder name -> example input: a branch on shapes only (``if x.dim() > 3``) is decided by it
        self.example_values = dict(example_values or {})
        self.shape_branches: list[str] = []  # "node == value" for each branch decided so
        # fn -> (target name, [(globals dict, name bound to fn), ...])
        self.opaque = dict(opaque or {})
        # id(tensor made in forward) -> (tensor, proxy of the random in-place call that filled it)
        self.random_values: dict[int, tuple] = {}
        self.keeping_random = False  # True while the random functions are wrapped
        self.thread = None  # the tracing thread: calls from other threads run as usual

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _leaf_types()) or id(m) in self.leaf_ids:
            return True
        # A registered layer kind is one call_module node even when it is not a torch.nn class
        # (fx keeps only those as leaves by default), so analyse sees it and rewrite can swap it.
        # Subclasses are traced as before (their forward may differ from the kind's).
        spec = layers.spec_for_module(m)
        if spec is not None and (type(m) is spec.module or (spec.l1_class is not None
                                                             and isinstance(m, spec.l1_class))):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None):
        # The patches are process-wide (torch.randn, Tensor.uniform_, module flags): two threads tracing
        # at once would save each other's wrappers as the "originals" and leave torch patched for good.
        with _TRACE_LOCK, self._patched_helpers(), self._patched_random(root), self._training_flags(root), \
                self._patched_jit_isinstance(), _RandomFillGuard(self):
            return super().trace(root, concrete_args)

    @contextlib.contextmanager
    def _patched_jit_isinstance(self):
        """``torch.jit.isinstance(proxy, torch.Tensor)`` is True while tracing (MONAI's ``UpCat``).

        Eagerly it is False for a Proxy, so the traced graph would silently take the other branch (a
        skip connection dropped). Only the plain Tensor check is answered; anything else (``List[Tensor]``,
        ``Optional[...]``) runs as usual and the trace check catches a wrong branch.
        """
        original = torch.jit.isinstance
        tracer, thread = self, threading.get_ident()

        def jit_isinstance(obj, target_type):
            if isinstance(obj, fx.Proxy) and obj.tracer is tracer and threading.get_ident() == thread and \
                    isinstance(target_type, type) and issubclass(torch.Tensor, target_type):
                return True
            return original(obj, target_type)

        jit_isinstance.__wrapped__ = original
        torch.jit.isinstance = jit_isinstance
        try:
            yield
        finally:
            torch.jit.isinstance = original

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on shapes only (``if x.dim() > 3``, ``if x.shape[1] == 3``) is taken as the example input decides.

        Only when every value the condition reads is tensor metadata (``shape``, ``size()``, ``dim()``,
        ``numel()``...) of the example inputs, combined by plain Python operators; anything that reads
        tensor values still fails to trace (its module becomes a leaf). The graph then assumes these
        shapes: the trace check compares it with the eager model on the same inputs.
        """
        value = _shape_value(obj.node, self.example_values) if self.example_values else _MISSING
        if value is _MISSING:
            return super().to_bool(obj)
        self.shape_branches.append(f"{obj.node.name} -> {bool(value)}")
        return bool(value)

    @contextlib.contextmanager
    def _training_flags(self, root):
        saved = []
        try:
            if isinstance(root, nn.Module):
                for path, m in root.named_modules():
                    value = m.__dict__.get("training")
                    if type(value) is bool:
                        saved.append((m, value))
                        m.__dict__["training"] = _TrainingFlag(path, value)
            yield
        finally:
            for m, value in saved:
                m.__dict__["training"] = value

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        # torch's own functions call themselves through their module (handle_torch_function(dropout, ...)),
        # which may hand fx our wrapper: record the original, which generated code can name
        target = getattr(target, "_l1fx_original", target)
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def create_arg(self, a: Any):
        # a tensor filled in place by a recorded random call is that call's node, not a constant
        if isinstance(a, torch.Tensor):
            hit = self.random_values.get(id(a))
            if hit is not None and hit[0] is a:
                return hit[1].node
        if isinstance(a, _TrainingFlag):  # read the module's flag when the graph runs
            return self.create_proxy("get_attr", f"{a.path}.training" if a.path else "training", (), {}).node
        return super().create_arg(a)

    # -------------------------------------------------------------- random calls
    @contextlib.contextmanager
    def _patched_random(self, root):
        """Wrap torch's random functions and methods (and names user code bound to them) while tracing."""
        saved = []  # (owner, name, value or _MISSING)

        def patch(owner, name, value):
            saved.append((owner, name, owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else
                          getattr(owner, name)))
            setattr(owner, name, value)

        wrappers: dict[int, tuple[Callable, Callable]] = {}  # id(original) -> (original, wrapper)
        try:
            for namespace, names in ((torch, RANDOM_TORCH_FUNCTIONS), (torch.nn.functional, RANDOM_FUNCTIONAL)):
                for name in names:
                    fn = getattr(namespace, name, None)
                    if fn is None:
                        continue
                    if id(fn) not in wrappers:
                        wrappers[id(fn)] = (fn, self._random_call(fn))
                    patch(namespace, name, wrappers[id(fn)][1])
            for name in RANDOM_METHODS:
                if hasattr(torch.Tensor, name):
                    patch(torch.Tensor, name, self._random_method(name))
            # ``from torch import randn`` in the model's own modules
            modules = root.modules() if isinstance(root, nn.Module) else ()
            scopes = {id(g): g for m in modules
                      for g in [getattr(getattr(type(m), "forward", None), "__globals__", None)] if g is not None}
            for scope in scopes.values():
                for name, value in list(scope.items()):
                    hit = wrappers.get(id(value))
                    if hit is not None and hit[0] is value:
                        saved.append((scope, name, value))
                        scope[name] = hit[1]
            self.keeping_random, self.thread = True, threading.get_ident()
            yield
        finally:
            self.keeping_random = False
            for owner, name, value in reversed(saved):
                if isinstance(owner, dict):
                    owner[name] = value
                elif value is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, value)

    def recording(self) -> bool:
        return self.keeping_random and threading.get_ident() == self.thread

    def _random_call(self, fn: Callable) -> Callable:
        tracer = self

        def call(*args, **kwargs):
            if not tracer.recording() or _has_proxy(args, kwargs):  # fx records it anyway
                return fn(*args, **kwargs)
            return tracer.create_proxy("call_function", fn, args, kwargs)

        call.__wrapped__ = call._l1fx_original = fn
        call.__name__ = getattr(fn, "__name__", "random")  # fx names nodes after it
        return call

    def _random_method(self, name: str) -> Callable:
        tracer = self
        original = getattr(torch.Tensor, name)

        def method(t, *args, **kwargs):
            if not tracer.recording() or not isinstance(t, torch.Tensor) or _has_proxy(args, kwargs):
                return original(t, *args, **kwargs)
            if name.endswith("_") and t._base is not None:
                # later reads of the base tensor would still see trace-time numbers
                raise TypeError(f"in-place random {name} on a view of a tensor made in forward cannot be traced")
            proxy = tracer.create_proxy("call_method", name, (t,) + args, kwargs)
            if name.endswith("_"):  # later uses of t are uses of this call's result
                tracer.random_values[id(t)] = (t, proxy)
            return proxy

        method.__wrapped__ = method._l1fx_original = original
        method.__name__ = name
        return method

    @contextlib.contextmanager
    def _patched_helpers(self):
        saved = []
        try:
            for fn, (target, bindings) in self.opaque.items():
                wrapper = self._opaque_call(fn, target)
                for scope, name in bindings:
                    saved.append((scope, name, scope[name]))
                    scope[name] = wrapper
            yield
        finally:
            for scope, name, value in reversed(saved):
                scope[name] = value

    def _opaque_call(self, fn: Callable, target: str) -> Callable:
        tracer = self

        def call(*args, **kwargs):
            if not _has_proxy(args, kwargs):  # called on constants: just run it
                return fn(*args, **kwargs)
            return tracer.create_proxy("call_module", target, args, kwargs)

        call.__wrapped__ = fn
        return call


# ------------------------------------------------------------------ shape branches
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})
_SHAPE_ATTRS = frozenset({"shape", "ndim"})


def _shape_value(node: fx.Node, example_values: dict) -> Any:
    """The value of ``node`` if it depends on the example inputs' metadata only, else ``_MISSING``."""
    import operator

    memo: dict = {}

    def value(n: fx.Node, tensor_ok: bool) -> Any:
        key = (n, tensor_ok)
        if key in memo:
            return memo[key]
        out = _MISSING
        if n.op == "placeholder":
            if tensor_ok and n.target in example_values:
                out = example_values[n.target]
        elif n.op == "call_method" and n.target in _SHAPE_METHODS or (
                n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] in _SHAPE_ATTRS):
            args = [value(a, True) if isinstance(a, fx.Node) else a for a in n.args]
            if _MISSING not in args and isinstance(args[0], torch.Tensor):
                out = getattr(args[0], n.target)(*args[1:]) if n.op == "call_method" else getattr(args[0], args[1])
        elif n.op == "call_function" and getattr(n.target, "__module__", None) in ("_operator", "operator") \
                and n.target is not operator.setitem:
            args = [value(a, False) if isinstance(a, fx.Node) else a for a in n.args]
            if _MISSING not in args and not any(isinstance(a, torch.Tensor) for a in args):
                out = n.target(*args)
        memo[key] = out
        return out

    try:
        return value(node, False)
    except Exception:  # noqa: BLE001 - could not decide: let it fail to trace as before
        return _MISSING


# ------------------------------------------------------------------ culprit search
def _library_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    import numpy

    import l1fx
    import l1fx.kernels
    import l1fx.passes

    packages = tuple(os.path.realpath(os.path.dirname(m.__file__)) + os.sep
                     for m in (torch, numpy, l1fx, l1fx.passes, l1fx.kernels))
    stdlib = tuple(os.path.realpath(p) + os.sep for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib")} if p)
    return packages, stdlib


_LIB_DIRS: Optional[tuple] = None


def _is_user_frame(frame: types.FrameType) -> bool:
    """Frames of the user's model code: not torch, numpy, l1fx, the standard library or generated code."""
    global _LIB_DIRS
    if _LIB_DIRS is None:
        _LIB_DIRS = _library_dirs()
    packages, stdlib = _LIB_DIRS
    filename = frame.f_code.co_filename
    if filename.startswith("<"):  # fx-generated code, exec'd strings; old IPython cells are user code
        return filename.startswith("<ipython-input")
    path = os.path.realpath(filename)
    if any(path.startswith(d) for d in packages):
        return False
    installed = "site-packages" in path or "dist-packages" in path  # user code may be pip-installed
    return installed or not any(path.startswith(d) for d in stdlib)


def _global_function(frame: types.FrameType) -> Optional[Callable]:
    """The module-level function running in ``frame``, if it is one."""
    fn = frame.f_globals.get(frame.f_code.co_name)
    if isinstance(fn, types.FunctionType) and fn.__code__ is frame.f_code:
        return fn
    return None


def _culprits(exc: BaseException, module_ids: dict[int, str]):
    """Yield what could be made opaque, innermost first: ("function", fn, caller globals) or ("module", m)."""
    frames = [f for f, _ in traceback.walk_tb(exc.__traceback__)]
    user = [f for f in frames if _is_user_frame(f)]
    for frame in reversed(user):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in module_ids:
            yield ("module", owner)
            continue
        fn = _global_function(frame)
        if fn is not None:
            caller = frame.f_back
            yield ("function", fn, caller.f_globals if caller is not None else {})


def _next_step(exc: BaseException, names: dict, model: nn.Module, leaves: dict, tried_functions: set):
    """The smallest change that may get past ``exc``: an untried helper, else a new leaf; None: give up."""
    for kind, obj, *rest in _culprits(exc, names):
        if kind == "function":
            if obj not in tried_functions:
                return (kind, obj, *rest)
        elif obj is model:
            # a method of the root (a helper a submodule calls back into): the submodule that
            # called it, further out, becomes the leaf; with none, the whole model is swapped
            continue
        elif id(obj) not in leaves:
            return (kind, obj)
    return None


def _bindings(fn: Callable, caller_globals: dict) -> list[tuple[dict, str]]:
    out = []
    for scope in (fn.__globals__, caller_globals):
        for name, value in list(scope.items()):
            if value is fn and not any(s is scope and n == name for s, n in out):
                out.append((scope, name))
    return out


def _concrete_args(model: nn.Module, example_inputs) -> Optional[dict]:
    """Non-tensor example values (None flags, ints) and unfilled defaults are fixed while tracing."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    concrete = {}
    given = list(example_inputs) if example_inputs is not None else []
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return concrete or None
        if i < len(given):
            v = given[i]
            if v is None or isinstance(v, (bool, int, float, str)):
                concrete[p.name] = v
        elif p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
    return concrete or None


# ------------------------------------------------------------------ graph module
def _build_graph_module(model: nn.Module, graph: fx.Graph, helpers: dict[str, nn.Module],
                        class_name: str) -> fx.GraphModule:
    """A GraphModule whose module hierarchy is the model's own (so every state_dict key survives)."""
    targets = {}
    for node in graph.nodes:
        # Postponed annotations (`from __future__ import annotations`) reach fx as strings such as
        # 'Tensor'; a GraphModule with a string type cannot be pickled (torch.save fails), and the
        # annotation carries nothing the conversion needs.
        if isinstance(node.type, str):
            node.type = None
        if node.op in ("get_attr", "call_module"):
            if node.target in helpers:
                targets[node.target] = helpers[node.target]
            else:
                targets[node.target] = _resolve(model, node.target)
    gm = fx.GraphModule(targets, graph, class_name=class_name)
    # fx installs placeholder containers holding only what the graph touches; put back the
    # real children (the same objects) so unused layers, ModuleList types and keys stay.
    gm._modules.clear()
    for name, child in model.named_children():
        gm.add_module(name, child)
    for name, p in model.named_parameters(recurse=False):
        gm.__dict__.pop(name, None)
        gm.register_parameter(name, p)
    for name, b in model.named_buffers(recurse=False):
        gm.__dict__.pop(name, None)
        gm.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
    if helpers:
        holder = gm._modules.get(HELPERS) or nn.Module()
        for target, m in helpers.items():
            holder.add_module(target.split(".", 1)[1], m)
        gm.add_module(HELPERS, holder)
    # plain attributes users read (num_classes, k, ...)
    for name, value in vars(model).items():
        if not name.startswith("_") and name != "training" and not hasattr(gm, name):
            try:
                setattr(gm, name, value)
            except Exception:  # properties etc.: not worth failing over
                pass
    gm.training = model.training
    keep_class_name(gm, class_name)
    gm.recompile()
    return gm


class _RestoreClassName:
    """GraphModule deepcopy hook: fx's ``__deepcopy__`` renames the copy to 'GraphModule'."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, gm: fx.GraphModule) -> None:
        type(gm).__name__ = self.name


def keep_class_name(gm: fx.GraphModule, name: str) -> None:
    """Keep the user's class name on ``gm`` through deepcopy and pickling (for reprs and summaries)."""
    gm._graphmodule_cls_name = name  # read by fx when unpickling
    hooks = getattr(gm, "_deepcopy_hooks", None)
    if isinstance(hooks, list) and not any(isinstance(h, _RestoreClassName) for h in hooks):
        hooks.append(_RestoreClassName(name))


def _resolve(root: nn.Module, target: str) -> Any:
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


class _Narrowing:
    """One model's tracing attempts: the leaves and opaque helpers found so far."""

    def __init__(self, model: nn.Module, example_inputs, report: TraceReport, quiet: bool = False) -> None:
        self.model, self.report, self.quiet = model, report, quiet
        self.names: dict[int, str] = {}
        for name, m in model.named_modules():
            self.names.setdefault(id(m), name)
        self.leaves: dict[int, nn.Module] = {}
        self.opaque: dict[Callable, tuple[str, list]] = {}
        self.helpers: dict[str, nn.Module] = {}
        self.tried_functions: set = set()
        self.concrete = _concrete_args(model, example_inputs)
        self.example_values = _example_values(model, example_inputs, self.concrete)

    def add_leaf(self, m: nn.Module, why: str) -> None:
        self.leaves[id(m)] = m
        name = self.names[id(m)]
        self.report.leaves[name] = why
        if not self.quiet:
            warnings.warn(
                f"l1fx.convert: torch.fx cannot trace module '{name}' ({type(m).__name__}): {why}. "
                f"It is kept as one graph node and its layers are converted by module swap.",
                stacklevel=_user_stacklevel(),
            )

    def run(self, limit: int) -> Optional[str]:
        """Trace until it works (the graph module is in the report) or give up (returns why)."""
        report = self.report
        while report.attempts < limit:
            report.attempts += 1
            tracer = L1Tracer(self.leaves.values(), self.opaque, self.example_values)
            try:
                graph = tracer.trace(self.model, concrete_args=self.concrete)
                report.graph_module = _build_graph_module(self.model, graph, self.helpers, type(self.model).__name__)
                report.shape_branches = list(tracer.shape_branches)
                return None
            except Exception as e:  # noqa: BLE001 - any tracing failure is narrowed, not raised
                why = first_line(e)
                step = _next_step(e, self.names, self.model, self.leaves, self.tried_functions)
                if step is None:
                    return why
                if step[0] == "function":
                    fn, caller_globals = step[1], step[2]
                    self.tried_functions.add(fn)
                    target = f"{HELPERS}.{_unique(fn.__name__, self.helpers, self.model)}"
                    self.helpers[target] = OpaqueFunction(fn)
                    self.opaque[fn] = (target, _bindings(fn, caller_globals))
                    report.opaque_functions[_qualname(fn)] = why
                else:
                    self.add_leaf(step[1], why)
        return f"gave up after {report.attempts} tracing attempts"


def _example_values(model: nn.Module, example_inputs, concrete: Optional[dict]) -> dict:
    """forward() parameter name -> example tensor (the placeholders' names), for shape branches."""
    if not example_inputs:
        return {}
    try:
        bound = inspect.signature(model.forward).bind_partial(*example_inputs)
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in bound.arguments.items()
            if isinstance(v, torch.Tensor) and k not in (concrete or {})}


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside l1fx (the caller of convert)."""
    import l1fx
    import l1fx.kernels
    import l1fx.passes

    own = tuple(os.path.realpath(os.path.dirname(m.__file__)) + os.sep for m in (l1fx, l1fx.passes, l1fx.kernels))
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None and os.path.realpath(frame.f_code.co_filename).startswith(own):
        frame, level = frame.f_back, level + 1
    return level


def trace_model(model: nn.Module, example_inputs=None, max_attempts: Optional[int] = None,
                check: bool = True) -> TraceReport:
    """Trace ``model`` with torch.fx, narrowing failures to opaque helpers and leaf modules.

    With ``check`` the graph is then compared with the eager model (:mod:`.trace_check`) on
    ``example_inputs`` (or a generated input) and modules are made leaves until they agree.
    """
    report = TraceReport()
    narrowing = _Narrowing(model, example_inputs, report)
    limit = max_attempts or (len(narrowing.names) + 64)
    why = narrowing.run(limit)
    if why is not None:
        return _whole_model(report, model, why)
    if check:
        from .trace_check import check_trace

        check_trace(report, narrowing, example_inputs, limit)
        if report.whole_model_error is not None:
            return _whole_model(report, model, report.whole_model_error)
    return report


def _unique(base: str, taken: dict, model: nn.Module) -> str:
    existing = getattr(model, HELPERS, None)
    existing = set(existing._modules) if isinstance(existing, nn.Module) else set()
    base = base.strip("_") or "fn"
    name, i = base, 1
    while f"{HELPERS}.{name}" in taken or name in existing:
        name, i = f"{base}_{i}", i + 1
    return name


def _whole_model(report: TraceReport, model: nn.Module, why: str) -> TraceReport:
    report.graph_module = None
    report.leaves.clear()
    report.opaque_functions.clear()
    report.whole_model_error = why
    warnings.warn(
        f"l1fx.convert: torch.fx cannot trace {type(model).__name__}.forward ({why}). "
        f"No graph is kept: the whole model is converted by module swap (functional "
        f"F.linear/F.conv calls are left dense and the order of layers is their registration order).",
        stacklevel=_user_stacklevel(),  # the caller of l1fx.convert
    )
    return report


def trace(state: ConversionState) -> ConversionState:
    """Pass 1: trace ``state.model``; fills ``state.trace``. Global RNG states are left as they were."""
    with preserved_rng():  # tracing runs user code (numpy or Python random draws, say)
        state.trace = trace_model(state.model, getattr(state.config, "example_inputs", None))
    return state
