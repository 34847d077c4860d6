"""The float32 l1 forward kernels (cpu backend) side by side with the dense layer they replace.

Per layer of the bundled models' hot paths (PointNet part seg and the voxel CNN, batch 8 x 1024
points, resolution 12) and one plain linear: the best of ``--repeat`` timed calls of the cpu
backend's forward (``l1fx.kernels.cpu``, the same C++ kernel that ``l1fx.ort_session`` runs) and of
``F.conv1d`` / ``F.conv3d`` / ``F.linear`` (oneDNN), in one process, interleaved, so a shared
machine slows both alike. Columns: both times, the ratio l1 / dense, the l1 kernel's rate in
G|x - w| per second, and which conv kernel ran (rows / packed / linear).

    python bench/bench_fp32_forward.py                   # 1 thread, all layers
    python bench/bench_fp32_forward.py --threads 2 --only pn vox
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

B, N, RES = 8, 1024, 12

# (name, kind, C_in, C_out, spatial, kernel, stride, padding)
LAYERS = [
    ("pn 3->32", "conv1d", 3, 32, (N,), 1, 1, 0),
    ("pn 32->64", "conv1d", 32, 64, (N,), 1, 1, 0),
    ("pn 64->128", "conv1d", 64, 128, (N,), 1, 1, 0),
    ("pn 368->128", "conv1d", 368, 128, (N,), 1, 1, 0),
    ("pn 128->64", "conv1d", 128, 64, (N,), 1, 1, 0),
    ("pn 64->50", "conv1d", 64, 50, (N,), 1, 1, 0),
    ("vox 4->16 k3", "conv3d", 4, 16, (RES,) * 3, 3, 1, 1),
    ("vox 16->32 k3 s2", "conv3d", 16, 32, (RES,) * 3, 3, 2, 1),
    ("vox 32->32 k3", "conv3d", 32, 32, (RES // 2,) * 3, 3, 1, 1),
    ("vox 48->16 k1", "conv3d", 48, 16, (RES,) * 3, 1, 1, 0),
    ("vox 35->64", "conv1d", 35, 64, (N,), 1, 1, 0),
    ("linear 8192x128->128", "linear", 128, 128, (), 0, 1, 0),
]


def _best(fn, repeat: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(layers, repeat: int, rounds: int):
    from l1fx.kernels import cpu

    g = torch.Generator().manual_seed(0)
    rows = []
    for name, kind, c, m, sp, k, s, p in layers:
        nd = len(sp)
        if kind == "linear":
            x = torch.randn(B * N, c, generator=g)
            w = torch.randn(m, c, generator=g)
            bias = torch.randn(m, generator=g)
            dense = lambda: F.linear(x, w, bias)  # noqa: E731
            l1 = lambda: cpu.linear_forward(x, w, bias)  # noqa: E731
            pairs, path = B * N * c * m, "linear"
        else:
            x = torch.randn(B, c, *sp, generator=g)
            w = torch.randn(m, c, *([k] * nd), generator=g)
            bias = torch.randn(m, generator=g)
            conv = {1: F.conv1d, 3: F.conv3d}[nd]
            st, pd, dl = [s] * nd, [p] * nd, [1] * nd
            dense = lambda: conv(x, w, bias, s, p)  # noqa: E731
            l1 = lambda: cpu.conv_forward(x, w, bias, st, pd, dl, 1)  # noqa: E731
            y = dense()
            pairs = y.numel() * c * k ** nd
            path = cpu.conv_forward_kernel(x, w, st, pd, dl, 1)
        td = tl = math.inf
        for _ in range(rounds):  # interleaved, best of each
            td = min(td, _best(dense, repeat))
            tl = min(tl, _best(l1, repeat))
        rows.append((name, path, td * 1e3, tl * 1e3, tl / td, pairs / tl / 1e9))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="layer name prefixes (pn, vox, linear)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = [l for l in LAYERS if not args.only or any(l[0].startswith(o) for o in args.only)]
    print(f"threads {args.threads}, best of {args.rounds} x {args.repeat}")
    print(f"{'layer':22s} {'path':7s} {'dense ms':>9s} {'l1 ms':>8s} {'l1/dense':>8s} {'G|d|/s':>7s}")
    tot_d = tot_l = 0.0
    for name, path, td, tl, r, rate in run(layers, args.repeat, args.rounds):
        tot_d, tot_l = tot_d + td, tot_l + tl
        print(f"{name:22s} {path:7s} {td:9.3f} {tl:8.3f} {r:8.2f} {rate:7.1f}")
    print(f"{'sum':22s} {'':7s} {tot_d:9.3f} {tot_l:8.3f} {tot_l / tot_d:8.2f}")


if __name__ == "__main__":
    main()
