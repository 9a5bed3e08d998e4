"""Fine-tuning recipes: detectron2's INPUT / SOLVER / RPN / ROI_HEADS settings as one frozen
dataclass per preset, the `detect` section of params.yaml, and the learning-rate curve.

Presets: `coco_1x` (COCO, Mask R-CNN, 90k iterations at 16 images, steps 60k/80k: detectron2's 1x,
the schedule the paper names; MoCo itself ships 2x), `voc_24k` (VOC07+12, Faster R-CNN, 24k
iterations, steps 18k/22k, warm-up 100: MoCo's pascal_voc_R_50_C4_24k_moco.yaml), `short` and
`short_mask` (the embedded data on a CPU in minutes), `tiny` (seconds, for the whole embedded
`dvc repro`); the settings of these three are ours.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


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
    """The preset `name` of PRESETS; an unknown name is an error listing the valid ones."""
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


def schedule_of(cfg: DetectConfig) -> Schedule:
    """cfg.preset's schedule, cut to cfg.max_iter iterations when that is set (steps past the
    end dropped, warm-up at most the whole run)."""
    schedule = preset(cfg.preset)
    if not cfg.max_iter:
        return schedule
    return replace(schedule, max_iter=cfg.max_iter, steps=tuple(s for s in schedule.steps if s < cfg.max_iter),
                   warmup_iters=min(schedule.warmup_iters, cfg.max_iter))


def lr_factor(it: int, schedule: Schedule) -> float:
    """detectron2 WarmupMultiStepLR: linear warm-up from warmup_factor, x gamma at each step."""
    f = schedule.gamma ** sum(it >= s for s in schedule.steps)
    if it < schedule.warmup_iters:
        a = it / schedule.warmup_iters
        f *= schedule.warmup_factor * (1 - a) + a
    return f
