"""Brute-force formulas the kernels are checked against (independent of kernels/)."""
import itertools

import torch
import torch.nn.functional as F


def l1_linear_brute(x, w, b=None):
    y = -(x.unsqueeze(-2) - w).abs().sum(-1)
    return y if b is None else y + b


def patches_loop(x, kernel, stride, padding, dilation):
    """[B, *out, C, *kernel] patches by explicit slicing loops (differentiable)."""
    nd = len(kernel)
    pads = []
    for p in reversed(padding):
        pads += [p, p]
    xp = F.pad(x, pads)
    out = [(xp.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    rows = []
    for pos in itertools.product(*(range(o) for o in out)):
        taps = []
        for offs in itertools.product(*(range(k) for k in kernel)):
            idx = [slice(None), slice(None)] + [pos[i] * stride[i] + offs[i] * dilation[i] for i in range(nd)]
            taps.append(xp[tuple(idx)])  # [B, C]
        rows.append(torch.stack(taps, -1).reshape(x.shape[0], x.shape[1], *kernel))
    return torch.stack(rows, 1).reshape(x.shape[0], *out, x.shape[1], *kernel), out


def l1_conv_brute(x, w, b, stride, padding, dilation, groups, elem=None):
    """Conv by loops over output positions; ``elem(d)`` maps d = patch - w to the summand (default -|d|)."""
    elem = elem or (lambda d: -d.abs())
    kernel = list(w.shape[2:])
    nd = len(kernel)
    pt, out = patches_loop(x, kernel, stride, padding, dilation)
    B, C, M = x.shape[0], x.shape[1], w.shape[0]
    cg, mg = C // groups, M // groups
    ys = []
    for g in range(groups):
        p = pt[(Ellipsis, slice(g * cg, (g + 1) * cg)) + (slice(None),) * nd].reshape(B, *out, 1, -1)
        wg = w[g * mg:(g + 1) * mg].reshape(mg, -1)
        ys.append(elem(p - wg).sum(-1))
    y = torch.cat(ys, -1)  # [B, *out, M]
    if b is not None:
        y = y + b
    return y.movedim(-1, 1)


def huber1(d):
    return F.huber_loss(d, torch.zeros_like(d), reduction="none", delta=1.0)


def surrogate_elems(mix):
    """Per-element functions whose true gradients are the MGS gradients.

    w.r.t. w: d/dw of -(mix*d^2/2 + (1-mix)|d|) = mix*(x-w) + (1-mix)*sign(x-w);
    w.r.t. x: d/dx of -(mix*huber(d) + (1-mix)|d|) = mix*HardTanh(w-x) + (1-mix)*sign(w-x).
    """
    def for_w(d):
        return -(mix * 0.5 * d * d + (1 - mix) * d.abs())

    def for_x(d):
        return -(mix * huber1(d) + (1 - mix) * d.abs())

    return for_x, for_w


def away_from_kinks(shape, kind, dtype=torch.float64, gen=None):
    """Values whose pairwise differences avoid 0 and +-1 (the kinks of |.| and HardTanh).

    inputs sit near multiples of 3, weights near 1.5 + multiples of 3, so every
    |x - w| (including zero padding) lies in [1.3, 1.7] + 3j.
    """
    base = torch.randint(-1, 2, shape, generator=gen).to(dtype) * 3.0
    noise = (torch.rand(shape, generator=gen, dtype=dtype) - 0.5) * 0.2
    return base + noise + (1.5 if kind == "w" else 0.0)
