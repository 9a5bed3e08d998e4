"""Detection fine-tuning of a backbone: Faster R-CNN / Mask R-CNN, ResNet-C4, COCO evaluation
(paper section 5.2, Tables 1 and 3).

    python -m eval.detect --backbone runs/d3ssl/export/backbone.pth --arch resnet50 \
        --train-ann COCO/annotations/instances_train2017.json --train-images COCO/train2017 \
        --val-ann COCO/annotations/instances_val2017.json --val-images COCO/val2017 \
        --out reports/d3ssl/detect_coco --preset coco_1x
    torchrun --nproc_per_node=8 -m eval.detect ... --preset voc_24k     # VOC07+12 (eval.voc makes the JSONs)
    python -m eval.detect --backbone random --arch resnet18 \
        --train-ann data/synth/coco/annotations/instances_train2017.json --train-images data/synth/coco/train2017 \
        --val-ann data/synth/coco/annotations/instances_val2017.json --val-images data/synth/coco/val2017 \
        --out /tmp/detect --preset short

The paper follows "one of the protocols in MoCo": ResNet-50-C4, Faster R-CNN on VOC07+12
(trainval07+12, test07), Mask R-CNN with the 1x schedule on COCO. This is MoCo's detectron2
setting (facebookresearch/moco, detection/configs/Base-RCNN-C4-BN.yaml and the
pascal_voc_R_50_C4_24k_moco.yaml / coco_R_50_C4_*_moco.yaml files) rebuilt on torchvision, in
`eval.detection` (schedule, model, data, engine, coco_eval: one job per module); this module is
the stage that runs them:
- Backbone: stem..res4 (C4, stride 16), every layer fine-tuned (FREEZE_AT 0), BatchNorm trained
  (SyncBatchNorm under torchrun on GPUs, like MoCo's naiveSyncBN; CPU processes keep their own
  statistics, as SyncBatchNorm is CUDA-only), RGB input with the ImageNet mean/std.
- RPN on C4: one 3x3 conv, anchors 32..512 x ratios 0.5/1/2 at stride 16; 12000/2000 proposals
  before/after NMS in training, 6000/1000 at test (MoCo's override), NMS 0.7, 256 anchors/image.
- Box head: RoIAlign 14x14 on C4 (aligned, adaptive sampling = detectron2's ROIAlignV2), res5,
  an extra BatchNorm after res5 (MoCo's Res5ROIHeadsExtraNorm), average pooling, linear
  classifier and class-specific box regression; 512 RoIs/image, 25% positive.
- Mask head (Mask R-CNN, `masks` in the preset): the same res5 (shared weights, as detectron2's
  Res5ROIHeads) on the mask RoIs, a 2x deconvolution to 14x14 and a per-class 1x1 conv.
- Solver: SGD momentum 0.9, weight decay 1e-4 (none on BatchNorm parameters), linear warm-up from
  0.001x, LR x0.1 at each step; before evaluation the BatchNorm statistics are recomputed over
  `precise_bn_iters` training batches (detectron2's PreciseBN, which MoCo enables).
- Input: shorter side drawn from `min_size_train` per image, longer side at most `max_size`,
  random horizontal flip; test at `min_size_test`. The annotations are read by
  `pipeline.readers` (the box rule every COCO consumer shares, see
  `eval.detection.data.CocoDetection`); crowd boxes are not trained on; images without a box are
  skipped in training (detectron2 defaults).
- Evaluation: pycocotools COCOeval on the val annotations: AP, AP50, AP75 (and APs/APm/APl), in
  percent, for boxes and (with masks) segmentation.

Presets (`PRESETS`, `eval.detection.schedule`): `coco_1x` (COCO, Mask R-CNN, detectron2's 1x),
`voc_24k` (VOC07+12, Faster R-CNN, MoCo's 24k), `short`, `short_mask` and `tiny` (the embedded
data on a CPU).
The batch is global: under torchrun each of the N processes takes ims_per_batch / N images.

On VOC, COCOeval's AP averages IoU 0.5:0.95 with 101-point interpolation; detectron2's
PascalVOCDetectionEvaluator (MoCo's VOC numbers) uses the VOC07 11-point AP, so VOC numbers from
here are close to, not identical with, the paper's protocol. VOC "difficult" objects are trained
on in trainval and ignored (as crowd) in the test set, as converted by eval.voc.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from eval.backbone import ARCHS, build_resnet
from eval.detection.coco_eval import evaluate
from eval.detection.data import CocoDetection
from eval.detection.engine import precise_bn, train
from eval.detection.model import build_detector
from eval.detection.schedule import PRESETS, DetectConfig, preset, schedule_of
from pipeline import cli
from pipeline.files import atomic_dir
from pipeline.params import as_dict, load_section
from train import dist

log = logging.getLogger(__name__)


def run_detect(args, cfg: DetectConfig) -> dict:
    """Fine-tune args.backbone on the training set and evaluate it on the val set; the result
    (metrics, sizes, settings, the training log and the seconds spent)."""
    schedule = schedule_of(cfg)
    device = dist.init_device(args.device)
    world = dist.world_size()
    torch.manual_seed(cfg.seed)
    train_set = CocoDetection(args.train_ann, args.train_images, train=True, with_masks=schedule.masks)
    val_set = CocoDetection(args.val_ann, args.val_images, train=False, with_masks=False,
                            category_ids=train_set.category_ids)
    if cfg.val_images:
        val_set.ids = val_set.ids[: cfg.val_images]
    resnet = build_resnet(args.arch, args.backbone, seed=cfg.seed)
    model = build_detector(resnet, len(train_set.category_ids), schedule).to(device)
    if world > 1:
        if device.type == "cuda":       # SyncBatchNorm is CUDA-only; CPU processes keep their own statistics
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    t0 = time.perf_counter()
    rows = train(model, train_set, schedule, cfg, device)
    t_train = time.perf_counter() - t0
    precise_bn(model, train_set, schedule, cfg, device)
    t1 = time.perf_counter()
    metrics = evaluate(model, val_set, schedule, device, cfg.eval_batch_size)
    return {
        "backbone": str(args.backbone), "arch": args.arch, "preset": cfg.preset, **metrics,
        "train_images": len(train_set), "val_images": len(val_set), "classes": len(train_set.category_ids),
        "processes": world, "device": str(device),
        "time_s": {"train": round(t_train, 1), "precise_bn_and_eval": round(time.perf_counter() - t1, 1)},
        "schedule": as_dict(schedule), "settings": as_dict(cfg), "log": rows,
    }


def write_outputs(out_dir: Path, result: dict) -> None:
    """metrics.json (everything but the log and the timing) and train_log.csv, replacing `out_dir`
    as a whole. Seconds vary between runs of the same inputs: logged, never in what DVC hashes."""
    rows = result.pop("log")
    times = result.pop("time_s", None)
    with atomic_dir(out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        with (tmp / "train_log.csv").open("w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    if times is not None:
        log.info("seconds (not in %s): %s", out_dir / "metrics.json", json.dumps(times))


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m eval.detect", __doc__)
    p.add_argument("--backbone", required=True, help="ResNet state_dict file, or 'random'")
    p.add_argument("--arch", required=True, choices=sorted(ARCHS), help="the backbone's architecture")
    p.add_argument("--train-ann", required=True, type=Path, help="COCO-format training annotations")
    p.add_argument("--train-images", required=True, type=Path, help="folder the training file_names are in")
    p.add_argument("--val-ann", required=True, type=Path, help="COCO-format evaluation annotations")
    p.add_argument("--val-images", required=True, type=Path, help="folder the evaluation file_names are in")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json and train_log.csv (replaced)")
    p.add_argument("--preset", help=f"one of {sorted(PRESETS)} (default: params, else 'short')")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'detect' section from")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level, rank=int(os.environ.get("RANK", "0")))
    cfg = load_section(DetectConfig, "detect", args.params)
    if args.preset is not None:
        cfg = replace(cfg, preset=args.preset)
    preset(cfg.preset)  # an unknown name fails before any work
    result = run_detect(args, cfg)
    if dist.rank() == 0:
        write_outputs(args.out, result)
        b = result["bbox"]
        log.info("wrote %s: bbox AP %.2f AP50 %.2f AP75 %.2f%s", args.out, b["AP"], b["AP50"], b["AP75"],
                 f"; segm AP {result['segm']['AP']:.2f}" if "segm" in result else "")
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
