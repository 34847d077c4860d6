"""One call to run an exported l1fx model in onnxruntime as fast as this machine allows.

    import l1fx
    sess = l1fx.ort_session("model.onnx", intra_op_num_threads=2)
    y = sess.run(None, {"points": x, "category": c})[0]

:func:`ort_session` returns a plain ``onnxruntime.InferenceSession`` running
the file's ``l1fx.L1Linear`` / ``l1fx.L1Conv`` nodes on the first path that works:

1. ``native``: the l1fx custom-op library (:mod:`l1fx.kernels.ort_build`), the
   ``cpu`` backend's C++ kernels run by onnxruntime on its own buffers (no copy,
   no Python). Needs a C++ compiler and the onnxruntime C API headers.
2. ``python``: onnxruntime-extensions calling the active l1fx backend from a
   Python custom op (:mod:`l1fx.ort_ops`; one copy of each input and output).
3. ``portable``: the model-local function bodies (:mod:`l1fx.onnx_ops`), standard
   ONNX ops only, what plain onnxruntime runs without l1fx installed.

Falling back to ``portable`` warns once (:class:`OrtFallbackWarning`, with the
reason); so does falling back from ``native`` to ``python``. The file on disk is
never changed: the native path runs an in-memory copy in which each l1 conv also does
the norm, ReLU and Concat around it (:mod:`l1fx.ort_fuse`; ``fuse=False`` runs the file's
graph), the Python path builds its session from an in-memory copy.

``sess_options`` is never changed: onnxruntime can neither copy a
``SessionOptions`` nor list its config entries, so pass a function returning a
new one (each path tried gets its own, with everything set on it); an object is
copied only as far as it can be read, with an :class:`OrtOptionsWarning`.
Keyword arguments are ``onnxruntime.SessionOptions`` attributes
(``intra_op_num_threads``, ``graph_optimization_level``, ...). Unless given,
``session.intra_op.allow_spinning`` is set to ``"0"`` when an l1fx kernel path is
used: the l1 kernels run their own OpenMP threads, and onnxruntime's idle pool
threads spinning beside them take the cores they need (measured:
bench/bench_onnx.py). With ``intra_op_num_threads`` set, the native kernels use that
many threads (``custom_op.l1fx.num_threads``); otherwise OpenMP's default.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import UsageError

PATHS = ("native", "python", "portable")
SPIN_KEY = "session.intra_op.allow_spinning"
THREADS_KEY = "custom_op.l1fx.num_threads"  # read by kernels/csrc/ort_ops.cpp


class OrtFallbackWarning(RuntimeWarning):
    """:func:`ort_session` runs a slower path than the fastest one (the message says why)."""


def native_library() -> str:
    """Path of the l1fx custom-op library (built on first use); :class:`KernelBuildError` if it cannot be."""
    from l1fx.kernels import ort_build

    return str(ort_build.library_path())


class OrtOptionsWarning(UserWarning):
    """A ``SessionOptions`` passed to :func:`ort_session` could not be copied completely (the message says what)."""


# onnxruntime can neither copy a SessionOptions nor list its config entries: these documented ones are the
# entries carried over when one is copied.
_CONFIG_KEYS = (SPIN_KEY, THREADS_KEY, "session.inter_op.allow_spinning", "session.set_denormal_as_zero",
                "session.use_env_allocators", "session.disable_prepacking", "session.intra_op_thread_affinities")

NOT_COPIED = ("other session config entries", "free-dimension overrides", "custom-op libraries",
              "initializers", "execution providers added to it")


def _config_entry(opts, key: str) -> Optional[str]:
    try:
        return opts.get_session_config_entry(key)
    except Exception:  # noqa: BLE001 - onnxruntime raises (a pybind11 error) for a key that was never set
        return None


def _copy(sess_options):
    """As much of ``sess_options`` as onnxruntime lets be read: its attributes and the ``_CONFIG_KEYS`` entries."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    for name in dir(sess_options):
        if name.startswith("_") or callable(getattr(sess_options, name)):
            continue
        try:
            setattr(opts, name, getattr(sess_options, name))
        except (AttributeError, TypeError):
            pass  # read-only
    for key in _CONFIG_KEYS:
        value = _config_entry(sess_options, key)
        if value is not None:
            opts.add_session_config_entry(key, value)
    return opts


def _base_options(sess_options):
    """A fresh ``SessionOptions`` that l1fx may change: new, made by the caller's factory, or a copy."""
    import onnxruntime as ort

    if sess_options is None:
        return ort.SessionOptions()
    if isinstance(sess_options, ort.SessionOptions):
        return _copy(sess_options)
    if callable(sess_options):
        opts = sess_options()
        if not isinstance(opts, ort.SessionOptions):
            raise UsageError(f"ort_session: sess_options() returned {type(opts).__name__}, "
                             "not an onnxruntime.SessionOptions")
        return opts
    raise UsageError(f"ort_session: sess_options must be an onnxruntime.SessionOptions or a function returning "
                     f"a new one, got {type(sess_options).__name__}")


