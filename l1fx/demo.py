"""The built-in default job (README quick start): ``python -m l1fx.demo``.

End to end on a bundled point network and generated data:

1. build PointNet part segmentation (``l1fx.models``) on generated shapes (``l1fx.data``);
2. ``l1fx.convert`` two thirds of its layer units to l1 layers and print the summary;
3. train briefly with the Mixed Gradient Strategy and the Dynamic Learning-rate Controller
   (``l1fx.TrainingWrapper`` in an ordinary PyTorch loop);
4. export to ONNX with l1fx custom nodes and verify the file in onnxruntime;
5. print the op-count and energy report, dense vs converted.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import l1fx
from l1fx.data import make_part_segmentation, part_segmentation_metrics
from l1fx.kernels import get_backend
from l1fx.models import build_model


def evaluate(model, data) -> str:
    model.eval()
    with torch.no_grad():
        logits = model(data.points.transpose(1, 2), data.categories)
    s = part_segmentation_metrics(logits, data.labels, data.categories, data.classes)
    return f"instance mIoU {s.instance_miou:.1f}, accuracy {s.accuracy:.1f}%"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m l1fx.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pointnet", choices=["pointnet", "pointnet2", "voxelcnn"])
    p.add_argument("--ratio", type=float, default=0.667, help="fraction of layer units to convert")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="where the ONNX file goes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    print("== 1. data and model")
    train, test = make_part_segmentation(num_train=192, num_test=48, num_points=256, seed=args.seed)
    model = build_model(args.model, train.num_parts, train.num_categories)
    example = (train.points[:8].transpose(1, 2), train.categories[:8])
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(train)} training and {len(test)} test shapes of {train.points.shape[1]} points, "
          f"{train.num_categories} categories, {train.num_parts} parts")

    print(f"\n== 2. l1fx.convert(model, ratio={args.ratio}, init=\"data\")")
    # init="data": we train from scratch, so start the l1 templates at the scale of their inputs.
    converted = l1fx.convert(model, ratio=args.ratio, example_inputs=example, init="data")
    print(l1fx.summary(converted))
    print(f"l1 kernels: backend {get_backend(example[0]).name!r}")

    print("\n== 3. training with MGS + DLC")
    loader = DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    total = args.epochs * len(loader)
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    wrapper = l1fx.TrainingWrapper(converted, optimizer, total_steps=total, mgs=l1fx.MGS(), dlc=l1fx.DLC())
    print(f"before: {evaluate(converted, test)}")
    bar = tqdm(total=total, desc="train", unit="step", mininterval=2.0)
    for _ in range(args.epochs):
        converted.train()
        for points, category, labels in loader:
            loss = torch.nn.functional.cross_entropy(converted(points.transpose(1, 2), category), labels)
            wrapper.zero_grad()
            loss.backward()
            wrapper.step()  # instead of optimizer.step(): DLC scaling, then both schedules advance
            bar.set_postfix(loss=f"{loss.item():.3f}", mix=f"{wrapper.mix:.2f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
            bar.update()
    bar.close()
    print(f"after {total} steps: {evaluate(converted, test)}")

    print("\n== 4. ONNX export, verified in onnxruntime")
    args.out.mkdir(parents=True, exist_ok=True)
    converted.eval()
    result = l1fx.export_onnx(converted, (example[0][:2], example[1][:2]), args.out / f"{args.model}_l1.onnx")
    print(result.summary())

    print("\n== 5. op counts and energy (Horowitz, ISSCC 2014, 45 nm, fp32)")
    print(l1fx.compare(model.eval(), converted, example))
    print(f"\ndemo finished in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
