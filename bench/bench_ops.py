"""l1 linear layer vs its peers on PointNet++-shaped layers, side by side in one run.

Peers: the inner-product layer (F.linear), the naive AdderNet-style broadcast
``-(x[:, None] - w[None]).abs().sum(-1)``, ``torch.cdist(p=1)`` and l1fx
(the ``auto`` backend and, separately, the ``reference`` oracle).
Prints median times, ratios to F.linear, and the peak extra memory of each
forward, measured in a fresh subprocess as the growth of peak RSS over the
RSS with the inputs already allocated.

    python bench/bench_ops.py              # forward, the issue's 4 shapes
    python bench/bench_ops.py --backward   # forward + backward too
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(32768, 9, 64), (32768, 9, 128), (32768, 64, 64), (32768, 64, 128)]
METHODS = ["linear", "l1fx", "l1fx-reference", "naive", "cdist"]


def make(n, k, m, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g).requires_grad_(grad)
    w = torch.randn(m, k, generator=g).requires_grad_(grad)
    return x, w


def run_method(method: str, x, w):
    if method == "linear":
        return F.linear(x, w)
    if method == "naive":
        return -(x.unsqueeze(1) - w.unsqueeze(0)).abs().sum(-1)
    if method == "cdist":
        return -torch.cdist(x, w, p=1)
    import l1fx.functional as L1F
    from l1fx.kernels import get_backend

    if method == "l1fx-reference":
        os.environ["L1FX_BACKEND"] = "reference"
    try:
        return L1F.l1_linear(x, w)
    finally:
        os.environ.pop("L1FX_BACKEND", None)


def time_it(fn, repeat: int, warmup: int = 5) -> float:
    # Several warm-up calls: the first ones page-fault fresh outputs (MiBs) and would skew a median.
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory_child(method, n, k, m, backward):
    import l1fx  # noqa: F401  (import cost outside the measurement)

    x, w = make(n, k, m, grad=backward)
    # Warm up on a tiny problem so lazy initialisation is not counted.
    xs, ws = make(8, k, m, grad=backward)
    y = run_method(method, xs, ws)
    if backward:
        y.sum().backward()
    del y
    _reset_peak_rss()
    base = _status_bytes("VmRSS")
    y = run_method(method, x, w)
    if backward:
        y.backward(torch.ones_like(y))
    print(max(0, _status_bytes("VmHWM") - base))


def peak_extra_bytes(method, n, k, m, backward) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", method, str(n), str(k), str(m), str(int(backward))],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurement")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--shapes", default=None, help="e.g. 32768x9x64,8192x256x512")
    p.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        method, n, k, m, bwd = args._child
        measure_memory_child(method, int(n), int(k), int(m), bool(int(bwd)))
        return
    import l1fx
    from l1fx.kernels import get_backend

    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    methods = args.methods.split(",")
    print(f"# l1 linear vs peers — torch {torch.__version__}, l1fx {l1fx.__version__}, "
          f"auto backend = {get_backend(torch.empty(1)).name}, threads = {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}")
    modes = [False, True] if args.backward else [False]
    for backward in modes:
        print(f"\n## {'forward + backward' if backward else 'forward'} (median of {args.repeat})\n")
        print("| N | K | M | method | time ms | × linear | peak extra MiB | × output size |")
        print("|---|---|---|---|---|---|---|---|")
        for n, k, m in shapes:
            x, w = make(n, k, m, grad=backward)
            out_bytes = n * m * 4
            base = None
            for method in methods:
                def step():
                    y = run_method(method, x, w)
                    if backward:
                        y.backward(torch.ones_like(y))
                        x.grad = w.grad = None
                t = time_it(step, args.repeat)
                base = t if method == "linear" else base
                ratio = f"{t / base:.2f}" if base else "-"
                if args.no_memory:
                    mem = memx = "-"
                else:
                    b = peak_extra_bytes(method, n, k, m, backward)
                    mem, memx = f"{b / 2**20:.1f}", f"{b / out_bytes:.2f}"
                print(f"| {n} | {k} | {m} | {method} | {t * 1e3:.1f} | {ratio} | {mem} | {memx} |", flush=True)


if __name__ == "__main__":
    main()
