"""The fine-tuning loop (SGD, detectron2's warm-up and steps), PreciseBN, and prediction as COCO
result dicts."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn as nn

from eval.detection.data import CocoDetection, collate, train_batches
from eval.detection.schedule import DetectConfig, Schedule, lr_factor
from train import dist

log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, schedule: Schedule) -> torch.optim.SGD:
    """SGD; no weight decay on normalisation parameters (detectron2 WEIGHT_DECAY_NORM = 0)."""
    norm_params, other = [], []
    for m in model.modules():
        target = norm_params if isinstance(m, nn.modules.batchnorm._NormBase) else other
        target.extend(p for p in m.parameters(recurse=False) if p.requires_grad)
    return torch.optim.SGD([{"params": other, "weight_decay": schedule.weight_decay},
                            {"params": norm_params, "weight_decay": 0.0}],
                           lr=schedule.base_lr, momentum=schedule.momentum)


def to_device(device: torch.device, images, targets):
    """A collated batch on `device` (tensors only; `image_id` stays an int)."""
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


def train(model: nn.Module, dataset: CocoDetection, schedule: Schedule, cfg: DetectConfig,
          device: torch.device) -> list[dict]:
    """Fine-tune `model` (already on `device`, maybe DDP-wrapped) for schedule.max_iter
    iterations; returns the rows logged every cfg.log_every iterations (iteration, lr, losses).
    A non-finite loss is an error naming the iteration and each loss."""
    model.train()
    opt = make_optimizer(model, schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(it, schedule))
    batches = train_batches(dataset, schedule.ims_per_batch, cfg.seed, cfg.workers)
    rows, t0 = [], time.perf_counter()
    for it in range(schedule.max_iter):
        losses = model(*to_device(device, *next(batches)))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            parts = {k: round(v.item(), 4) for k, v in losses.items()}
            raise FloatingPointError(f"loss is {loss.item()} at iteration {it}: {parts}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % cfg.log_every == 0 or it + 1 == schedule.max_iter:
            rows.append({"iter": it + 1, "lr": opt.param_groups[0]["lr"], "loss": loss.item(),
                         **{k: v.item() for k, v in losses.items()}})
            _log_progress(rows[-1], schedule.max_iter, time.perf_counter() - t0)
    return rows


def _log_progress(row: dict, max_iter: int, spent: float) -> None:
    per_iter = spent / row["iter"]
    log.info("iter %d/%d loss %.3f lr %.5f %.2f s/iter, eta %.1f min", row["iter"], max_iter, row["loss"],
             row["lr"], per_iter, per_iter * (max_iter - row["iter"]) / 60)


@torch.no_grad()
def precise_bn(model: nn.Module, dataset: CocoDetection, schedule: Schedule, cfg: DetectConfig,
               device: torch.device) -> None:
    """Recompute every BatchNorm's running statistics as the plain average over
    schedule.precise_bn_iters training batches (detectron2 PreciseBN); weights are untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or schedule.precise_bn_iters <= 0:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                  # cumulative moving average over the batches below
    model.train()
    batches = train_batches(dataset, schedule.ims_per_batch, cfg.seed + 1, cfg.workers)
    for _ in range(schedule.precise_bn_iters):
        model(*to_device(device, *next(batches)))
    for m, mom in zip(bns, momenta):
        m.momentum = mom


@torch.no_grad()
def predict(model: nn.Module, dataset: CocoDetection, schedule: Schedule, device: torch.device,
            batch_size: int = 4) -> list[dict]:
    """COCO result dicts (bbox, and RLE segmentation with masks) for this process's share of
    `dataset` (every world-th image), at schedule.min_size_test; labels mapped back to the
    dataset's category ids."""
    net = model.module if hasattr(model, "module") else model
    net.eval()
    train_sizes = net.transform.min_size
    net.transform.min_size = (schedule.min_size_test,)
    rank, world = dist.rank(), dist.world_size()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(rank, len(dataset), world)),
                                         batch_size=batch_size, collate_fn=collate, num_workers=0)
    results = []
    try:
        for images, targets in loader:
            outs = net([im.to(device) for im in images])
            for out, t in zip(outs, targets):
                results += _results(out, t["image_id"], dataset.category_ids)
    finally:
        net.transform.min_size = train_sizes
    return results


def _results(out: dict, image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's detections as COCO result dicts (x, y, w, h boxes; masks as RLE)."""
    from pycocotools import mask as mask_utils

    boxes = out["boxes"].cpu().numpy()
    scores = out["scores"].cpu().numpy()
    cats = [category_ids[int(label) - 1] for label in out["labels"].cpu()]
    rles = None
    if "masks" in out:
        m = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
    results = []
    for j in range(len(boxes)):
        x1, y1, x2, y2 = (float(v) for v in boxes[j])
        r = {"image_id": image_id, "category_id": cats[j], "bbox": [x1, y1, x2 - x1, y2 - y1],
             "score": float(scores[j])}
        if rles is not None:
            r["segmentation"] = {"size": rles[j]["size"], "counts": rles[j]["counts"].decode("ascii")}
        results.append(r)
    return results
