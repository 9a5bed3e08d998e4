"""COCO evaluation of a detector: pycocotools COCOeval AP, AP50, AP75, APs, APm, APl in percent,
for boxes and (with masks) segmentation, over the predictions of every process."""
from __future__ import annotations

import contextlib
import io

import torch
import torch.nn as nn

from eval.detection.data import CocoDetection
from eval.detection.engine import predict
from eval.detection.schedule import Schedule
from train import dist

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ap(coco_gt, results: list[dict], iou_type: str, image_ids: list[int] | None = None) -> dict[str, float]:
    """COCOeval `iou_type` ('bbox' or 'segm') of `results` over `image_ids` (default: all): AP,
    AP50, AP75, APs, APm, APl in percent (0 without a single detection)."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {k: 0.0 for k in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):      # pycocotools prints its tables
        dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # -1 marks an area range without ground truth; report it as 0 like the other empty cases
    return {k: round(max(float(v), 0.0) * 100.0, 3) for k, v in zip(STAT_NAMES, ev.stats[:6])}


def evaluate(model: nn.Module, dataset: CocoDetection, schedule: Schedule, device: torch.device,
             batch_size: int = 4) -> dict:
    """{'bbox': {...}} (and 'segm' with masks) and the number of detections on `dataset`,
    predictions gathered over processes; every process gets the numbers. The ground truth is
    the annotation file as it is (`dataset.coco`), over `dataset.ids`."""
    mine = predict(model, dataset, schedule, device, batch_size)
    results = [r for part in dist.all_gather_object(mine) for r in part]
    out = {"bbox": coco_ap(dataset.coco, results, "bbox", dataset.ids)}
    if schedule.masks:
        out["segm"] = coco_ap(dataset.coco, results, "segm", dataset.ids)
    out["detections"] = len(results)
    return out