def _options(sess_options, options: dict, path: str):
    """A ``SessionOptions`` of its own for one try: ``sess_options`` (never changed), ``options``, our defaults."""
    opts = _base_options(sess_options)
    for name, value in options.items():
        if name.startswith("_") or not hasattr(opts, name) or callable(getattr(opts, name)):
            raise UsageError(f"ort_session: {name!r} is not an onnxruntime.SessionOptions attribute")
        setattr(opts, name, value)
    if path != "portable":
        defaults = {SPIN_KEY: "0"}
        if opts.intra_op_num_threads > 0:  # the native kernels' OpenMP threads follow the session's count
            defaults[THREADS_KEY] = str(opts.intra_op_num_threads)
        for key, value in defaults.items():
            if _config_entry(opts, key) is None:  # the caller's own setting wins
                opts.add_session_config_entry(key, value)
    return opts


def _fused(model):
    """The native path's in-memory graph (:mod:`l1fx.ort_fuse`) and what was fused; ``(None, None)`` if
    the rewrite fails (the file then runs as it is, with a warning)."""
    import onnx

    from .ort_fuse import fuse

    try:
        proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
        fused, report = fuse(proto)
        return (fused.SerializeToString(), report) if report.any() else (None, report)
    except Exception as e:  # noqa: BLE001 - a rewrite that fails must not cost the user the session
        warnings.warn(f"l1fx.ort_session: running the native path without fusing norms and activations into "
                      f"the l1 nodes ({_first_line(e)})", OrtFallbackWarning, stacklevel=4)
        return None, None


def _session(model, sess_options, providers, options, path: str, fuse: bool = True):
    import onnxruntime as ort

    opts = _options(sess_options, options, path)
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    if path == "python":
        from .ort_ops import fast_session

        return fast_session(model, opts, providers)
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    report = None
    if path == "native":
        opts.register_custom_ops_library(native_library())
        if fuse:
            fused, report = _fused(model)
            src = fused or src
    sess = ort.InferenceSession(src, opts, providers=providers)
    sess.l1fx_fused = report
    return sess


def _warn_if_copied(sess_options) -> None:
    import onnxruntime as ort

    if isinstance(sess_options, ort.SessionOptions):
        warnings.warn(
            "l1fx.ort_session: onnxruntime cannot copy a SessionOptions, so the session gets its attributes and the "
            f"config entries {', '.join(_CONFIG_KEYS)} only, not its {', '.join(NOT_COPIED)}; to keep everything, "
            "pass sess_options=<a function returning a new SessionOptions> instead",
            OrtOptionsWarning, stacklevel=3)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def ort_session(model: Union[str, Path, "onnx.ModelProto"], sess_options=None,  # noqa: F821
                providers: Optional[Sequence[str]] = None, *, paths: Sequence[str] = PATHS, fuse: bool = True,
                **options):
    """An ``onnxruntime.InferenceSession`` for the exported file ``model``, on the fastest l1 path that works.

    Args:
        model: path of an ``.onnx`` file written by :func:`l1fx.export.export_onnx` (or an ``onnx.ModelProto``).
        sess_options: the ``onnxruntime.SessionOptions`` to start from, never changed: best a function
            returning a new one (called for each session l1fx makes or checks; everything set on it is kept).
            A ``SessionOptions`` object is copied as far as onnxruntime allows (its attributes and a few known
            config entries), with an :class:`OrtOptionsWarning` naming what is lost.
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``; the l1 kernels are CPU).
        paths: the paths to try, in order (default ``("native", "python", "portable")``).
        fuse: on the native path, run an in-memory copy of the graph in which each l1 conv takes over the
            inference BatchNormalization and Relu after it, the Concat before it and the channels that
            are constant along its positions (:mod:`l1fx.ort_fuse`; what was fused: ``sess.l1fx_fused``,
            a :class:`l1fx.ort_fuse.FuseReport`; ``None`` where the rewrite did not run). ``False`` runs the file's graph.
        **options: ``SessionOptions`` attributes, e.g. ``intra_op_num_threads=2``.

    The path taken is recorded on the session as ``sess.l1fx_path``. Raises
    :class:`UsageError` for a missing file or an unknown option; whatever makes
    the portable path fail (a broken file) is raised as onnxruntime raises it.
    """
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise UsageError(f"ort_session: paths must be a non-empty subset of {PATHS}, got {list(paths)}")
    if isinstance(model, (str, Path)) and not Path(model).is_file():
        raise UsageError(f"ort_session: no such ONNX file {str(model)!r}")
    _options(sess_options, options, "portable")  # bad options are the caller's error, not a reason to fall back
    _warn_if_copied(sess_options)
    failures: list[tuple[str, str]] = []
    for path in paths:
        try:
            sess = _session(model, sess_options, providers, options, path, fuse)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors (pybind11 classes) derive from Exception only
            if path == "portable":  # the file itself does not run: that is the caller's to see
                raise
            failures.append((path, _first_line(e)))
            continue
        if failures:
            why = "; ".join(f"{p}: {w}" for p, w in failures)
            warnings.warn(f"l1fx.ort_session: running the l1 nodes on the {path!r} path ({why})",
                          OrtFallbackWarning, stacklevel=2)
        sess.l1fx_path = path
        if not hasattr(sess, "l1fx_fused"):
            sess.l1fx_fused = None
        return sess
    # Only reached when ``paths`` leaves out "portable" and every path asked for failed.
    from .errors import BackendUnavailable

    raise BackendUnavailable("l1fx.ort_session: no path of " + ", ".join(repr(p) for p in paths) + " works here: "
                             + "; ".join(f"{p}: {w}" for p, w in failures))


__all__ = ["ort_session", "native_library", "OrtFallbackWarning", "OrtOptionsWarning", "PATHS"]
