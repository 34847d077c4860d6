"""GPU throughput of the l1fx Triton kernels against their peers.

For PointNet++-shaped layers (N=32768 rows, K in {9, 64, 128}, M in {64, 128,
256}) and a 3x3x3 Conv3d on a 32^3 grid, forward pass:

* ``l1fx``    the Triton backend (autotuned; tuning happens in the warm-up);
* ``cdist``   ``torch.cdist(x, w, p=1)``, the same distances (for the conv:
  on patches unfolded beforehand, so its im2col is not even timed);
* ``dense``   the inner-product layer it replaces (``F.linear``: cuBLAS,
  ``F.conv3d``: cuDNN), float32 with TF32 off unless ``--tf32``.

Throughput is in l1 multiply-accumulates ("elements") per second,
``N * M * K / time``.  An l1 MAC needs two FP32 instructions (a subtract and
an add of an absolute value), so the ideal is half the card's FP32
instruction rate: ``SMs * FP32 lanes per SM * clock / 2``.  The clock is the
card's maximum SM clock (from torch, else ``nvidia-smi``, else
``--clock-ghz``); the assumption is printed.  Targets (issue 5): l1fx at
>= 50% of the ideal and >= 3x ``cdist`` on the linear shapes.

    python bench/bench_gpu.py                      # table on stdout
    python bench/bench_gpu.py --backward           # + MGS backward timings
    python bench/bench_gpu.py --markdown out.md    # also write markdown (for bench/RESULTS.md)
    python bench/bench_gpu.py --sass               # no GPU needed: static SASS of the hot loops

Exits with a message (status 0) when no CUDA device is present.  ``--sass``
compiles each kernel for sm_90 on the CPU (Triton's bundled ptxas/nvdisasm,
arguments specialised as Triton does at launch) and counts the instructions
of the innermost loop: the share of FP32 instructions bounds the fraction of
the ideal a kernel can reach (it relies on Triton internals; tested on 3.9).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

LINEAR_SHAPES = [(32768, k, m) for k in (9, 64, 128) for m in (64, 128, 256)]
# (batch, C_in, C_out, grid): 3x3x3, padding 1, stride 1.
CONV_SHAPES = [(2, 32, 64, 32)]
TARGET_IDEAL, TARGET_CDIST = 0.50, 3.0

# FP32 lanes per SM by compute capability (CUDA programming guide, arithmetic
# instruction throughput table); unknown archs fall back to 128 (printed).
FP32_LANES = {(6, 0): 64, (7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128,
              (9, 0): 128, (10, 0): 128, (12, 0): 128}


def max_sm_clock_ghz(props, override: float | None) -> tuple[float, str]:
    if override:
        return override, "--clock-ghz"
    khz = getattr(props, "clock_rate", None)
    if khz:
        return khz / 1e6, "torch.cuda.get_device_properties().clock_rate"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return float(out[0]) / 1e3, "nvidia-smi clocks.max.sm"
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return 1.98, "assumed 1.98 GHz (H100/H200 SXM boost); pass --clock-ghz"


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def linear_rows(n, k, m, backward: bool):
    from l1fx.kernels import triton_backend as tb

    x = torch.randn(n, k, device="cuda")
    w = torch.randn(m, k, device="cuda")
    b = torch.randn(m, device="cuda")
    runs = {
        "l1fx": lambda: tb.linear_forward(x, w, b),
        "cdist": lambda: torch.cdist(x, w, p=1),
        "dense": lambda: F.linear(x, w, b),
    }
    if backward:
        g = torch.randn(n, m, device="cuda")
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        yd = F.linear(xg, wg)
        runs["l1fx bwd"] = lambda: tb.linear_backward(g, x, w, 0.5, True, True)
        runs["dense bwd"] = lambda: torch.autograd.grad(yd, (xg, wg), g, retain_graph=True)
    return f"linear N={n} K={k} M={m}", n * m * k, runs


def conv_rows(batch, c, m, grid, backward: bool):
    from l1fx.kernels import triton_backend as tb

    x = torch.randn(batch, c, grid, grid, grid, device="cuda")
    w = torch.randn(m, c, 3, 3, 3, device="cuda")
    b = torch.randn(m, device="cuda")
    s, p, d = [1, 1, 1], [1, 1, 1], [1, 1, 1]
    patches = F.pad(x, (1, 1, 1, 1, 1, 1)).unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)
    patches = patches.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, c * 27)
    wf = w.reshape(m, -1)
    runs = {
        "l1fx": lambda: tb.conv_forward(x, w, b, s, p, d, 1),
        "cdist": lambda: torch.cdist(patches, wf, p=1),
        "dense": lambda: F.conv3d(x, w, b, padding=1),
    }
    if backward:
        from l1fx.kernels import conv as conv_lowering

        g = torch.randn(batch, m, grid, grid, grid, device="cuda")
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        yd = F.conv3d(xg, wg, padding=1)
        runs["l1fx bwd"] = lambda: conv_lowering.conv_backward(tb.BACKEND, g, x, w, s, p, d, 1, 0.5, True, True)
        runs["dense bwd"] = lambda: torch.autograd.grad(yd, (xg, wg), g, retain_graph=True)
    macs = batch * grid ** 3 * m * c * 27
    return f"conv3d B={batch} C={c} M={m} {grid}^3 k=3", macs, runs


def check_correct(name, runs) -> None:
    """l1fx forward equals -cdist (+ bias) on the benchmark inputs themselves."""
    y = runs["l1fx"]()
    ref = -runs["cdist"]()
    if name.startswith("linear"):
        bias = y + ref  # y = -cdist + b
        ok = torch.allclose(bias, bias[:1].expand_as(bias), rtol=1e-4, atol=1e-2)
    else:
        ok = True  # checked by tests/test_triton.py::test_gpu_conv_forward
    if not ok:
        raise SystemExit(f"{name}: l1fx forward disagrees with torch.cdist; not benchmarking wrong results")


# ------------------------------------------------------------------ static SASS analysis (no GPU)

FP_OPS = ("FADD", "FFMA", "FMUL", "FMNMX", "FSET", "FSEL", "FSETP")


def sass_report(arch: int = 90) -> list[str]:
    import collections
    import re
    import tempfile

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from l1fx.kernels import triton_kernels as K

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")

    def compile_like_launch(fn, values, warps):
        sig, consts, attrs = {}, {}, {}
        constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
        keep_generic = set(fn.do_not_specialize)
        for i, name in enumerate(fn.arg_names):
            v = values[name]
            if name.endswith("_ptr"):
                sig[name] = "*fp32"
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                sig[name] = "fp32"
            elif name in constexpr_names or not isinstance(v, int) or isinstance(v, bool):
                sig[name], consts[(i,)] = "constexpr", v
            elif v == 1 and name not in keep_generic:
                sig[name], consts[(i,)] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0 and name not in keep_generic:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})

    def innermost_loop(cubin: bytes) -> collections.Counter:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
        lines = text.splitlines()
        labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"\s*\.(L_x_\d+):", l))}
        def key(ops):
            return (-sum(v for o, v in ops.items() if o in FP_OPS), sum(ops.values()) or 1 << 30)

        best = collections.Counter()
        for i, line in enumerate(lines):
            m = re.search(r"BRA\s+(?:\S+\s+)?`?\(?\.(L_x_\d+)", line)
            if m and labels.get(m.group(1), i) < i:
                ops = collections.Counter()
                for body in lines[labels[m.group(1)]:i + 1]:
                    if mm := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", body):
                        ops[mm.group(1).split(".")[0]] += 1
                # The hot loop: most FP32 work (an unrolled body beats its remainder
                # loop), then the fewest instructions (nested loops contain it).
                if key(ops) < key(best):
                    best = ops
        return best

    n, m, k = 32768, 128, 64
    common = dict(ACC=tl.float32, ROWS_CLASS=7, N=n, M=m, K=k)
    ptrs = lambda *names: {p: 0 for p in names}  # noqa: E731
    cases = [
        ("linear_fwd 128x128 t8x8 unroll4", K.linear_fwd, 8, dict(
            ptrs("x_ptr", "wt_ptr", "b_ptr", "y_ptr"), stride_xn=k, stride_xk=1, stride_wk=m, stride_wm=1,
            stride_yn=m, stride_ym=1, HAS_BIAS=True, BLOCK_N=128, BLOCK_M=128, TN=8, TM=8, UNROLL=4, **common)),
        ("conv3d_fwd 3x3x3 C32 256x64 t2", K.conv3d_fwd, 4, dict(
            ptrs("x_ptr", "w_ptr", "b_ptr", "y_ptr"), P=n, Mg=64, Cg=32, D=32, H=32, W=32, OD=32, OH=32, OW=32,
            KD=3, KH=3, KW=3, sd=1, sh=1, sw=1, pd=1, ph=1, pw=1, dd=1, dh=1, dw=1, stride_xb=32 * n,
            stride_xc=n, stride_xd=1024, stride_xh=32, stride_xw=1, stride_yb=64 * n, stride_ym=n,
            HAS_BIAS=True, BLOCK_P=256, BLOCK_M=64, TP=2, ACC=tl.float32, ROWS_CLASS=7)),
    ]
    for mode, label in ((1, "mix=1"), (2, "mix=0.5"), (0, "mix=0")):
        cases.append((f"linear_grad_x 256x32 t2 {label}", K.linear_grad_x, 4, dict(
            ptrs("g_ptr", "x_ptr", "w_ptr", "gx_ptr"), mix=0.5, stride_gn=m, stride_gm=1, stride_xn=k,
            stride_xk=1, stride_wm=k, stride_wk=1, stride_gxn=k, stride_gxk=1, MIX_MODE=mode,
            BLOCK_N=256, BLOCK_K=32, TN=2, UNROLL=1, **common)))
        cases.append((f"linear_grad_w 128x32 t1 {label}", K.linear_grad_w, 4, dict(
            ptrs("g_ptr", "x_ptr", "w_ptr", "part_ptr"), ROWS_PER_SPLIT=256, mix=0.5, stride_gn=m, stride_gm=1,
            stride_xn=k, stride_xk=1, stride_wm=k, stride_wk=1, MIX_MODE=mode, BLOCK_M=128, BLOCK_K=32,
            TM=1, UNROLL=1, **common)))
    out = [f"static SASS, sm_{arch}, innermost loop (N={n}, M={m}, K={k}; triton {triton.__version__}):"]
    for label, fn, warps, values in cases:
        ops = innermost_loop(compile_like_launch(fn, values, warps).asm["cubin"])
        total, fp = sum(ops.values()), sum(v for o, v in ops.items() if o in FP_OPS)
        smem = sum(v for o, v in ops.items() if o.startswith(("STS", "LDS", "BAR")))
        out.append(f"  {label:36s} {total:4d} instr, {fp:4d} FP32 ({100 * fp / max(total, 1):4.1f}%), "
                   f"{ops.get('LDG', 0):3d} LDG, {smem} shared-memory/barrier; top: "
                   + ", ".join(f"{o} {v}" for o, v in ops.most_common(5)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backward", action="store_true", help="also time the MGS backward (mix=0.5)")
    ap.add_argument("--markdown", metavar="PATH", help="write the results as markdown ('-' for stdout)")
    ap.add_argument("--clock-ghz", type=float, help="max SM clock used for the ideal (default: queried)")
    ap.add_argument("--tf32", action="store_true", help="let the dense baselines use TF32 tensor cores")
    ap.add_argument("--quick", action="store_true", help="only the first linear shape and the conv")
    ap.add_argument("--sass", action="store_true", help="print the static SASS analysis (no GPU needed) and exit")
    args = ap.parse_args(argv)

    if args.sass:
        print("\n".join(sass_report()))
        return 0

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (torch.cuda.is_available() is False); nothing to benchmark. "
              "Run this on a GPU machine: `make bench-gpu`.")
        return 0
    try:
        import triton
    except ImportError:
        print("bench_gpu: triton is not installed (pip install 'l1fx[triton]'); nothing to benchmark.")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)

    props = torch.cuda.get_device_properties(0)
    cc = (props.major, props.minor)
    lanes = FP32_LANES.get(cc, 128)
    clock, clock_src = max_sm_clock_ghz(props, args.clock_ghz)
    ideal = props.multi_processor_count * lanes * clock * 1e9 / 2  # l1 MACs per second
    header = [
        f"GPU: {props.name} (sm_{cc[0]}{cc[1]}), {props.multi_processor_count} SMs, driver {driver_version()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
        f"python {platform.python_version()}",
        f"ideal l1 rate = {props.multi_processor_count} SMs x {lanes} FP32 lanes"
        f"{'' if cc in FP32_LANES else ' (assumed)'} x {clock:.3f} GHz ({clock_src}) / 2 instr per MAC "
        f"= {ideal / 1e12:.2f} T l1-MAC/s",
        f"dense baselines: FP32, TF32 {'on' if args.tf32 else 'off'}",
    ]
    print("\n".join(header))

    cases = [linear_rows(*s, args.backward) for s in LINEAR_SHAPES[: 1 if args.quick else None]]
    cases += [conv_rows(*s, args.backward) for s in CONV_SHAPES]
    cols = ["l1fx", "cdist", "dense"] + (["l1fx bwd", "dense bwd"] if args.backward else [])
    rows = []
    for name, macs, runs in cases:
        check_correct(name, runs)
        ms = {k: bench_ms(fn) for k, fn in runs.items()}
        rate = macs / (ms["l1fx"] * 1e-3)
        rows.append(dict(
            name=name, **{f"{k} ms": ms[k] for k in cols},
            gmacs=rate / 1e9, ideal=rate / ideal, vs_cdist=ms["cdist"] / ms["l1fx"], vs_dense=ms["l1fx"] / ms["dense"],
        ))
        r = rows[-1]
        print(f"{name:34s} " + " ".join(f"{k} {ms[k]:8.3f}ms" for k in cols)
              + f" | l1fx {r['gmacs']:8.0f} G/s  {100 * r['ideal']:5.1f}% ideal  {r['vs_cdist']:5.1f}x cdist"
              + f"  {r['vs_dense']:5.1f}x dense time", flush=True)

    lin = [r for r in rows if r["name"].startswith("linear")]
    verdict = [
        f"linear shapes: min {100 * min(r['ideal'] for r in lin):.1f}% of ideal (target {100 * TARGET_IDEAL:.0f}%), "
        f"min {min(r['vs_cdist'] for r in lin):.1f}x cdist (target {TARGET_CDIST:.0f}x)",
    ]
    print("\n".join(verdict))
    if args.markdown:
        md = to_markdown(header, cols, rows, verdict)
        if args.markdown == "-":
            print(md)
        else:
            tmp = args.markdown + ".tmp"
            with open(tmp, "w") as f:
                f.write(md)
            os.replace(tmp, args.markdown)  # never leave a half-written file
            print(f"wrote {args.markdown}")
    return 0


def to_markdown(header, cols, rows, verdict) -> str:
    lines = ["### GPU: l1fx Triton kernels (`bench/bench_gpu.py`)", ""]
    lines += [f"- {h}" for h in header] + [""]
    head = ["layer"] + [f"{c} (ms)" for c in cols] + ["l1fx G l1-MAC/s", "% of ideal", "x cdist", "time / dense"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        cells = [r["name"]] + [f"{r[f'{c} ms']:.3f}" for c in cols]
        cells += [f"{r['gmacs']:.0f}", f"{100 * r['ideal']:.1f}%", f"{r['vs_cdist']:.1f}x", f"{r['vs_dense']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"{v}" for v in verdict] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
