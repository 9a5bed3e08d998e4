"""How far O-KNN moves when only the CPU kernels change: the README's reproducibility figures.

    python -m benchmarks.measure_kernels --params params.yaml --coco-root data/synth/coco \
        --backbone runs/random/seed0/export/backbone.pth --backbone runs/d3ssl/seed0/export/backbone.pth ... \
        --out reports/reproducibility/kernels.json

Each backbone is evaluated by the `oknn` stage's code and settings three times in one process:
the default kernels (oneDNN/MKL-DNN convolutions, all threads), oneDNN switched off
(`torch.backends.mkldnn`, PyTorch's native convolutions: what a CPU or build without oneDNN runs),
and the default again on one thread. The same backbone file and images give float features that
differ in the last bits between these; the JSON holds each run's top-1/top-5 (plain and disturbed)
and the largest change against the default, so a reader sees which differences between models are
smaller than what another machine can produce.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from eval.backbone import ResNetStages, build_resnet
from eval.oknn import OknnConfig, run_oknn
from pipeline import cli
from pipeline.files import write_text
from pipeline.params import load_section

log = logging.getLogger("benchmarks.measure_kernels")
METRICS = ("top1", "top5", "disturbed_top1", "disturbed_top5")


def evaluate(stages: torch.nn.Module, coco_root: Path, cfg: OknnConfig, setting: str) -> dict:
    threads = torch.get_num_threads()
    try:
        if setting == "one_thread":
            torch.set_num_threads(1)
        with torch.backends.mkldnn.flags(enabled=setting != "no_onednn"):
            res = run_oknn(stages, coco_root, cfg, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    return {k: res[k] for k in METRICS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.measure_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="its `oknn` section (default: %(default)s)")
    p.add_argument("--coco-root", type=Path, default=Path("data/synth/coco"), help="default: %(default)s")
    p.add_argument("--backbone", action="append", required=True, help="a backbone state_dict file (repeat the option)")
    p.add_argument("--arch", default="resnet18", help="default: %(default)s")
    p.add_argument("--out", type=Path, default=Path("reports/reproducibility/kernels.json"), help="default: %(default)s")
    args = p.parse_args(argv)
    cli.setup_logging()
    cfg = load_section(OknnConfig, "oknn", args.params)
    rows = []
    for spec in args.backbone:
        stages = ResNetStages(build_resnet(args.arch, spec, seed=cfg.seed))
        runs = {s: evaluate(stages, args.coco_root, cfg, s) for s in ("default", "no_onednn", "one_thread")}
        moved = max(abs(runs[s][m] - runs["default"][m]) for s in runs for m in METRICS)
        rows.append({"backbone": spec, "runs": runs, "max_change": round(moved, 4)})
        log.info("%s: %s; largest change %.3f points", spec,
                 {s: round(r["top1"], 3) for s, r in runs.items()}, moved)
    result = {"settings": {"arch": args.arch, "oknn": {k: getattr(cfg, k) for k in ("feature", "min_size", "max_size", "k")},
                           "threads": torch.get_num_threads(), "torch": torch.__version__},
              "backbones": rows, "max_change": max(r["max_change"] for r in rows)}
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
