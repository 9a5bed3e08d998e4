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
pascal_voc_R_50_C4_24k_moco.yaml / coco_R_50_C4_*_moco.yaml files) rebuilt on torchvision:
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
  random horizontal flip; test at `min_size_test`. Crowd boxes are not trained on; images without
  a box are skipped in training (detectron2 defaults).
- Evaluation: pycocotools COCOeval on the val annotations: AP, AP50, AP75 (and APs/APm/APl), in
  percent, for boxes and (with masks) segmentation.

Presets (`PRESETS`): `coco_1x` (COCO, Mask R-CNN, 90k iterations at 16 images, steps 60k/80k:
detectron2's 1x, the schedule the paper names; MoCo itself ships 2x), `voc_24k` (VOC07+12, Faster
R-CNN, 24k iterations, steps 18k/22k, warm-up 100: MoCo's pascal_voc_R_50_C4_24k_moco.yaml),
`short` and `short_mask` (the embedded data on a CPU in minutes), `tiny` (seconds, for the whole
embedded `dvc repro`); the settings of these three are ours.
The batch is global: under torchrun each of the N processes takes ims_per_batch / N images.

On VOC, COCOeval's AP averages IoU 0.5:0.95 with 101-point interpolation; detectron2's
PascalVOCDetectionEvaluator (MoCo's VOC numbers) uses the VOC07 11-point AP, so VOC numbers from
here are close to, not identical with, the paper's protocol. VOC "difficult" objects are
converted as crowd (eval.voc): ignored by COCOeval and not trained on.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align

from eval.backbone import (
    ARCHS, IMAGENET_MEAN, IMAGENET_STD, build_resnet, load_rgb, out_channels, resolve_device,
)
from pipeline.files import atomic_dir
from pipeline.params import as_dict, load_section


@dataclass(frozen=True)
class Schedule:
    """A fine-tuning recipe: detectron2's INPUT / SOLVER / RPN / ROI_HEADS keys it stands for."""

    min_size_train: tuple[int, ...]     # INPUT.MIN_SIZE_TRAIN, one drawn per image
    min_size_test: int                  # INPUT.MIN_SIZE_TEST
    max_size: int                       # INPUT.MAX_SIZE_TRAIN / _TEST
    ims_per_batch: int                  # SOLVER.IMS_PER_BATCH, over all processes
    base_lr: float                      # SOLVER.BASE_LR
    max_iter: int                       # SOLVER.MAX_ITER
    steps: tuple[int, ...]              # SOLVER.STEPS: LR x gamma at each
    warmup_iters: int                   # SOLVER.WARMUP_ITERS (linear from warmup_factor)
    masks: bool                         # MODEL.MASK_ON: Mask R-CNN and segmentation AP
    precise_bn_iters: int = 200         # TEST.PRECISE_BN.NUM_ITER (0: off)
    warmup_factor: float = 0.001        # SOLVER.WARMUP_FACTOR
    gamma: float = 0.1                  # SOLVER.GAMMA
    momentum: float = 0.9               # SOLVER.MOMENTUM
    weight_decay: float = 1e-4          # SOLVER.WEIGHT_DECAY (SOLVER.WEIGHT_DECAY_NORM = 0)
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)   # ANCHOR_GENERATOR.SIZES
    rpn_pre_nms_train: int = 12000      # RPN.PRE_NMS_TOPK_TRAIN
    rpn_post_nms_train: int = 2000      # RPN.POST_NMS_TOPK_TRAIN
    rpn_pre_nms_test: int = 6000        # RPN.PRE_NMS_TOPK_TEST
    rpn_post_nms_test: int = 1000       # RPN.POST_NMS_TOPK_TEST
    roi_per_image: int = 512            # ROI_HEADS.BATCH_SIZE_PER_IMAGE
    pooler_resolution: int = 14         # ROI_BOX_HEAD / ROI_MASK_HEAD.POOLER_RESOLUTION (res5 halves it)
    freeze_at: int = 0                  # BACKBONE.FREEZE_AT: stages frozen (1 = stem, 2 = stem + res2)
    detections_per_image: int = 100     # TEST.DETECTIONS_PER_IMAGE


PRESETS: dict[str, Schedule] = {
    # MoCo coco_R_50_C4_*_moco.yaml (Base-RCNN-C4-BN) with detectron2's 1x schedule.
    "coco_1x": Schedule(min_size_train=(640, 672, 704, 736, 768, 800), min_size_test=800, max_size=1333,
                        ims_per_batch=16, base_lr=0.02, max_iter=90000, steps=(60000, 80000),
                        warmup_iters=1000, masks=True),
    # MoCo pascal_voc_R_50_C4_24k_moco.yaml.
    "voc_24k": Schedule(min_size_train=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
                        min_size_test=800, max_size=1333, ims_per_batch=16, base_lr=0.02, max_iter=24000,
                        steps=(18000, 22000), warmup_iters=100, masks=False),
    # The embedded data (240-320 px images, objects 34-144 px) on 2 CPU cores in a few minutes:
    # 0.75x scale, anchors from 16 px, 8x8 RoIs (4x4 after res5), fewer proposals and RoIs,
    # 200 iterations of 2 images.
    "short": Schedule(min_size_train=(192, 224, 256), min_size_test=224, max_size=384, ims_per_batch=2,
                      base_lr=0.02, max_iter=200, steps=(160,), warmup_iters=20, masks=False,
                      precise_bn_iters=10, anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_train=1000,
                      rpn_post_nms_train=300, rpn_pre_nms_test=500, rpn_post_nms_test=50, roi_per_image=32,
                      pooler_resolution=8),
}
PRESETS["short_mask"] = replace(PRESETS["short"], masks=True)
# The whole embedded `dvc repro` fine-tunes 15 backbones: 0.4x scale and 40 iterations, about
# 20 s each on 2 CPU cores (with detect.val_images 100). Enough to rank backbones roughly, not to reach a useful detector.
PRESETS["tiny"] = replace(PRESETS["short"], min_size_train=(112, 128), min_size_test=128, max_size=213,
                          max_iter=40, steps=(32,), warmup_iters=10, precise_bn_iters=5,
                          anchor_sizes=(16, 32, 64, 128), rpn_pre_nms_train=500, rpn_post_nms_train=200,
                          rpn_pre_nms_test=300, rpn_post_nms_test=50)


def preset(name: str) -> Schedule:
    if name not in PRESETS:
        raise ValueError(f"unknown detection preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class DetectConfig:
    """The `detect` section of params.yaml."""

    preset: str = "short"          # a name in PRESETS: coco_1x, voc_24k, short, short_mask
    seed: int = 0                  # data order, flips, new layers, the random backbone
    workers: int = 2               # DataLoader processes per training process
    eval_batch_size: int = 4       # images per forward at test time, per process
    log_every: int = 20            # iterations between log lines / train_log.csv rows
    val_images: int = 0            # evaluate on the first N val images by id (0: all); for quick runs
    max_iter: int = 0              # stop training after N iterations (0: the preset's); for smoke runs


# ------------------------------------------------------------------------------ model


class C4RoIAlign(MultiScaleRoIAlign):
    """RoIAlign of proposals on the C4 map, aligned, adaptive sampling (detectron2's ROIAlignV2;
    torchvision's MultiScaleRoIAlign, whose interface and type this keeps, is not aligned).
    Returns R x C x size x size."""

    def __init__(self, output_size: int = 14, stride: int = 16):
        super().__init__(["0"], output_size, sampling_ratio=0)
        self.size, self.stride = output_size, stride

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes) -> torch.Tensor:
        return roi_align(x["0"], boxes, self.size, 1.0 / self.stride, sampling_ratio=0, aligned=True)


def build_detector(resnet: nn.Module, num_classes: int, schedule: Schedule) -> FasterRCNN:
    """Faster R-CNN (or Mask R-CNN with schedule.masks) on a torchvision ResNet, C4 structure.

    num_classes excludes the background."""
    freeze_stages(resnet, schedule.freeze_at)
    body = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                         resnet.layer1, resnet.layer2, resnet.layer3)        # image -> C4, stride 16
    c4 = out_channels(resnet.layer3)
    c5 = out_channels(resnet.layer4)
    body.out_channels = c4
    res5 = nn.Sequential(resnet.layer4, nn.BatchNorm2d(c5))                  # R x C4 x 14 x 14 -> R x C5 x 7 x 7
    box_head = nn.Sequential(res5, nn.AdaptiveAvgPool2d(1), nn.Flatten())   # -> R x C5
    anchors = AnchorGenerator((tuple(schedule.anchor_sizes),), ((0.5, 1.0, 2.0),))
    kwargs = dict(
        min_size=tuple(schedule.min_size_train), max_size=schedule.max_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors, rpn_head=RPNHead(c4, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=schedule.rpn_pre_nms_train, rpn_post_nms_top_n_train=schedule.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=schedule.rpn_pre_nms_test, rpn_post_nms_top_n_test=schedule.rpn_post_nms_test,
        box_roi_pool=C4RoIAlign(schedule.pooler_resolution, 16), box_head=box_head,
        box_predictor=FastRCNNPredictor(c5, num_classes + 1),
        box_batch_size_per_image=schedule.roi_per_image, box_detections_per_img=schedule.detections_per_image,
    )
    if schedule.masks:
        return MaskRCNN(body, mask_roi_pool=C4RoIAlign(schedule.pooler_resolution, 16), mask_head=res5,
                        mask_predictor=MaskRCNNPredictor(c5, 256, num_classes + 1), **kwargs)
    return FasterRCNN(body, **kwargs)


def freeze_stages(resnet: nn.Module, freeze_at: int) -> None:
    """Freeze the first `freeze_at` stages (stem, res2, ...): no gradient, and their BatchNorm
    replaced by FrozenBatchNorm2d with the same statistics (detectron2 FREEZE_AT)."""
    stages = [nn.ModuleList([resnet.conv1, resnet.bn1]), resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    for stage in stages[:freeze_at]:
        for p in stage.parameters():
            p.requires_grad_(False)
    if freeze_at >= 1:
        resnet.bn1 = _frozen(resnet.bn1)
    for stage in stages[1:freeze_at]:
        for block in stage:
            for name, child in list(block.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    setattr(block, name, _frozen(child))
            if block.downsample is not None:
                block.downsample[1] = _frozen(block.downsample[1])


def _frozen(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    f = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    f.load_state_dict(bn.state_dict())
    return f


# ------------------------------------------------------------------------------ data


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection set: item i -> (3xHxW float image in [0, 1], target dict).

    Targets: `boxes` (x1y1x2y2 pixels), `labels` (1..K, contiguous over `category_ids`), `masks`
    (NxHxW uint8, with_masks only), `image_id`. Crowd annotations and boxes under one pixel are left
    out; with `train`, images without a remaining box are dropped and images are flipped at random.
    """

    def __init__(self, annotations: Path, images_dir: Path, *, train: bool, with_masks: bool,
                 category_ids: list[int] | None = None):
        from pycocotools.coco import COCO

        if not Path(annotations).is_file():
            raise FileNotFoundError(f"annotation file {annotations} does not exist; pass a COCO-format JSON")
        if not Path(images_dir).is_dir():
            raise FileNotFoundError(f"image folder {images_dir} does not exist")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(annotations))
        self.images_dir, self.train, self.with_masks = Path(images_dir), train, with_masks
        self.category_ids = sorted(self.coco.getCatIds()) if category_ids is None else list(category_ids)
        unknown = sorted(set(self.coco.getCatIds()) - set(self.category_ids))
        if unknown:
            raise ValueError(f"{annotations}: categories {unknown[:10]} are not among the training categories")
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns[i])]
            if not ids:
                raise ValueError(f"{annotations}: no image with a non-crowd box to train on")
        self.ids = ids

    @staticmethod
    def _usable(a: dict) -> bool:
        return not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        info = self.coco.imgs[self.ids[i]]
        image = load_rgb(self.images_dir / info["file_name"])
        h, w = image.shape[:2]
        anns = [a for a in self.coco.imgToAnns[self.ids[i]] if self._usable(a)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        target = {"boxes": boxes, "labels": labels, "image_id": int(self.ids[i])}
        if self.with_masks:
            target["masks"] = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])
                                               if anns else np.zeros((0, h, w), np.uint8))
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return x, target


class InfiniteBatches(torch.utils.data.Sampler):
    """Endless batches of dataset indices for this process: a seeded permutation per epoch,
    rank r of n taking every n-th index (the global batch is split over the processes)."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()[self.rank::self.world]
            for j in range(0, len(perm) - self.batch + 1, self.batch):
                yield perm[j:j + self.batch]
            epoch += 1


def _collate(items):
    return tuple(zip(*items))


# ------------------------------------------------------------------------------ distributed


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device_name: str) -> torch.device:
    """Join the torchrun process group when launched by torchrun; the device of this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name)
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device
    return resolve_device(device_name)


def _gather(obj):
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------ training


def lr_factor(it: int, schedule: Schedule) -> float:
    """detectron2 WarmupMultiStepLR: linear warm-up from warmup_factor, x gamma at each step."""
    f = schedule.gamma ** sum(it >= s for s in schedule.steps)
    if it < schedule.warmup_iters:
        a = it / schedule.warmup_iters
        f *= schedule.warmup_factor * (1 - a) + a
    return f


def make_optimizer(model: nn.Module, schedule: Schedule) -> torch.optim.SGD:
    """SGD; no weight decay on normalisation parameters (detectron2 WEIGHT_DECAY_NORM = 0)."""
    norm_params, other = [], []
    for m in model.modules():
        target = norm_params if isinstance(m, nn.modules.batchnorm._NormBase) else other
        target.extend(p for p in m.parameters(recurse=False) if p.requires_grad)
    return torch.optim.SGD([{"params": other, "weight_decay": schedule.weight_decay},
                            {"params": norm_params, "weight_decay": 0.0}],
                           lr=schedule.base_lr, momentum=schedule.momentum)


def _batches(dataset, schedule: Schedule, cfg: DetectConfig, seed_offset: int = 0):
    rank, world = dist_info()
    if schedule.ims_per_batch % world:
        raise ValueError(f"ims_per_batch {schedule.ims_per_batch} is not divisible by {world} processes")
    sampler = InfiniteBatches(len(dataset), schedule.ims_per_batch // world, cfg.seed + seed_offset, rank, world)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate,
                                            num_workers=cfg.workers))


def _to(device, images, targets):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


def _log(*args) -> None:
    print(*args, flush=True)


def train(model: nn.Module, dataset: CocoDetection, schedule: Schedule, cfg: DetectConfig,
          device: torch.device, log=_log) -> list[dict]:
    """Fine-tune `model` (already on `device`, maybe DDP-wrapped) for schedule.max_iter
    iterations; returns the logged rows (iteration, lr, losses)."""
    model.train()
    opt = make_optimizer(model, schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(it, schedule))
    batches = _batches(dataset, schedule, cfg)
    rows, t0 = [], time.perf_counter()
    for it in range(schedule.max_iter):
        images, targets = _to(device, *next(batches))
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            parts = {k: round(v.item(), 4) for k, v in losses.items()}
            raise FloatingPointError(f"loss is {loss.item()} at iteration {it}: {parts}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % cfg.log_every == 0 or it + 1 == schedule.max_iter:
            row = {"iter": it + 1, "lr": opt.param_groups[0]["lr"], "loss": loss.item(),
                   **{k: v.item() for k, v in losses.items()}}
            rows.append(row)
            spent = time.perf_counter() - t0
            log(f"iter {it + 1}/{schedule.max_iter} loss {row['loss']:.3f} lr {row['lr']:.5f} "
                f"{spent / (it + 1):.2f} s/iter, eta {spent / (it + 1) * (schedule.max_iter - it - 1) / 60:.1f} min")
    return rows


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
    batches = _batches(dataset, schedule, cfg, seed_offset=1)
    for _ in range(schedule.precise_bn_iters):
        model(*_to(device, *next(batches)))
    for m, mom in zip(bns, momenta):
        m.momentum = mom


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict(model: nn.Module, dataset: CocoDetection, schedule: Schedule, device: torch.device,
            batch_size: int = 4) -> list[dict]:
    """COCO result dicts (bbox, and RLE segmentation with masks) for this process's share of
    `dataset` (every world-th image); labels mapped back to the dataset's category ids."""
    from pycocotools import mask as mask_utils

    net = model.module if hasattr(model, "module") else model
    net.eval()
    train_sizes = net.transform.min_size
    net.transform.min_size = (schedule.min_size_test,)
    rank, world = dist_info()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(rank, len(dataset), world)),
                                         batch_size=batch_size, collate_fn=_collate, num_workers=0)
    results = []
    try:
        for images, targets in loader:
            outs = net([im.to(device) for im in images])
            for out, t in zip(outs, targets):
                boxes = out["boxes"].cpu().numpy()
                scores = out["scores"].cpu().numpy()
                cats = [dataset.category_ids[int(l) - 1] for l in out["labels"].cpu()]
                rles = None
                if "masks" in out:
                    m = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                    rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
                for j in range(len(boxes)):
                    x1, y1, x2, y2 = (float(v) for v in boxes[j])
                    r = {"image_id": t["image_id"], "category_id": cats[j], "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(scores[j])}
                    if rles is not None:
                        rle = rles[j]
                        r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                    results.append(r)
    finally:
        net.transform.min_size = train_sizes
    return results


STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ap(coco_gt, results: list[dict], iou_type: str, image_ids: list[int] | None = None) -> dict[str, float]:
    """COCOeval `iou_type` ('bbox' or 'segm') of `results` over `image_ids` (default: all): AP,
    AP50, AP75, APs, APm, APl in percent (0 without a single detection)."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {k: 0.0 for k in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
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
             batch_size: int = 4) -> dict[str, dict[str, float]]:
    """{'bbox': {...}} (and 'segm' with masks) on `dataset`, gathered over processes; every
    process gets the numbers."""
    results = [r for part in _gather(predict(model, dataset, schedule, device, batch_size)) for r in part]
    out = {"bbox": coco_ap(dataset.coco, results, "bbox", dataset.ids)}
    if schedule.masks:
        out["segm"] = coco_ap(dataset.coco, results, "segm", dataset.ids)
    out["detections"] = len(results)
    return out


# ------------------------------------------------------------------------------ the stage


def run_detect(args, cfg: DetectConfig, log=_log) -> dict:
    schedule = preset(cfg.preset)
    if cfg.max_iter:
        schedule = replace(schedule, max_iter=cfg.max_iter, steps=tuple(s for s in schedule.steps if s < cfg.max_iter),
                           warmup_iters=min(schedule.warmup_iters, cfg.max_iter))
    device = init_distributed(args.device)
    rank, world = dist_info()
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
    rows = train(model, train_set, schedule, cfg, device, log=log if rank == 0 else (lambda *_: None))
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
    as a whole. Seconds vary between runs of the same inputs: printed, never in what DVC hashes."""
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
        _log(f"seconds (not in {out_dir / 'metrics.json'}): {json.dumps(times)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.detect", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, help="ResNet state_dict file, or 'random'")
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--train-ann", required=True, type=Path, help="COCO-format training annotations")
    p.add_argument("--train-images", required=True, type=Path, help="folder the training file_names are in")
    p.add_argument("--val-ann", required=True, type=Path, help="COCO-format evaluation annotations")
    p.add_argument("--val-images", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json and train_log.csv (replaced)")
    p.add_argument("--preset", help=f"one of {sorted(PRESETS)} (default: params, else 'short')")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'detect' section from")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = p.parse_args(argv)
    cfg = load_section(DetectConfig, "detect", args.params)
    if args.preset is not None:
        cfg = replace(cfg, preset=args.preset)
    preset(cfg.preset)  # an unknown name fails before any work
    result = run_detect(args, cfg)
    if dist_info()[0] == 0:
        write_outputs(args.out, result)
        b = result["bbox"]
        print(f"bbox AP {b['AP']:.2f} AP50 {b['AP50']:.2f} AP75 {b['AP75']:.2f}"
              + (f"; segm AP {result['segm']['AP']:.2f}" if "segm" in result else "") + f" -> {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
