"""Two costs of a CPU pre-training run, each against its baseline in the same process tree.

    python -m benchmarks.bench_step_costs [--params params.yaml] [--shards data/shards] [--steps 6]
        [--epochs 4] [--out benchmarks/results/step_costs.json]

1. Split batch norm (`pretrain.bn_splits` groups, MoCo's SplitBatchNorm): seconds per optimiser
   step of each queue method at the params' settings (arch, views, batch, roi_size, bf16 on the
   CPU), on one batch of the shards, with the fused equal-groups path of `train.model` against a
   loop over the groups (the implementation it replaced); and with one group, the floor.
2. A new epoch's first batch: seconds from starting an epoch's loader (forkserver workers) to its
   first batch, with the main module preloaded in the forkserver (`train.loader_workers.context`) and
   without, each in its own process (the forkserver is configured once per process), over
   `--epochs` epochs after the first.

Writes the JSON (settings, figures, ratios) and logs a summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time

from benchmarks import first_batch, write_json
from pipeline import cli

# What the trainer's main module (train.pretrain) imports, at the top as there: every loader worker
# runs the main module again, so these imports are what the forkserver preload saves each epoch.
from train import pretrain as _trainer_imports  # noqa: E402,F401

log = logging.getLogger("benchmarks.bench_step_costs")


def step_seconds(name: str, batch: dict, params: str, bn_splits: int, steps: int, fused: bool) -> float:
    import torch

    import train.model as model
    from train.methods import build
    from train.pretrain import load_config, method_config
    from train.trainer import cpu_bf16

    cfg = load_config(params)
    saved = model._SplitBatchNorm._equal_groups
    if not fused:      # the loop over the groups for equal groups too
        model._SplitBatchNorm._equal_groups = lambda self, x, groups: self._segment_loop(
            x, model.chunk_sizes(x.shape[0], groups))
    try:
        torch.manual_seed(0)
        method = build(name, cfg.arch, method_config(name, params), roi_size=cfg.roi_size, bn_splits=bn_splits)
        opt = torch.optim.SGD(method.trainable(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        times = []
        for _ in range(steps + 1):                          # the first is a warm-up
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16(cfg.bf16_cpu)):
                loss, _ = method(batch, g, 0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        return sum(times[1:]) / steps
    finally:
        model._SplitBatchNorm._equal_groups = saved


def bench_bn(params: str, shards: str, steps: int) -> dict:
    from train.pretrain import load_config

    cfg = load_config(params)
    batch = first_batch(params, shards)
    out = {}
    for name in ("d3ssl", "d3ssl_dc", "mocov2"):
        row = {"loop_s": step_seconds(name, batch, params, cfg.bn_splits, steps, fused=False),
               "fused_s": step_seconds(name, batch, params, cfg.bn_splits, steps, fused=True),
               "one_group_s": step_seconds(name, batch, params, 1, steps, fused=True)}
        row["fused_over_loop"] = row["fused_s"] / row["loop_s"]
        out[name] = row
        log.info("%s: %.3f s/step with a loop over %d BN groups, %.3f fused (x%.2f), %.3f with one group",
                 name, row["loop_s"], cfg.bn_splits, row["fused_s"], row["fused_over_loop"], row["one_group_s"])
    return out


def first_batches(params: str, shards: str, epochs: int) -> list[float]:
    """In this process: seconds to the first batch of epochs 1..epochs (epoch 0 starts the forkserver)."""
    from train.pretrain import load_config
    from pipeline import shardset
    from train.stream import make_loader

    cfg = load_config(params).loader
    paths, total = shardset.shards(shards)
    out = []
    for epoch in range(epochs + 1):
        t = time.perf_counter()
        it = iter(make_loader(paths, cfg, seed=0, epoch=epoch, total_samples=total))
        next(it)
        if epoch:
            out.append(time.perf_counter() - t)
        for _ in it:
            pass
    return out


def bench_first_batch(params: str, shards: str, epochs: int) -> dict:
    out = {}
    for preload in (True, False):
        cmd = [sys.executable, "-m", "benchmarks.bench_step_costs", "--params", params, "--shards", shards,
               "--epochs", str(epochs), "--first-batch-child"] + ([] if preload else ["--no-main-preload"])
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        times = json.loads(run.stdout.strip().splitlines()[-1])
        out["main_preloaded" if preload else "not_preloaded"] = {"first_batch_s": times,
                                                                  "mean_s": sum(times) / len(times)}
    out["preloaded_over_not"] = out["main_preloaded"]["mean_s"] / out["not_preloaded"]["mean_s"]
    log.info("a new epoch's first batch: %.2f s with the main module preloaded, %.2f s without (x%.2f)",
             out["main_preloaded"]["mean_s"], out["not_preloaded"]["mean_s"], out["preloaded_over_not"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_step_costs", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--steps", type=int, default=6, help="timed steps per setting (after one warm-up)")
    p.add_argument("--epochs", type=int, default=4, help="epochs whose first batch is timed")
    p.add_argument("--out", default="benchmarks/results/step_costs.json")
    p.add_argument("--first-batch-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-main-preload", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.first_batch_child:
        if args.no_main_preload:
            import train.loader_workers
            train.loader_workers.main_imports = lambda: []
        print(json.dumps(first_batches(args.params, args.shards, args.epochs)))
        return 0
    cli.setup_logging()
    import torch
    result = {"settings": {"params": args.params, "shards": args.shards, "steps": args.steps, "epochs": args.epochs,
                           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "machine": platform.processor() or platform.machine()},
              "split_batch_norm": bench_bn(args.params, args.shards, args.steps),
              "first_batch": bench_first_batch(args.params, args.shards, args.epochs)}
    write_json(args.out, result, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
