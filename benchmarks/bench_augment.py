"""Cost of the region augmentations against one training step of the model, same batch.

    python -m benchmarks.bench_augment [--batch 64] [--size 224] [--arch resnet18] [--device cpu]

Times `train.augment.region_views` (PRC + PRM on x1 and x2-s, RBJ for every extraction, the
de-positioning composition) on a batch of random normalised images with K=4 proposals each,
against one forward and backward pass of the embedded default model (the d3ssl student's
RegionEncoder on x1 and its boxes) on the same batch, in the same process.
Target: the augmentations under 10% of the model pass.
"""
from __future__ import annotations

import argparse
import time

import torch

from train.augment import AugmentConfig, region_views
from train.model import RegionEncoder


def fake_batch(b: int, size: int, k: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand((b, k, 2), generator=g) * size * 0.6
    wh = size * 0.1 + torch.rand((b, k, 2), generator=g) * (size * 0.4)
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor(float(size)))], -1)
    x = lambda s: torch.randn((b, 3, s, s), generator=g)  # noqa: E731
    batch = {"x1": x(size), "x2": x(size), "x2s": x(size // 2),
             "boxes1": boxes, "boxes2": boxes, "boxes2s": boxes / 2, "valid": torch.ones((b, k), dtype=torch.bool),
             "image_id": torch.arange(b)}          # every sample its own image (train.stream.collate)
    return {k: v.to(device) for k, v in batch.items()}


def timed(fn, repeats: int, device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    dev = torch.device(args.device)
    batch = fake_batch(args.batch, args.size, 4, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    cfg = AugmentConfig()
    t_aug = timed(lambda: region_views(batch, cfg, g), args.repeats, dev)
    model = RegionEncoder(args.arch).to(dev)

    def step():
        z = model.regions(batch["x1"], batch["boxes1"], batch["valid"])
        z.square().mean().backward()

    t_model = timed(step, args.repeats, dev)
    print(f"batch {args.batch} at {args.size} px, K=4, {args.arch} on {dev}")
    print(f"region augmentations (PRC, PRM x2, RBJ x5, composition): {t_aug * 1000:8.1f} ms")
    print(f"one forward + backward of the region encoder:             {t_model * 1000:8.1f} ms")
    print(f"ratio: {100 * t_aug / t_model:.1f}% (target < 10%)")


if __name__ == "__main__":
    main()
