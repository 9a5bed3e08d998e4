"""Step time and images/s of every method on the same backbone and batch, same process.

    python -m benchmarks.bench_train [--batch 32] [--size 224] [--arch resnet18] [--device cpu] [--steps 3]

Each method takes the same random batch (x1, x2 at `size`, x2-s at size/2, K=4 proposals) for
`steps` optimiser steps after one warm-up step; reports seconds per step, images/s, and the ratio
to SoCo's step (target: d3ssl at most 1.6x soco). On CUDA, the step runs under bf16 autocast with
channels_last, as in `train.pretrain`.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_augment import fake_batch
from train.methods import DEFAULTS, METHODS, build


def step_time(name: str, arch: str, batch: dict, steps: int, dev: torch.device, roi_size: int = 14) -> float:
    torch.manual_seed(0)
    method = build(name, arch, DEFAULTS[name], roi_size=roi_size).to(dev)
    if dev.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(method.trainable(), lr=0.01, momentum=0.9)
    g = torch.Generator(device=dev).manual_seed(0)

    def one():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, _ = method(batch, g, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--methods", nargs="*", default=sorted(METHODS))
    p.add_argument("--roi-size", type=int, default=14)
    args = p.parse_args()
    dev = torch.device(args.device)
    batch = fake_batch(args.batch, args.size, 4, dev)
    if dev.type == "cuda":
        batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}
    times = {m: step_time(m, args.arch, batch, args.steps, dev, args.roi_size) for m in args.methods}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{args.arch}, batch {args.batch} at {args.size} px, K=4, RoIAlign {args.roi_size}, on {name}")
    for m, t in times.items():
        ratio = f"  {t / times['soco']:.2f}x soco" if "soco" in times else ""
        print(f"{m:>9}: {t:7.3f} s/step  {args.batch / t:8.1f} images/s{ratio}")


if __name__ == "__main__":
    main()
