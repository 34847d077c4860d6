"""Time and peak memory of one exported l1 layer under each onnxruntime path.

Paths compared, side by side:

* ``torch``        - ``torch.ops.l1fx`` in PyTorch (the active l1fx backend), the baseline;
* ``ort-broadcast`` - plain onnxruntime, unchunked function body (materialises N x M x K);
* ``ort-chunked``   - plain onnxruntime, the default function body (row blocks of <= 64 MiB via Scan);
* ``ort-fast``      - onnxruntime + onnxruntime-extensions calling l1fx's kernel (:mod:`l1fx.ort_ops`).

Each path runs in its own subprocess so the peak resident memory it reports
(growth of the peak resident set, VmHWM, over the level after loading and
building the session and inputs; Linux only) is its own. Times are the best
and the median of ``--repeat`` runs after one warm-up run (the best is the
steadier number on a shared machine).

    python bench/bench_onnx.py                       # PointNet++-shaped linear layers + a Conv3d
    python bench/bench_onnx.py --rows 16384 --k 64 --m 128 --no-conv
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PATHS = ("torch", "ort-broadcast", "ort-chunked", "ort-fast")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); returns the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _layer(case: dict):
    import torch

    from l1fx import nn as L

    torch.manual_seed(0)
    if case["kind"] == "linear":
        layer = L.L1Linear(case["k"], case["m"])
        x = torch.randn(case["rows"], case["k"])
    else:
        layer = L.L1Conv3d(case["cin"], case["m"], 3, padding=1)
        s = case["size"]
        x = torch.randn(case["batch"], case["cin"], s, s, s)
    return layer.eval(), x


def _child(case: dict, path: str, onnx_file: str, repeat: int) -> dict:
    """Runs in the subprocess: build one path, time it, report peak memory growth."""
    import numpy as np
    import torch

    layer, x = _layer(case)
    if path == "torch":
        run = lambda: layer(x)  # noqa: E731
    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        if path == "ort-fast":
            from l1fx.ort_ops import fast_session

            sess = fast_session(onnx_file, opts)
        else:
            sess = ort.InferenceSession(onnx_file, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        run = lambda: sess.run(None, feed)[0]  # noqa: E731
    base = _reset_peak()
    with torch.no_grad():
        run()  # warm-up (kernel build, arena growth); its memory counts, its time does not
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            t0 = time.perf_counter()
            y = run()
            times.append(time.perf_counter() - t0)
    peak = _status_mb("VmHWM") - base
    with torch.no_grad():
        ref = layer(x).numpy()
    err = float(np.abs(np.asarray(y) - ref).max() / max(np.abs(ref).max(), 1e-30))
    return {"ms": 1e3 * min(times), "ms_median": 1e3 * statistics.median(times), "peak_mb": peak, "rel_err": err}


def _export(case: dict, onnx_file: str, chunk_bytes) -> None:
    from l1fx.export import export_onnx

    layer, x = _layer(case)
    # Export on a small batch (the batch dimension is dynamic); the timed runs check the numbers, and
    # verifying the broadcast body would itself need gigabytes.
    export_onnx(layer, (x[:2],), onnx_file, chunk_bytes=chunk_bytes, verify=chunk_bytes != 0)


def _describe(case: dict) -> str:
    if case["kind"] == "linear":
        return f"L1Linear N={case['rows']} K={case['k']} M={case['m']}"
    s = case["size"]
    return f"L1Conv3d k3 B={case['batch']} C={case['cin']}->{case['m']} {s}^3"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--k", type=int, nargs="*", default=[9, 64])
    ap.add_argument("--m", type=int, nargs="*", default=[128])
    ap.add_argument("--no-conv", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(_child(spec["case"], spec["path"], spec["file"], spec["repeat"])))
        return 0

    cases = [{"kind": "linear", "rows": n, "k": k, "m": m} for n in args.rows for k in args.k for m in args.m]
    if not args.no_conv:
        cases.append({"kind": "conv", "batch": 2, "cin": 16, "m": 32, "size": 24})
    print(f"cpus: {os.cpu_count()}, repeat {args.repeat} after a warm-up; time: best (median)")
    print(f"{'layer':<40} {'path':<14} {'time ms':>18} {'peak MB':>9} {'rel err':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for ci, case in enumerate(cases):
            files = {"ort-broadcast": os.path.join(tmp, f"c{ci}_b.onnx"),
                     "ort-chunked": os.path.join(tmp, f"c{ci}_c.onnx")}
            _export(case, files["ort-broadcast"], 0)
            _export(case, files["ort-chunked"], None)
            files["ort-fast"] = files["ort-chunked"]
            for path in args.paths:
                spec = {"case": case, "path": path, "file": files.get(path, ""), "repeat": args.repeat}
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{_describe(case):<40} {path:<14} failed: {tail}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                ms = f"{r['ms']:.1f} ({r['ms_median']:.1f})"
                print(f"{_describe(case):<40} {path:<14} {ms:>18} {r['peak_mb']:>9.1f} {r['rel_err']:>9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
