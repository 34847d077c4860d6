"""Exported l1 layers and models in onnxruntime, side by side with PyTorch and the dense model.

Two tables in one run (``--what layers models`` by default):

**Layers** (one exported l1 layer), paths:

* ``torch``         - ``torch.ops.l1fx`` in PyTorch (the active l1fx backend), the baseline;
* ``ort-native``    - ``l1fx.ort_session``'s native path: the l1fx custom-op library (same C++ kernel);
* ``ort-python``    - onnxruntime-extensions calling the kernel from Python (:mod:`l1fx.ort_ops`);
* ``ort-portable``  - plain onnxruntime, the default function body (row blocks via Scan);
* ``ort-broadcast`` - plain onnxruntime, the unchunked body (materialises N x M x K; not run by default).

**Models** (bundled part-segmentation models of :mod:`l1fx.models`, batch 8 x 1024 points, BN
statistics calibrated on random data so the outputs depend on the inputs), paths:

* ``dense-ort``     - the dense model exported (``export_onnx``) and run in plain onnxruntime: the target;
* ``dense-session`` - the dense model traced by l1fx's tracer (as ``convert`` does) before the export, so that
  its point helpers become l1fx nodes too (PointNet++'s farthest point sampling: the native kernel instead
  of torch's unrolled loop), through ``l1fx.ort_session``: the like-for-like dense deployment;
* ``l1-eager``      - the converted model in eager PyTorch;
* ``l1-session``    - the converted model's file through ``l1fx.ort_session`` (the fastest path here);
* ``l1-unfused``    - ... through ``ort_session``'s native path with ``fuse=False`` (the file's graph: each
  l1 node alone, onnxruntime's own norm, ReLU and Concat nodes around it);
* ``l1-python``     - ... through the Python custom-op path;
* ``l1-portable``   - ... in plain onnxruntime (function bodies, what runs without l1fx).

Each measurement runs in its own subprocess so the peak memory it reports (growth of the
peak resident set, VmHWM, over the level after building the session or model and the
inputs; Linux only) is its own. Times are the best and the median of ``--repeat`` runs
after one warm-up run (the best is the steadier number on a shared machine). The ratio
columns divide by ``torch`` (layers) or by ``dense-ort`` and ``l1-eager`` (models).

    python bench/bench_onnx.py                                   # both tables
    python bench/bench_onnx.py --what layers --rows 16384 --k 64 --m 128 --no-conv
    python bench/bench_onnx.py --what models --models pointnet --ratios 1 --markdown out.md
    python bench/bench_onnx.py --what models --threads 1    # one thread everywhere (steadier on a busy machine)
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
import warnings

LAYER_PATHS = ("torch", "ort-native", "ort-python", "ort-portable", "ort-broadcast")
DEFAULT_LAYER_PATHS = ("torch", "ort-native", "ort-python", "ort-portable")
MODEL_PATHS = ("dense-ort", "dense-session", "l1-eager", "l1-session", "l1-unfused", "l1-python", "l1-portable")
MODELS = ("pointnet", "pointnet2", "voxelcnn")
DEFAULT_MODELS = MODELS
SESSION_PATH = {"ort-native": "native", "ort-python": "python", "l1-session": None, "dense-session": None,
                "l1-unfused": "native", "l1-python": "python"}
BATCH, POINTS, PARTS, CATEGORIES = 8, 1024, 50, 16


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


def _time(run, repeat: int) -> dict:
    import torch

    base = _reset_peak()
    with torch.no_grad():
        y = run()  # warm-up (kernel build, arena growth); its memory counts, its time does not
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            y = run()
            times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * min(times), "ms_median": 1e3 * statistics.median(times),
            "peak_mb": _status_mb("VmHWM") - base, "y": y}


THREADS_ENV = "L1FX_BENCH_THREADS"  # --threads, handed to the measurement subprocesses


def _threads() -> int:
    """--threads (0: each library's default) and, when set, the same count for torch in this process."""
    n = int(os.environ.get(THREADS_ENV, "0") or 0)
    if n > 0:
        import torch

        torch.set_num_threads(n)
    return n


def _plain_session(onnx_file: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if _threads() > 0:
        so.intra_op_num_threads = _threads()
    return ort.InferenceSession(onnx_file, so, providers=["CPUExecutionProvider"])


def _session(onnx_file: str, path, fuse: bool = True):
    """A session on one l1 path (``None``: whatever ``ort_session`` picks); ``fuse``: ort_session's."""
    from l1fx.ort_runtime import PATHS, ort_session

    if path == "plain":
        return _plain_session(onnx_file), "plain"
    opts = {"intra_op_num_threads": _threads()} if _threads() > 0 else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sess = ort_session(onnx_file, paths=PATHS if path is None else (path,), fuse=fuse, **opts)
    return sess, sess.l1fx_path


def _rel_err(y, ref) -> float:
    import numpy as np

    y, ref = np.asarray(y, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---------------------------------------------------------------- layers
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


def _layer_child(case: dict, path: str, onnx_file: str, repeat: int) -> dict:
    import torch

    layer, x = _layer(case)
    used = "torch"
    if path == "torch":
        run = lambda: layer(x)  # noqa: E731
    else:
        sess, used = _session(onnx_file, "plain" if path in ("ort-portable", "ort-broadcast") else SESSION_PATH[path])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        run = lambda: sess.run(None, feed)[0]  # noqa: E731
    r = _time(run, repeat)
    with torch.no_grad():
        ref = layer(x).numpy()
    r["rel_err"] = _rel_err(r.pop("y"), ref)
    r["used"] = used
    return r


def _interleaved_child(case: dict, onnx_file: str, repeat: int) -> dict:
    """One process, the paths called in turn, ``repeat`` rounds: median per path.

    On a shared machine the load drifts between the per-path subprocesses; calls
    alternated within one process see the same load, so their ratio is the steadier one.
    """
    import torch

    layer, x = _layer(case)
    runs = {"torch": lambda: layer(x)}
    for path in ("ort-native", "ort-python"):
        try:
            sess, used = _session(onnx_file, SESSION_PATH[path])
        except Exception:  # noqa: BLE001 - that path is unavailable here; the table says so elsewhere
            continue
        if used == SESSION_PATH[path]:
            feed = {sess.get_inputs()[0].name: x.numpy()}
            runs[path] = (lambda s, f: lambda: s.run(None, f)[0])(sess, feed)
    times: dict = {p: [] for p in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(repeat):
            for p, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[p].append(time.perf_counter() - t0)
    return {p: 1e3 * statistics.median(t) for p, t in times.items()}


def _export_layer(case: dict, onnx_file: str, chunk_bytes) -> None:
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


# ---------------------------------------------------------------- models
def _inputs(batch: int):
    import torch

    g = torch.Generator().manual_seed(1)
    pts = torch.rand(batch, 3, POINTS, generator=g) * 2 - 1
    cat = torch.randint(0, CATEGORIES, (batch,), generator=g)
    return pts, cat


def _build(name: str, ratio):
    """The bundled model (dense when ``ratio`` is None, else converted), BN calibrated, in eval mode."""
    import torch

    import l1fx
    from l1fx.models import build_model

    torch.manual_seed(0)
    model = build_model(name, PARTS, CATEGORIES)
    example = _inputs(2)
    if ratio is not None:
        model = l1fx.convert(model, ratio=ratio, example_inputs=example)
    model.train()
    with torch.no_grad():  # calibrate batch-norm statistics so that outputs are not constant
        for _ in range(3):
            model(*_inputs(BATCH))
    return model.eval()


def _load_model(spec: dict):
    """The parent's converted model (saved with torch.save), so the rel err column compares the very
    model whose output is the reference; rebuilt (seeded, the same model) if it could not be saved."""
    import torch

    if spec.get("model"):
        return torch.load(spec["model"], weights_only=False).eval()
    print(f"bench_onnx: the converted {spec['name']} could not be handed over; rebuilt it, so the l1-eager rel err "
          "compares a rebuilt model", file=sys.stderr)
    return _build(spec["name"], spec["ratio"])


def _model_child(spec: dict) -> dict:
    import torch

    pts, cat = _inputs(BATCH)
    ref = torch.load(spec["ref"], weights_only=False)
    used = ""
    if spec["path"] == "l1-eager":
        model = _load_model(spec)
        run = lambda: model(pts, cat)  # noqa: E731
        used = "torch"
    else:
        sess, used = _session(spec["file"], {"dense-ort": "plain", "l1-portable": "plain"}.get(
            spec["path"], SESSION_PATH.get(spec["path"])), fuse=spec["path"] != "l1-unfused")
        names = [i.name for i in sess.get_inputs()]
        feed = dict(zip(names, [pts.numpy(), cat.numpy()]))
        run = lambda: sess.run(None, feed)[0]  # noqa: E731
    r = _time(run, spec["repeat"])
    r["rel_err"] = _rel_err(r.pop("y"), ref)
    r["used"] = used
    return r


def _model_interleaved_child(spec: dict) -> dict:
    """Dense file, eager l1 model and the l1 file's sessions called in turn in one process: medians."""
    import torch

    pts, cat = _inputs(BATCH)
    runs = {}
    if spec.get("dense"):
        dense = _plain_session(spec["dense"])
        feed_d = dict(zip([i.name for i in dense.get_inputs()], [pts.numpy(), cat.numpy()]))
        runs["dense-ort"] = lambda: dense.run(None, feed_d)
    model = _load_model(spec)
    runs["l1-eager"] = lambda: model(pts, cat)
    if spec.get("file"):
        for path in ("l1-session", "l1-unfused", "l1-python"):
            try:
                sess, used = _session(spec["file"], SESSION_PATH[path], fuse=path != "l1-unfused")
            except Exception:  # noqa: BLE001 - unavailable here
                continue
            feed = dict(zip([i.name for i in sess.get_inputs()], [pts.numpy(), cat.numpy()]))
            runs[path] = (lambda s_, f_: lambda: s_.run(None, f_))(sess, feed)
    times: dict = {p: [] for p in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(spec["repeat"]):
            for p, run in runs.items():
                # onnxruntime's pool threads spin for a while after a run (the plain dense session's by
                # default) and would take the cores from the next path's run: let them park first.
                time.sleep(0.02)
                t0 = time.perf_counter()
                run()
                times[p].append(time.perf_counter() - t0)
    return {p: 1e3 * statistics.median(t) for p, t in times.items()}


def _prepare_model(name: str, ratio: float, tmp: str, cache: dict) -> dict:
    """Export the dense (once per model) and converted files; returns paths or an error per file."""
    import torch

    from l1fx.export import export_onnx

    out = {}
    pts, cat = _inputs(2)
    if name not in cache:
        dense = _build(name, None)
        f = os.path.join(tmp, f"{name}_dense.onnx")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(dense, (pts, cat), f)
            cache[name] = {"file": f}
        except Exception as e:  # noqa: BLE001 - reported in the table
            cache[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    out["dense"] = cache[name]
    model = _build(name, ratio)
    tag = f"{name}_{ratio:g}"
    # The subprocesses load this very model (and check against this output); a model that does not
    # pickle is rebuilt there (seeded).
    ref = os.path.join(tmp, f"{tag}_ref.pt")
    with torch.no_grad():
        torch.save(model(*_inputs(BATCH)), ref)
    out["model"] = os.path.join(tmp, f"{tag}_model.pt")
    try:
        torch.save(model, out["model"])
    except Exception:  # noqa: BLE001 - not picklable: the children rebuild it
        out["model"] = None
    f = os.path.join(tmp, f"{tag}.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model, (pts, cat), f)
        out["l1"] = {"file": f, "ref": ref}
    except Exception as e:  # noqa: BLE001
        out["l1"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", "ref": ref}
    return out


def _prepare_dense_traced(name: str, tmp: str, cache: dict) -> dict:
    """The dense model traced by l1fx (its helpers as graph nodes, as in a converted model), exported once."""
    key = f"{name}:traced"
    if key not in cache:
        from l1fx.export import export_onnx
        from l1fx.passes.trace import trace_model

        dense = _build(name, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = trace_model(dense, _inputs(2)).graph_module or dense
            f = os.path.join(tmp, f"{name}_dense_traced.onnx")
            try:
                export_onnx(traced.eval(), _inputs(2), f)
                cache[key] = {"file": f}
            except Exception as e:  # noqa: BLE001 - reported in the table
                cache[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return cache[key]


# ---------------------------------------------------------------- driver
def _run_child(spec: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(r: dict) -> str:
    return f"{r['ms']:.1f} ({r['ms_median']:.1f})"


def run_layers(args, rows_out: list) -> None:
    cases = [{"kind": "linear", "rows": n, "k": k, "m": m} for n in args.rows for k in args.k for m in args.m]
    if not args.no_conv:
        cases.append({"kind": "conv", "batch": 2, "cin": 16, "m": 32, "size": 24})
    print(f"\n{'layer':<40} {'path':<14} {'ran':<9} {'time ms':>16} {'x torch':>8} {'peak MB':>8} {'rel err':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for ci, case in enumerate(cases):
            files = {"ort-broadcast": os.path.join(tmp, f"c{ci}_b.onnx"), "ort-portable": os.path.join(tmp, f"c{ci}.onnx")}
            if "ort-broadcast" in args.paths:
                _export_layer(case, files["ort-broadcast"], 0)
            _export_layer(case, files["ort-portable"], None)
            base = None
            inter = _run_child({"kind": "interleaved", "case": case, "file": files["ort-portable"],
                                "repeat": 3 * args.repeat}, args.timeout)
            if "error" not in inter and "torch" in inter:
                parts = [f"{p} {inter[p] / inter['torch']:.2f}" for p in inter if p != "torch"]
                line = f"interleaved medians, x torch ({inter['torch']:.1f} ms): " + ", ".join(parts)
                print(f"{_describe(case):<40} {line}")
                rows_out.append((_describe(case), "interleaved", "", line, "", "", ""))
            for path in args.paths:
                spec = {"kind": "layer", "case": case, "path": path, "repeat": args.repeat,
                        "file": files.get(path, files["ort-portable"])}
                r = _run_child(spec, args.timeout)
                if "error" in r:
                    print(f"{_describe(case):<40} {path:<14} failed: {r['error']}")
                    rows_out.append((_describe(case), path, "failed", r["error"], "", "", ""))
                    continue
                base = r["ms"] if path == "torch" else base
                ratio = f"{r['ms'] / base:.2f}" if base else "-"
                print(f"{_describe(case):<40} {path:<14} {r['used']:<9} {_fmt(r):>16} {ratio:>8} "
                      f"{r['peak_mb']:>8.1f} {r['rel_err']:>8.1e}")
                rows_out.append((_describe(case), path, r["used"], _fmt(r), ratio, f"{r['peak_mb']:.1f}",
                                 f"{r['rel_err']:.1e}"))


def run_models(args, rows_out: list) -> None:
    print(f"\n{'model':<18} {'path':<12} {'ran':<9} {'time ms':>16} {'x dense':>8} {'x eager':>8} "
          f"{'peak MB':>8} {'x dense':>8} {'rel err':>8}")
    cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for ratio in args.ratios:
                label = f"{name} r={ratio:g}"
                try:
                    files = _prepare_model(name, ratio, tmp, cache)
                except Exception as e:  # noqa: BLE001 - conversion failed: report and go on
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    print(f"{label:<18} failed to build/convert: {msg}")
                    rows_out.append((label, "all", "failed", msg, "", "", "", "", ""))
                    continue
                dense_ms = dense_mb = eager_ms = None
                inter = _run_child({"kind": "model-interleaved", "repeat": 2 * args.model_repeat,
                                    "dense": files["dense"].get("file"), "file": files["l1"].get("file"),
                                    "name": name, "ratio": ratio, "model": files["model"]}, args.timeout)
                if "error" not in inter:
                    ref_d, ref_e = inter.get("dense-ort"), inter["l1-eager"]
                    parts = [f"{p} {v:.1f} ms" + (f" = {v / ref_d:.2f}x dense" if ref_d else "")
                             + f" = {v / ref_e:.2f}x eager" for p, v in inter.items()]
                    line = "interleaved medians: " + ", ".join(parts)
                    print(f"{label:<18} {line}")
                    rows_out.append((label, "interleaved", "", line, "", "", "", "", ""))
                for path in args.model_paths:
                    if path == "dense-ort":
                        info = files["dense"]
                    elif path == "dense-session":
                        info = _prepare_dense_traced(name, tmp, cache)
                    else:
                        info = files["l1"]
                    if "error" in info and path != "l1-eager":
                        print(f"{label:<18} {path:<12} not exported: {info['error']}")
                        rows_out.append((label, path, "failed", f"export: {info['error']}", "", "", "", "", ""))
                        continue
                    spec = {"kind": "model", "path": path, "repeat": args.model_repeat,
                            "file": info.get("file", ""), "name": name, "ratio": ratio, "ref": files["l1"]["ref"],
                            "model": files["model"]}
                    if path.startswith("dense-"):  # compare the dense file against the dense model's own output
                        spec["ref"] = os.path.join(tmp, f"{name}_dense_ref.pt")
                        if not os.path.exists(spec["ref"]):
                            import torch

                            with torch.no_grad():
                                torch.save(_build(name, None)(*_inputs(BATCH)), spec["ref"])
                    r = _run_child(spec, args.timeout)
                    if "error" in r:
                        print(f"{label:<18} {path:<12} failed: {r['error']}")
                        rows_out.append((label, path, "failed", r["error"], "", "", "", "", ""))
                        continue
                    if path == "dense-ort":
                        dense_ms, dense_mb = r["ms"], r["peak_mb"]
                    if path == "l1-eager":
                        eager_ms = r["ms"]
                    xd = f"{r['ms'] / dense_ms:.2f}" if dense_ms else "-"
                    xe = f"{r['ms'] / eager_ms:.2f}" if eager_ms else "-"
                    xm = f"{r['peak_mb'] / dense_mb:.2f}" if dense_mb and path != "l1-eager" else "-"
                    print(f"{label:<18} {path:<12} {r['used']:<9} {_fmt(r):>16} {xd:>8} {xe:>8} "
                          f"{r['peak_mb']:>8.1f} {xm:>8} {r['rel_err']:>8.1e}")
                    rows_out.append((label, path, r["used"], _fmt(r), xd, xe, f"{r['peak_mb']:.1f}", xm,
                                     f"{r['rel_err']:.1e}"))


def _markdown(path: str, layers: list, models: list, header: str) -> None:
    lines = [header, ""]
    if layers:
        lines += ["| layer | path | ran | time ms best (median) | × torch | peak MB | rel err |",
                  "|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in layers]
        lines.append("")
    if models:
        lines += ["| model | path | ran | time ms best (median) | × dense ORT | × l1 eager | peak MB | "
                  "peak × dense | rel err |", "|---|---|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in models]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", nargs="*", default=["layers", "models"], choices=["layers", "models"])
    ap.add_argument("--rows", type=int, nargs="*", default=[16384])
    ap.add_argument("--k", type=int, nargs="*", default=[64])
    ap.add_argument("--m", type=int, nargs="*", default=[128])
    ap.add_argument("--no-conv", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--paths", nargs="*", default=list(DEFAULT_LAYER_PATHS), choices=LAYER_PATHS)
    ap.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), choices=MODELS)
    ap.add_argument("--ratios", type=float, nargs="*", default=[1.0, 0.667])
    ap.add_argument("--model-paths", nargs="*", default=list(MODEL_PATHS), choices=MODEL_PATHS)
    ap.add_argument("--model-repeat", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement subprocess")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for torch, onnxruntime (intra-op) and the l1fx kernels in every measurement "
                         "(default: each library's own default, the cores)")
    ap.add_argument("--markdown", help="also write the tables to this Markdown file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _threads()  # every child, also those that build no onnxruntime session (torch layer, l1-eager)
        spec = json.loads(args.child)
        if spec["kind"] == "layer":
            r = _layer_child(spec["case"], spec["path"], spec["file"], spec["repeat"])
        elif spec["kind"] == "model-interleaved":
            r = _model_interleaved_child(spec)
        elif spec["kind"] == "interleaved":
            r = _interleaved_child(spec["case"], spec["file"], spec["repeat"])
        else:
            r = _model_child(spec)
        print(json.dumps(r))
        return 0
    if args.threads > 0:
        os.environ[THREADS_ENV] = str(args.threads)
    _threads()
    import torch

    header = (f"cpus: {os.cpu_count()}, torch threads {torch.get_num_threads()}"
              + (f", onnxruntime intra-op threads {args.threads}" if args.threads > 0 else "")
              + "; best (median) of "
              f"{args.repeat} (layers) / {args.model_repeat} (models) runs after a warm-up; "
              f"models at batch {BATCH} x {POINTS} points")
    print(header)
    layers: list = []
    models: list = []
    if "layers" in args.what:
        run_layers(args, layers)
    if "models" in args.what:
        run_models(args, models)
    if args.markdown:
        _markdown(args.markdown, layers, models, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
