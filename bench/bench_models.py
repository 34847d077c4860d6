"""Every bundled model and each public-model kind end to end: convert -> train a few steps -> export ->
onnxruntime, one row per model (issue 21).

    python bench/bench_models.py [--models NAME ...] [--markdown FILE]

Models: l1fx.models (PointNet part seg, PointNet++ part seg, voxel CNN), stand-ins written the way the
public code is (tests/zoo.py: PointNet, PointNet++ with a torch.randint FPS loop, DGCNN kNN with topk,
VoxNet, a 3D ResNet), a PointMLP-style residual point MLP, a part-seg PointNet with a category one-hot second
input (tests/test_export_pointnets.py) and a 3D U-Net with ConvTranspose3d. Columns: convert ok (and which
layers were kept dense), train ok (3 Adam steps, finite loss and gradients), export ok + seconds, verify
max relative error (and the tolerance used), onnxruntime latency through ``l1fx.ort_session`` vs the
converted model's eager PyTorch time (medians of 3, batch as exported; loaded shared machine: ratios only).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import zoo  # noqa: E402
from test_export_pointnets import PartSegOneHot, _onehot_inputs  # noqa: E402

import l1fx  # noqa: E402
from l1fx import models  # noqa: E402
from l1fx.convert import convert  # noqa: E402
from l1fx.export import export_onnx  # noqa: E402


class PointMLPLite(nn.Module):
    """PointMLP-style: kNN grouping (topk), geometric affine normalisation, residual point MLP blocks."""

    def __init__(self, k=4, width=32, classes=5):
        super().__init__()
        self.k = k
        self.embed = nn.Conv1d(3, width, 1)
        self.alpha, self.beta = nn.Parameter(torch.ones(1, width * 2, 1, 1)), nn.Parameter(torch.zeros(1, width * 2, 1, 1))
        self.pre = nn.Sequential(nn.Conv2d(width * 2, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.res = nn.Sequential(nn.Conv1d(width, width, 1), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Conv1d(width, width, 1), nn.BatchNorm1d(width))
        self.fc = nn.Linear(width, classes)

    def forward(self, x):  # [B, 3, N]
        f = self.embed(x)
        d = torch.cdist(x.transpose(1, 2), x.transpose(1, 2))
        idx = d.topk(self.k, dim=-1, largest=False)[1]                          # [B, N, k]
        b, c, n = f.shape
        nb = f.transpose(1, 2).gather(1, idx.reshape(b, -1, 1).expand(-1, -1, c)).reshape(b, n, self.k, c)
        centre = f.transpose(1, 2)[:, :, None]
        diff = nb - centre
        std = diff.reshape(b, -1).std(-1).reshape(b, 1, 1, 1) + 1e-5
        g = torch.cat([diff / std, centre.expand(-1, -1, self.k, -1)], -1).permute(0, 3, 1, 2)
        g = self.pre(self.alpha * g + self.beta).max(-1)[0]                     # [B, width, N]
        g = F.relu(g + self.res(g))
        return self.fc(g.max(-1)[0])


class UNet3dTiny(nn.Module):
    """A 3D U-Net (MONAI / GarmentNets style): strided Conv3d down, ConvTranspose3d up, skip concat."""

    def __init__(self, c=8, out=3):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv3d(1, c, 3, padding=1), nn.BatchNorm3d(c), nn.ReLU())
        self.down = nn.Sequential(nn.Conv3d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm3d(2 * c), nn.ReLU())
        self.up = nn.ConvTranspose3d(2 * c, c, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv3d(2 * c, c, 3, padding=1), nn.BatchNorm3d(c), nn.ReLU(),
                                 nn.Conv3d(c, out, 1))

    def forward(self, x):
        e = self.enc(x)
        return self.dec(torch.cat([e, self.up(self.down(e))], 1))


def _parts(batch):
    g = torch.Generator().manual_seed(batch)
    return torch.rand(batch, 3, 256, generator=g), torch.randint(0, 4, (batch,), generator=g)


MODELS = {
    "pointnet_partseg": (lambda: models.PointNetPartSeg(6, 4), _parts),
    "pointnet2_partseg": (lambda: models.PointNet2PartSeg(6, 4, npoint=(64, 16)), _parts),
    "voxelcnn": (lambda: models.VoxelCNNSeg(6, 4), _parts),
    "zoo_pointnet": (zoo.PointNetCls, lambda b: zoo.pointnet_inputs(b)),
    "zoo_pointnet2_randint": (zoo.PointNet2ClsSSG, lambda b: zoo.pointnet2_inputs(b)),
    "zoo_dgcnn_knn": (zoo.DGCNN, lambda b: zoo.dgcnn_inputs(b)),
    "pointmlp_lite": (PointMLPLite, lambda b: (torch.rand(b, 3, 64),)),
    "partseg_onehot": (PartSegOneHot, _onehot_inputs),
    "zoo_voxnet": (zoo.VoxNet, lambda b: zoo.voxnet_inputs(b)),
    "zoo_resnet3d": (zoo.ResNet3dTiny, lambda b: zoo.resnet3d_inputs(b)),
    "unet3d_convtranspose": (UNet3dTiny, lambda b: (torch.rand(b, 1, 8, 8, 8),)),
}


def _dense_left(model) -> list[str]:
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if type(m) in kinds]


def _train(model, make, steps=3) -> str:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for step in range(steps):
        out = model(*make(4 + step))
        out = out[0] if isinstance(out, tuple) else out
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not torch.isfinite(loss) or not all(torch.isfinite(g).all() for g in grads):
            return "non-finite"
        opt.step()
    with torch.no_grad():  # batch-norm statistics of the trained weights, as a calibration pass would
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model(*make(8))
    model.eval()
    return "ok"


def _median_ms(fn, repeat=3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def run_one(name: str) -> dict:
    ctor, make = MODELS[name]
    row = {"model": name}
    torch.manual_seed(0)
    x = make(2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = convert(ctor(), 1.0, example_inputs=x)
        dense = _dense_left(model)
        row["convert"] = "ok" + (f"; kept dense: {', '.join(dense)}" if dense else "")
    except Exception as e:  # noqa: BLE001 - one row per model, whatever fails
        row["convert"] = f"FAILED {type(e).__name__}: {str(e)[:120]}"
        return row
    try:
        row["train"] = _train(model, make)
    except Exception as e:  # noqa: BLE001
        row["train"] = f"FAILED {type(e).__name__}: {str(e)[:120]}"
        return row
    path = os.path.join(tempfile.mkdtemp(prefix="l1fx_bench_models_"), f"{name}.onnx")
    t = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = export_onnx(model, x, path)
        row["export"] = f"ok {time.perf_counter() - t:.1f} s (torch.onnx {result.export_seconds:.1f} s)"
        extra = []
        if result.fed_random:
            extra.append("FPS starts fed")
        if result.input_dependent is False:
            extra.append("CONSTANT model: proved nothing")
        if any("ConstantOutput" in type(w.message).__name__ for w in caught) and result.input_dependent is not False:
            extra.append("constant warning")
        row["verify"] = f"{result.max_rel_error:.1e} (tol {result.tolerance:.0e})" + "".join(f"; {e}" for e in extra)
    except Exception as e:  # noqa: BLE001
        row["export"] = f"FAILED {time.perf_counter() - t:.1f} s: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sess = l1fx.ort_session(path)
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), x)}
    with torch.no_grad():
        eager = _median_ms(lambda: model(*x))
        refs = model(*x)
    ort_ms = _median_ms(lambda: sess.run(None, feed))
    refs = [refs] if isinstance(refs, torch.Tensor) else list(refs)
    err = max(float(np.abs(got - ref.numpy()).max() / max(float(np.abs(ref.numpy()).max()), 1e-30))
              for got, ref in zip(sess.run(None, feed), refs))
    fused = sess.l1fx_fused
    what = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(fused).items() if v) if fused else ""
    row["ort"] = (f"{ort_ms:.1f} ms ({sess.l1fx_path}{'; fused: ' + what if what else ''}) = {ort_ms / eager:.2f}x "
                  f"eager {eager:.1f} ms; rel err vs eager "
                  + ("- (random FPS starts: eager draws its own)" if result.fed_random else f"{err:.1e}"))
    return row


COLUMNS = ("model", "convert", "train", "export", "verify", "ort")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--markdown", help="append the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name in args.models:
        row = run_one(name)
        rows.append(row)
        print(" | ".join(str(row.get(c, "-")) for c in COLUMNS), flush=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
            for row in rows:
                f.write("| " + " | ".join(str(row.get(c, "-")).replace("|", "/") for c in COLUMNS) + " |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
