"""bf16 autocast against float32 on this CPU: why `pretrain.bf16_cpu` defaults to `auto`.

    python -m benchmarks.bench_cpu_bf16 [--params params.yaml] [--shards data/shards] [--steps 2]
        [--out benchmarks/results/cpu_bf16.json]

Two measurements, each float32 against bf16 autocast in the same process, with the CPU's
capability and whether oneDNN has a bf16 path on it (`torch.ops.mkldnn._is_mkldnn_bf16_supported`,
what `auto` reads, `train.trainer.cpu_bf16`):

1. A bare torchvision ResNet of the params' arch, forward and backward on `batch_size` random
   images at the view size (`loader.views.size`).
2. One optimiser step of d3ssl at the params' settings on one batch of the shards (the stage's
   step, as `benchmarks.bench_step_costs` times it).

Seconds are the mean of `--steps` timed repetitions after one warm-up. Writes the JSON (settings,
figures, `bf16_over_float32` ratios) and logs a summary.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from dataclasses import replace

from benchmarks import write_json
from pipeline import cli

log = logging.getLogger("benchmarks.bench_cpu_bf16")


def mean_seconds(fn, steps: int) -> float:
    """Mean wall seconds of `fn()` over `steps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sum(times) / steps


def bare_resnet(arch: str, batch: int, size: int, steps: int) -> dict:
    import torch
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None)
    x = torch.randn(batch, 3, size, size)
    out = {}
    for name, bf16 in (("float32", False), ("bf16", True)):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = net(x).float().sum()
            net.zero_grad(set_to_none=True)
            y.backward()
        out[f"{name}_s"] = mean_seconds(run, steps)
    out["bf16_over_float32"] = out["bf16_s"] / out["float32_s"]
    return out


def method_step(params: str, shards: str, method: str, steps: int) -> dict:
    import torch

    from pipeline import shardset
    from train.methods import build, prepare
    from train.pretrain import load_config, method_config
    from train.stream import make_stream

    cfg = load_config(params)
    paths, total = shardset.shards(shards)
    batch = prepare(next(iter(make_stream(paths, replace(cfg.loader, workers=0), seed=0, total_samples=total))),
                    torch.device("cpu"))
    out = {}
    for name, bf16 in (("float32", False), ("bf16", True)):
        torch.manual_seed(0)
        m = build(method, cfg.arch, method_config(method, params), roi_size=cfg.roi_size, bn_splits=cfg.bn_splits)
        opt = torch.optim.SGD(m.trainable(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(0)

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = m(batch, g, 0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out[f"{name}_s"] = mean_seconds(run, steps)
    out["bf16_over_float32"] = out["bf16_s"] / out["float32_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu_bf16", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--steps", type=int, default=2, help="timed repetitions per setting (after one warm-up)")
    p.add_argument("--out", default="benchmarks/results/cpu_bf16.json")
    args = p.parse_args(argv)
    cli.setup_logging()
    import torch

    from train.pretrain import load_config
    from train.trainer import cpu_bf16

    cfg = load_config(args.params)
    result = {"settings": {"params": args.params, "shards": args.shards, "steps": args.steps, "arch": cfg.arch,
                           "batch_size": cfg.loader.batch_size, "view_size": cfg.loader.views.size,
                           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "machine": platform.processor() or platform.machine(), "torch": torch.__version__},
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "onednn_bf16_path": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
              "auto_chooses_bf16": cpu_bf16("auto")}
    log.info("CPU capability %s, oneDNN bf16 path %s", result["cpu_capability"], result["onednn_bf16_path"])
    result["bare_resnet"] = bare_resnet(cfg.arch, cfg.loader.batch_size, cfg.loader.views.size, args.steps)
    log.info("bare %s: float32 %.3f s, bf16 %.3f s (%.1fx)", cfg.arch, result["bare_resnet"]["float32_s"],
             result["bare_resnet"]["bf16_s"], result["bare_resnet"]["bf16_over_float32"])
    result["d3ssl_step"] = method_step(args.params, args.shards, "d3ssl", args.steps)
    log.info("d3ssl step: float32 %.3f s, bf16 %.3f s (%.1fx)", result["d3ssl_step"]["float32_s"],
             result["d3ssl_step"]["bf16_s"], result["d3ssl_step"]["bf16_over_float32"])
    write_json(args.out, result, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
