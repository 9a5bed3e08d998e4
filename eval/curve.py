"""O-KNN learning curve: O-KNN top-1 of a run's backbone snapshots, one point per snapshot.

    python -m eval.curve --snapshots runs/d3ssl/seed0/snapshots --arch resnet18 \
        --coco-root data/synth/coco --params params.yaml --out reports/models/d3ssl/seed0/oknn_curve.json

`--snapshots` holds `step<N>/backbone.pth` (written by train.pretrain after each step of
`pretrain.snapshot_steps`). Each is evaluated exactly as the oknn stage evaluates a final backbone
(the `oknn` section of the params). The report joins the points with step 0 (the random network
of the same seed) and the final backbone's O-KNN into `reports/oknn_curve.png`.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from eval.backbone import ResNetStages, build_resnet
from train.dist import resolve_device
from eval.oknn import OknnConfig, add_protocol_args, run_oknn
from pipeline import cli
from pipeline.files import write_text
from pipeline.params import load_section

log = logging.getLogger(__name__)
KEEP = ("top1", "top5", "disturbed_top1", "disturbed_top5")


def snapshot_steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, backbone file) of every `step<N>/backbone.pth` under `folder`, by step."""
    found = []
    for d in folder.iterdir() if folder.is_dir() else []:
        m = re.fullmatch(r"step(\d+)", d.name)
        if m and (d / "backbone.pth").is_file():
            found.append((int(m.group(1)), d / "backbone.pth"))
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m eval.curve", __doc__)
    p.add_argument("--snapshots", required=True, type=Path, help="a run's snapshots folder (step<N>/backbone.pth)")
    add_protocol_args(p)
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    cfg = load_section(OknnConfig, "oknn", args.params)
    device = resolve_device(args.device)
    found = snapshot_steps(args.snapshots)
    if not found:
        raise FileNotFoundError(f"no step<N>/backbone.pth under {args.snapshots}: set pretrain.snapshot_steps "
                                "and rerun the pretrain stage")
    points = []
    for step, path in found:
        r = run_oknn(ResNetStages(build_resnet(args.arch, path, seed=cfg.seed)), args.coco_root, cfg, device)
        points.append({"step": step, **{k: r[k] for k in KEEP}})
        log.info("step %d: O-KNN top-1 %.2f", step, r["top1"])
    write_text(args.out, json.dumps({"snapshots": str(args.snapshots), "arch": args.arch, "points": points},
                                    indent=2) + "\n")
    log.info("wrote %s: O-KNN at %d snapshot steps (%s)", args.out, len(points), ", ".join(str(s) for s, _ in found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
