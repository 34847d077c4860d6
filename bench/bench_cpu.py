"""CPU backend benchmark: l1 layer vs the inner-product layer it replaces.

For PointNet++ / 3D-CNN layer shapes, side by side in one run (round-robin,
so machine noise hits every column alike), medians of --reps runs:

* forward: F.linear / F.conv3d vs l1fx (cpu backend); with --baselines also the
  naive broadcast AdderNet-style ``-(x[:, None] - w[None]).abs().sum(-1)`` and
  ``torch.cdist(p=1)``;
* forward + backward: the inner-product layer vs l1fx at mix = 0.5 (the MGS
  regime: most training steps have 0 < mix < 1) and at mix = 1;
* peak extra memory of one forward call over the output size: the growth of
  the peak RSS (VmHWM, reset just before the call) in a fresh child process,
  output included, so it counts torch and C++ buffers alike (Linux only).

The naive broadcast needs an N*M*K temporary (GBs for the larger shapes): it is
timed on a slice of the rows and scaled linearly (its cost is linear in N);
such cells are marked with '*'.

    .venv/bin/python bench/bench_cpu.py [--reps 9] [--threads 2] [--no-memory] [--baselines]
    .venv/bin/python bench/bench_cpu.py --loop-bound   # GEMM step vs l1 step, bare loop
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

os.environ["L1FX_BACKEND"] = "cpu"  # fail loudly rather than benchmark the reference

from l1fx import functional as L  # noqa: E402
from l1fx.kernels import cpu  # noqa: E402

NAIVE_BYTES = 512 << 20  # largest N*M*K temporary the naive baseline may allocate

LINEAR_SHAPES = [(32768, 9, 64), (32768, 64, 128), (8192, 256, 512)]
CONV = dict(batch=2, cin=32, cout=32, grid=16, kernel=3)  # 3x3x3 Conv3d, padding 1, on a 16^3 grid
# The targets (ratios to the inner-product layer): forward, f+b at mix 0.5, f+b at mix 1.
TARGETS = {"linear": (1.5, 2.5, 2.0), "conv": (1.5, 3.0, 2.0)}


def cases():
    for n, k, m in LINEAR_SHAPES:
        yield f"linear N={n} K={k} M={m}", ("linear", n, k, m)
    c = CONV
    for stride in (1, 2):
        yield (f"conv3d {c['cin']}->{c['cout']} k{c['kernel']} {c['grid']}^3 x{c['batch']} s{stride}",
               ("conv", c["batch"], c["cin"], c["cout"], c["grid"], c["kernel"], stride))


def make(spec, requires_grad=False):
    torch.manual_seed(0)
    if spec[0] == "linear":
        _, n, k, m = spec
        t = [torch.randn(n, k), torch.randn(m, k), torch.randn(m)]
    else:
        _, b, ci, co, g, ks = spec[:6]
        t = [torch.randn(b, ci, g, g, g), torch.randn(co, ci, ks, ks, ks), torch.randn(co)]
    return [x.requires_grad_(requires_grad) for x in t]


def rows_matrix(spec, x, w):
    """The 2-D operands of the l1 core: (rows [N, K], filters [M, K])."""
    if spec[0] == "linear":
        return x, w
    ks, st = spec[5], spec[6]
    xp = F.pad(x, [ks // 2] * 6)
    cols = xp.unfold(2, ks, st).unfold(3, ks, st).unfold(4, ks, st)  # [B, C, D, H, W, k, k, k]
    cols = cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, w[0].numel())
    return cols, w.reshape(w.shape[0], -1)


def impls(spec):
    """name -> forward fn on inputs from make(); "l1fx" and "l1fx@0.5" differ only in their backward's mix."""
    is_lin = spec[0] == "linear"
    if is_lin:
        dense = lambda x, w, b: F.linear(x, w, b)  # noqa: E731
        l1 = lambda x, w, b, mix=1.0: L.l1_linear(x, w, b, mix=mix)  # noqa: E731
    else:
        pad, st = spec[5] // 2, spec[6]
        dense = lambda x, w, b: F.conv3d(x, w, b, stride=st, padding=pad)  # noqa: E731
        l1 = lambda x, w, b, mix=1.0: L.l1_conv3d(x, w, b, stride=st, padding=pad, mix=mix)  # noqa: E731

    def naive(x, w, b):
        xr, wr = rows_matrix(spec, x, w)
        per_row = wr.shape[0] * wr.shape[1] * 4
        rows = max(1, min(xr.shape[0], NAIVE_BYTES // per_row))
        y = -(xr[:rows].unsqueeze(1) - wr.unsqueeze(0)).abs().sum(-1) + b
        return y, xr.shape[0] / rows

    def cdist(x, w, b):
        xr, wr = rows_matrix(spec, x, w)
        return -torch.cdist(xr, wr, p=1) + b

    return {"dense": dense, "l1fx": l1, "l1fx@0.5": lambda x, w, b: l1(x, w, b, 0.5), "naive": naive,
            "cdist": cdist}


def fwd_bwd(fn):
    def run(x, w, b):
        y = fn(x, w, b)
        y.backward(torch.ones_like(y))
        x.grad = w.grad = b.grad = None
    return run


def time_round_robin(fns: dict, reps: int) -> dict:
    """Median seconds of each fn, called in turn so noise hits all alike."""
    times = {k: [] for k in fns}
    scale = {k: 1.0 for k in fns}
    for fn in fns.values():
        fn()  # warm up (and build the cpu kernels once)
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            times[k].append(time.perf_counter() - t0)
            if isinstance(out, tuple):
                scale[k] = out[1]
    return {k: (statistics.median(v) * scale[k], min(v) * scale[k], max(v) * scale[k], scale[k] != 1.0)
            for k, v in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux) and return it in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def memory_child(spec_json: str, impl: str) -> None:
    spec = tuple(json.loads(spec_json))
    fn = impls(spec)[impl]
    with torch.no_grad():
        # Warm up on a tiny problem of the same kind: the first call loads code
        # (torch.library dispatch, the C++ library) that is not the op's memory.
        tiny = (spec[0], 8, 3, 4) if spec[0] == "linear" else (spec[0], 1, 2, 2, 4, spec[5], spec[6])
        fn(*make(tiny))
    x, w, b = make(spec)
    with torch.no_grad():
        before = reset_peak_rss()
        out = fn(x, w, b)
        after = peak_rss_bytes()
    y = out[0] if isinstance(out, tuple) else out
    print(json.dumps({"extra": after - before, "out_bytes": y.numel() * y.element_size()}))


def measure_memory(spec, impl: str) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(spec), impl],
        capture_output=True, text=True, check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


# The inner loop alone, one core, data in cache: what one reduction step costs
# when it is a GEMM's FMA, the old inexact l1 step min + FMA (|x - w| = x + w -
# 2 min(x, w)), or the exact step sub + abs (AND) + FMA, per register tile; and,
# on the 4x6 tile, two other exact steps: sub + AND + add (no FMA) and
# sub + VRANGEPS(|d|) + FMA (AVX-512DQ).
LOOP_BOUND_SRC = r"""
#include <chrono>
#include <cstring>
#if defined(__AVX512DQ__)
#include <immintrin.h>
#endif
typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));
static volatile float kone = 1.0f;
template <int R, int FV, int L1>
static double run(long K, long reps) {
  static float xp[864 * 16], wp[864 * 128];
  for (int i = 0; i < 864 * 16; ++i) xp[i] = float(i % 7);
  for (int i = 0; i < 864 * 128; ++i) wp[i] = float(i % 5);
  vf acc[R][FV] = {};
  const vf one = kone - vf{};
  auto t0 = std::chrono::steady_clock::now();
  for (long rep = 0; rep < reps; ++rep)
    for (long k = 0; k < K; ++k) {
      vf w[FV];
      for (int f = 0; f < FV; ++f) std::memcpy(&w[f], wp + k * FV * 16 + f * 16, 64);
      for (int r = 0; r < R; ++r) {
        const vf x = xp[k * R + r] - vf{};
        for (int f = 0; f < FV; ++f) {
          if (L1 == 3) { acc[r][f] += (vf)((vi)(x - w[f]) & (vi{} + 0x7fffffff)); continue; }
#if defined(__AVX512DQ__)
          if (L1 == 4) {
            vf d = x - w[f];
            __m512 t;
            std::memcpy(&t, &d, 64);
            t = _mm512_range_ps(t, t, 0x0B);  // |d|: max |.| of (d, d), sign cleared
            std::memcpy(&d, &t, 64);
            acc[r][f] += d * one;
            continue;
          }
#endif
          acc[r][f] += L1 == 2   ? (vf)((vi)(x - w[f]) & (vi{} + 0x7fffffff)) * one
                       : L1 == 1 ? (x < w[f] ? x : w[f]) * one
                                 : x * w[f];
        }
      }
    }
  double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  float s = 0;
  for (int r = 0; r < R; ++r) for (int f = 0; f < FV; ++f) for (int i = 0; i < 16; ++i) s += acc[r][f][i];
  kone = s == 12345.f ? 2.f : 1.f;  // keep the result alive
  return double(K) * R * FV * 16 * reps / ns;  // (row, filter, k) pairs per ns
}
extern "C" double l1fx_loop_bound(int which) {
#if !defined(__AVX512DQ__)
  if (which == 10) return 0.0;  // no VRANGEPS on this target
#endif
  switch (which) {
    case 0: return run<8, 2, 0>(864, 3000);
    case 1: return run<8, 2, 1>(864, 3000);
    case 2: return run<8, 2, 2>(864, 3000);
    case 3: return run<6, 4, 0>(864, 2000);
    case 4: return run<6, 4, 1>(864, 2000);
    case 5: return run<6, 4, 2>(864, 2000);
    case 6: return run<4, 6, 0>(864, 2000);
    case 7: return run<4, 6, 1>(864, 2000);
    case 8: return run<4, 6, 2>(864, 2000);
    case 9: return run<4, 6, 3>(864, 2000);
    default: return run<4, 6, 4>(864, 2000);
  }
}
"""


def loop_bound() -> None:
    """Print pairs/ns of the bare inner loops (needs AVX-512-width vectors to mean what it says)."""
    import ctypes
    import tempfile
    from pathlib import Path

    from l1fx.kernels import cpu_build

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "loop_bound.cpp"
        src.write_text(LOOP_BOUND_SRC)
        lib = cpu_build.load(src, "l1fx_loop_bound")
    lib.l1fx_loop_bound.restype = ctypes.c_double
    names = [f"{step}, {tile} tile" for tile in ("8x2", "6x4", "4x6 (conv rows)")
             for step in ("FMA (GEMM)", "min+FMA (old, inexact)", "sub+abs+FMA (exact)")]
    names += ["sub+abs+add (exact), 4x6 tile", "sub+VRANGEPS+FMA (exact, AVX-512DQ), 4x6 tile"]
    for i, name in enumerate(names):
        best = max(lib.l1fx_loop_bound(i) for _ in range(3))
        print(f"{name:32} {best:6.1f} pairs/ns (one core, best of 3)")


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--baselines", action="store_true", help="also time the naive broadcast and torch.cdist")
    ap.add_argument("--only", default="", help="run only the cases whose label contains this text")
    ap.add_argument("--loop-bound", action="store_true", help="only time the bare inner loops (the bound in RESULTS.md)")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.loop_bound:
        loop_bound()
        return

    t0 = time.perf_counter()
    ok, why = cpu.available()
    if not ok:
        sys.exit(f"cpu backend unavailable: {why}")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print(f"cpu kernels: {cpu.build_info()} (first use in this process, {time.perf_counter() - t0:.2f} s)")
    print(f"medians of {args.reps} round-robin runs; ms; ratios l1fx / inner-product layer (target in brackets); "
          f"f+b = forward + backward; peak = peak extra memory of one l1fx forward / its output")
    print("'*' = timed on a row slice and scaled\n" if args.baselines else "")
    head = (f"{'layer':34} {'dense':>7} {'l1fx':>7} {'fwd':>11} | {'dense f+b':>9} {'mix .5':>7} {'ratio':>11} "
            f"{'mix 1':>7} {'ratio':>11} | {'peak':>5}")
    if args.baselines:
        head += f" | {'naive':>9} {'naive/l1':>8} {'cdist':>8} {'cdist/l1':>8}"
    print(head)
    print("-" * len(head))
    for label, spec in cases():
        if args.only not in label:
            continue
        fns = impls(spec)
        target = TARGETS[spec[0]]
        x, w, b = make(spec)
        names = ["dense", "l1fx"] + (["naive", "cdist"] if args.baselines else [])
        with torch.no_grad():
            fwd = time_round_robin({k: (lambda f=fns[k]: f(x, w, b)) for k in names}, args.reps)
        xg, wg, bg = make(spec, requires_grad=True)
        fb = time_round_robin({k: (lambda f=fwd_bwd(fns[k]): f(xg, wg, bg)) for k in ("dense", "l1fx@0.5", "l1fx")},
                              args.reps)
        ms = {k: v[0] * 1e3 for k, v in fwd.items()}
        fbm = {k: v[0] * 1e3 for k, v in fb.items()}

        def cell(r, t):
            return f"{r:5.2f} [{t:g}]" + ("!" if r > t else " ")

        mem = "     " if args.no_memory else "{:5.2f}".format(
            (lambda r: r["extra"] / r["out_bytes"])(measure_memory(spec, "l1fx")))
        line = (f"{label:34} {ms['dense']:7.2f} {ms['l1fx']:7.2f} {cell(ms['l1fx'] / ms['dense'], target[0])} | "
                f"{fbm['dense']:9.2f} {fbm['l1fx@0.5']:7.2f} {cell(fbm['l1fx@0.5'] / fbm['dense'], target[1])} "
                f"{fbm['l1fx']:7.2f} {cell(fbm['l1fx'] / fbm['dense'], target[2])} | {mem}")
        if args.baselines:
            star = "*" if fwd["naive"][3] else " "
            line += (f" | {ms['naive']:8.1f}{star} {ms['naive'] / ms['l1fx']:8.1f} {ms['cdist']:8.2f} "
                     f"{ms['cdist'] / ms['l1fx']:8.2f}")
        print(line, flush=True)
        spread = {k: f"{v[1] * 1e3:.1f}-{v[2] * 1e3:.1f}" for k, v in {**fwd, **{"fb": fb["l1fx@0.5"]}}.items()
                  if k in ("dense", "l1fx", "fb")}
        print(f"{'':34} (min-max ms: forward dense {spread['dense']}, l1fx {spread['l1fx']}; "
              f"l1fx f+b mix .5 {spread['fb']})")
    print("\n'!' = target missed")


if __name__ == "__main__":
    main()
