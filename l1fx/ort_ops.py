"""A faster onnxruntime path for ``l1fx`` nodes: l1fx's own kernels as onnxruntime custom ops.

An exported file runs in plain onnxruntime through its function bodies
(:mod:`l1fx.onnx_ops`). Where l1fx and ``onnxruntime-extensions`` are
installed, :func:`fast_session` runs the same file with each ``L1Linear`` /
``L1Conv`` node computed by ``torch.ops.l1fx.linear`` / ``torch.ops.l1fx.conv``
(whichever l1fx backend is active, e.g. the compiled CPU kernel), called from
onnxruntime as a Python custom op. The file on disk is not changed: the
session is built from an in-memory copy whose l1 nodes are moved to the
extensions' custom-op domain (``ai.onnx.contrib``).

Only float32 tensors are supported (the onnxruntime-extensions Python-op bridge
marshals one dtype per declared input).

What the bridge costs (profiled with cProfile, bench/bench_onnx.py): it copies
each input into a new numpy array and the result back into onnxruntime's
output (about 1 ms for 12 MB), and its result hook turns the result into a
Python list (``rv.flatten().tolist()``, one float object per element: 90 ms
of the 100 ms a 16384 x 128 output took, 17x the kernel) that its C++ side then
converts back into an array. The ops here return a :class:`_Flat` array,
whose ``flatten()`` is a view and ``tolist()`` the array itself, so the C++
side gets a contiguous float32 array and copies it once. The kernel that runs
is the active l1fx backend's (the compiled ``cpu`` one where it builds).

The native custom-op library (:mod:`l1fx.kernels.ort_build`) needs no copy at
all; :func:`l1fx.ort_session` (in :mod:`l1fx.ort_runtime`) picks the fastest path available.

    from l1fx.ort_ops import fast_session
    sess = fast_session("model.onnx")
    y = sess.run(None, {"x": x})
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import onnx

from . import onnx_ops
from .errors import BackendUnavailable, UsageError

CONTRIB_DOMAIN = "ai.onnx.contrib"
FAST_OP_TYPES = {onnx_ops.LINEAR: "L1fxLinear", onnx_ops.CONV: "L1fxConv"}
_LIST_ATTRS = ("strides", "pads", "dilations")
_registered = False


def available() -> tuple[bool, str]:
    """``(True, "")`` if onnxruntime-extensions can be imported, else ``(False, why)``."""
    try:
        import onnxruntime_extensions  # noqa: F401
    except ImportError as e:
        return False, f"onnxruntime-extensions is not installed ({e}); pip install onnxruntime-extensions"
    return True, ""


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")] if text else []


class _Flat(np.ndarray):
    """A C-contiguous result array that the extensions' hook hands to its C++ side as it is.

    The hook calls ``rv.flatten().tolist()``; here ``flatten`` is a view and
    ``tolist`` returns the plain array, so no Python list of floats is built.
    """

    def flatten(self, order="C"):  # noqa: D102 - see the class
        return self.reshape(-1)

    def tolist(self):  # noqa: D102
        return self.view(np.ndarray)


def _result(y) -> "_Flat":
    return np.ascontiguousarray(y.numpy(), dtype=np.float32).view(_Flat)


def _register_ops() -> None:
    """Register the Python custom ops with onnxruntime-extensions (once per process)."""
    global _registered
    if _registered:
        return
    ok, why = available()
    if not ok:
        raise BackendUnavailable(f"l1fx fast onnxruntime path: {why}")
    import torch
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32 = PyCustomOpDef.dt_float

    @onnx_op(op_type=FAST_OP_TYPES[onnx_ops.LINEAR], inputs=[f32, f32, f32], outputs=[f32])
    def l1fx_linear(x, w, b):
        with torch.no_grad():
            y = torch.ops.l1fx.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), 1.0)
        return _result(y)

    @onnx_op(op_type=FAST_OP_TYPES[onnx_ops.CONV], inputs=[f32, f32, f32], outputs=[f32],
             attrs={"strides": PyCustomOpDef.dt_string, "pads": PyCustomOpDef.dt_string,
                    "dilations": PyCustomOpDef.dt_string, "group": PyCustomOpDef.dt_int64})
    def l1fx_conv(x, w, b, strides="", pads="", dilations="", group=1):
        pads_ = _ints(pads)
        nd = len(pads_) // 2
        with torch.no_grad():
            y = torch.ops.l1fx.conv(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                    _ints(strides), pads_[:nd], _ints(dilations), int(group), 1.0)
        return _result(y)

    _registered = True


def _rewrite_graph(graph: onnx.GraphProto) -> int:
    count = 0
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                count += _rewrite_graph(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                count += sum(_rewrite_graph(g) for g in attr.graphs)
        if node.domain != onnx_ops.DOMAIN or node.op_type not in FAST_OP_TYPES:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if "pads" in attrs:
            pads = list(attrs["pads"])
            if pads[: len(pads) // 2] != pads[len(pads) // 2:]:
                raise UsageError(f"l1fx fast path: node {node.name!r} has asymmetric pads {pads}; "
                                 "run it with a plain onnxruntime session instead")
        node.domain = CONTRIB_DOMAIN
        node.op_type = FAST_OP_TYPES[node.op_type]
        del node.attribute[:]
        for name, value in attrs.items():
            if name in _LIST_ATTRS:
                value = ",".join(str(int(v)) for v in value)
            node.attribute.append(onnx.helper.make_attribute(name, value))
        count += 1
    return count


def to_fast_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``l1fx`` nodes call the l1fx kernels through onnxruntime-extensions."""
    fast = onnx.ModelProto()
    fast.CopyFrom(model)
    if _rewrite_graph(fast.graph) and not any(o.domain == CONTRIB_DOMAIN for o in fast.opset_import):
        fast.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return fast


def fast_session(model: Union[str, Path, onnx.ModelProto], sess_options=None, providers=None):
    """An ``onnxruntime.InferenceSession`` running l1 nodes with l1fx's kernels (CPU, float32)."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    _register_ops()
    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    opts = sess_options if sess_options is not None else ort.SessionOptions()
    opts.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(to_fast_model(proto).SerializeToString(), opts,
                                providers=providers or ["CPUExecutionProvider"])
