"""The matrix-product convolution backward (train.conv_grad) against oneDNN's, in one process.

    python -m benchmarks.bench_conv_grad [--params params.yaml] [--shards data/shards] [--reps 5]
        [--steps 3] [--out benchmarks/results/conv_grad.json]

1. Per convolution: seconds of forward + backward of the ResNet-18 convolutions of an embedded
   step, at their batch and map sizes (output positions per image: 4 = the three kinds of res5
   convolution on 4x4 regions, 16 = res4 on a 64 px view, 64 = res3, 256 = res2), with
   `GemmGradConv2d`'s matrix-product backward forced and with `nn.Conv2d`'s, alternated, and the
   ratio: where it pays is what sets `train.conv_grad.MAX_POSITIONS`.
2. Per optimiser step: seconds of a step of each method at the params' settings on one batch of
   the shards, the model's convolutions as built (matrix-product backward up to MAX_POSITIONS)
   and set back to `nn.Conv2d` (oneDNN's backward everywhere), alternated.

3. With `--pipeline STEPS` instead: wall seconds of the pre-training loop itself
   (`train.pretrain.train`, its loader workers, schedule and logging as `dvc repro` runs them) for
   STEPS steps of d3ssl, with the region encoder as built and with `use_gemm_grad_conv` switched
   off, alternated over two rounds, into `benchmarks/results/conv_grad_pipeline.json`.

Writes the JSON (settings, figures, ratios) and logs a summary. float32 (the AVX2 CPU path).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time

from benchmarks import first_batch, write_json
from pipeline import cli

log = logging.getLogger("benchmarks.bench_conv_grad")

# (name, in, out, kernel, stride, input side, batch): the embedded step's convolutions
SHAPES = [
    ("res5 3x3 512->512 at 2x2, 128 regions", 512, 512, 3, 1, 2, 128),
    ("res5 3x3 256->512 stride 2 from 4x4, 128 regions", 256, 512, 3, 2, 4, 128),
    ("res4 3x3 256->256 at 4x4, 32 images", 256, 256, 3, 1, 4, 32),
    ("res5 1x1 256->512 stride 2 from 4x4, 128 regions", 256, 512, 1, 2, 4, 128),
    ("res3 3x3 128->128 at 8x8, 32 images", 128, 128, 3, 1, 8, 32),
    ("res2 3x3 64->64 at 16x16, 32 images", 64, 64, 3, 1, 16, 32),
]


def _timed(fn, reps: int) -> float:
    fn()                                                     # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def bench_shapes(reps: int) -> list[dict]:
    import torch
    import torch.nn as nn

    import train.conv_grad as cg

    rows = []
    for name, cin, cout, k, stride, side, n in SHAPES:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        x = torch.randn(n, cin, side, side, requires_grad=True)

        def step():
            conv.zero_grad(set_to_none=True)
            conv(x).sum().backward()

        times = {"onednn_s": [], "matmul_s": []}
        saved = cg.MAX_POSITIONS
        cg.MAX_POSITIONS = 10 ** 9                           # force the matrix-product path for this shape
        try:
            for _ in range(2):                               # alternate, so drift hits both
                conv.__class__ = nn.Conv2d
                times["onednn_s"].append(_timed(step, reps))
                conv.__class__ = cg.GemmGradConv2d
                times["matmul_s"].append(_timed(step, reps))
        finally:
            cg.MAX_POSITIONS = saved
        side_out = (side + 2 * (k // 2) - k) // stride + 1
        row = {"conv": name, "positions": side_out * side_out, "batch": n,
               "onednn_s": min(times["onednn_s"]), "matmul_s": min(times["matmul_s"])}
        row["matmul_over_onednn"] = row["matmul_s"] / row["onednn_s"]
        rows.append(row)
        log.info("%s: forward + backward %.4f s with oneDNN's backward, %.4f s with the matrix products (x%.2f)",
                 name, row["onednn_s"], row["matmul_s"], row["matmul_over_onednn"])
    return rows


def bench_steps(params: str, shards: str, steps: int) -> dict:
    import torch
    import torch.nn as nn

    from train.conv_grad import GemmGradConv2d
    from train.methods import build
    from train.pretrain import load_config, method_config

    cfg = load_config(params)
    batch = first_batch(params, shards)
    out = {}
    for name in ("d3ssl", "d3ssl_dc", "soco", "mocov2"):
        torch.manual_seed(0)
        method = build(name, cfg.arch, method_config(name, params), roi_size=cfg.roi_size, bn_splits=cfg.bn_splits)
        opt = torch.optim.SGD(method.trainable(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        convs = [m for m in method.modules() if isinstance(m, GemmGradConv2d)]

        def step():
            loss, _ = method(batch, g, 0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        times = {"onednn_s": [], "matmul_s": []}
        for _ in range(2):
            for m in convs:
                m.__class__ = nn.Conv2d
            times["onednn_s"].append(_timed(step, steps))
            for m in convs:
                m.__class__ = GemmGradConv2d
            times["matmul_s"].append(_timed(step, steps))
        row = {"onednn_s": min(times["onednn_s"]), "matmul_s": min(times["matmul_s"]), "all_s": times}
        row["matmul_over_onednn"] = row["matmul_s"] / row["onednn_s"]
        out[name] = row
        log.info("%s: %.2f s a step with oneDNN's backward, %.2f s as built (x%.2f)", name, row["onednn_s"],
                 row["matmul_s"], row["matmul_over_onednn"])
    return out


def bench_pipeline(params: str, shards: str, steps: int, method: str = "d3ssl") -> dict:
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    import train.model as model
    from train.pretrain import load_config, method_config, train

    cfg = replace(load_config(params), max_steps=steps)
    mcfg = method_config(method, params)
    built = model.use_gemm_grad_conv
    times: dict[str, list[float]] = {"onednn_s": [], "matmul_s": []}
    try:
        for _ in range(2):                                   # alternate, so drift hits both
            for key, swap in (("onednn_s", lambda m: m), ("matmul_s", built)):
                model.use_gemm_grad_conv = swap
                with tempfile.TemporaryDirectory() as tmp:
                    t = time.perf_counter()
                    summary = train(shards, Path(tmp) / "run", method, cfg, mcfg, resume=False, device="cpu",
                                    progress=False)
                    times[key].append(time.perf_counter() - t)
                assert summary["steps"] == steps, summary["steps"]
                log.info("%s, %d steps, %s backward: %.1f s", method, steps, key[:-2], times[key][-1])
    finally:
        model.use_gemm_grad_conv = built
    out = {"method": method, "steps": steps, "all_s": times,
           "onednn_s": min(times["onednn_s"]), "matmul_s": min(times["matmul_s"])}
    out["matmul_over_onednn"] = out["matmul_s"] / out["onednn_s"]
    log.info("%s: %d steps of the pre-training loop in %.1f s with oneDNN's backward, %.1f s as built (x%.2f)",
             method, steps, out["onednn_s"], out["matmul_s"], out["matmul_over_onednn"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m benchmarks.bench_conv_grad", __doc__)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per convolution (after a warm-up)")
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps per method and variant")
    p.add_argument("--out", default=None,
                   help="default: benchmarks/results/conv_grad.json, with --pipeline conv_grad_pipeline.json")
    p.add_argument("--pipeline", type=int, default=0, metavar="STEPS",
                   help="instead: time STEPS steps of the pre-training loop itself, both ways")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    import torch

    from train.conv_grad import MAX_POSITIONS
    settings = {"params": args.params, "shards": args.shards, "max_positions": MAX_POSITIONS, "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "machine": platform.processor() or platform.machine(), "dtype": "float32"}
    if args.pipeline:
        result = {"settings": {**settings, "timing": "minimum over two alternated rounds of one loop each"},
                  "pipeline": bench_pipeline(args.params, args.shards, args.pipeline)}
        write_json(args.out or "benchmarks/results/conv_grad_pipeline.json", result, log)
        return 0
    result = {"settings": {**settings, "reps": args.reps, "steps": args.steps,
                           "timing": "minimum over two alternated rounds of the mean over the repetitions"},
              "convolutions": bench_shapes(args.reps),
              "steps": bench_steps(args.params, args.shards, args.steps)}
    write_json(args.out or "benchmarks/results/conv_grad.json", result, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
