"""Pre-training methods under one pipeline, found through the `METHODS` registry.

    METHODS = {"d3ssl": D3SSL, "d3ssl_dc": D3SSL, "soco": SoCo, "mocov2": MoCoV2}

Every method takes the same batches (the views of `train.stream`), the same backbone and the same
schedule; only what it computes differs. `forward(batch, generator, progress)` returns the loss and
its named terms; the momentum update of the teacher and the queue update happen inside, in MoCo's
order (update the teacher, compute keys, loss, enqueue).

- d3ssl (paper eq. 3, 4, 9, 10): student on x1-hat, x2s-hat (de-coupling) and x3 (de-positioning),
  teacher on x1-hat and x2; InfoNCE against a queue of teacher region features (eq. 5).
      L_dc = nce(z_s1, z_t2) + nce(z_s2, z_t1)          L_dp = nce(z_s3, z_t2) + nce(z_s3, z_t1)
      L = mean over proposals of (L_dc + L_dp)
  (L_dp over the proposals that stay in x3 after the shift, see train.augment.sample_shift.)
  Eq. 10 averages over the K proposals of one image; over a batch the mean is taken over every
  valid proposal of the batch (`info_nce`, MoCo's and SoCo's per-sample mean), so an image with
  fewer valid proposals (padding, the whole-crop fallback) weighs less than one with K.
  Each of x1-hat, x2s-hat and x3 takes its foreign content (PRM patches, x3's background) from its
  own donor image of the batch, so no positive pair shares foreign content.
  The paper leaves queue size, temperature, momentum, projector and optimiser unsaid; they follow
  MoCo v2, whose InfoNCE-with-queue formalism eq. 3-5 use: queue 65536, T = 0.2, momentum 0.999,
  2-layer MLP projector (C5 width hidden, 128 out; BN in it where `proj_bn`, see train.model).
  K = 4 proposals per image follows SoCo. Ours, where neither says: queued keys of the query's own
  image are no negatives (`exclude_same_image`, see train.losses.Queue).
- d3ssl_dc: the same without L_dp (Table 7), so no composition.
- soco: SoCo's C4 recipe: views x1 and x2, SoCo's random cutout in each box and box jitter,
  online network with projector and predictor (4096 hidden, 256 out, BN), BYOL loss
  2 - 2 cos, symmetric, target momentum 0.99 rising to 1 on a cosine schedule. Its views are the
  shared ones (x2 a random resized crop of scale [0.4, 1], `train.views`), where SoCo's C4 script
  crops its view 2 at scale [0.6, 1]: every method sees the same views.
- mocov2: image-level MoCo v2 on the same views x1 and x2 (global pooling of C5), queue, T = 0.2,
  MLP head; the loss is symmetrised over the two views. A "shared-views MoCo v2", not MoCo v2's
  own recipe (two RandomResizedCrop(0.2, 1) crops, blur with p = 0.5, an asymmetric loss): it
  differs from the region methods in its loss alone.

The InfoNCE-with-queue methods (d3ssl, d3ssl_dc, mocov2) use MoCo's shuffle-BN for the teacher
(`shuffle_bn`, train.shuffle_bn; `pretrain.bn_splits` groups per process). Every augmentation
switch is honoured by every region method; a switch a method cannot use (`Method.UNUSABLE`) is
an error that names it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from train.augment import AugmentConfig, augment_view, jitter_boxes, needs_backgrounds, region_views
from train.backgrounds import backgrounds
from train.losses import Queue, batch_top1, byol_loss, chance_loss, info_nce, key_spread, queue_top1
from train.model import MLP, RegionEncoder, bn_segments, momentum_copy, momentum_update, region_segments, use_split_batch_norm
from train.resnet import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD
from train.shuffle_bn import shuffled_forward

NO_REGION_AUGMENT = AugmentConfig(prc=False, prm=False, rbj=False, compose=False)


@dataclass(frozen=True)
class MethodConfig:
    """One method's settings (a block under `methods:` in params.yaml)."""

    temperature: float = 0.2                  # MoCo v2
    queue_size: int = 65536                   # MoCo v2 / SoCo
    queue_init: Literal["random", "empty"] = "random"   # MoCo: random unit vectors; empty: real keys only (train.losses.Queue)
    exclude_same_image: bool = True           # a queued key of the query's own image is no negative (train.losses.Queue)
    proj_hidden: int = 0                      # 0: the C5 width (MoCo v2: 2048 for ResNet-50)
    proj_dim: int = 128                       # MoCo v2
    proj_bn: bool = False
    pred_hidden: int = 0                      # BYOL/SoCo predictor hidden width (0: no predictor)
    momentum: float = 0.999                   # teacher EMA
    momentum_schedule: Literal["constant", "cosine"] = "constant"   # cosine: BYOL/SoCo, rises to 1
    depositioning: bool = True                # L_dp (d3ssl); off for d3ssl_dc
    shuffle_bn: bool = True                   # MoCo's shuffle-BN for the teacher (train.shuffle_bn)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


DEFAULTS = {
    "d3ssl": MethodConfig(),
    "d3ssl_dc": MethodConfig(depositioning=False, augment=AugmentConfig(compose=False)),
    "soco": MethodConfig(proj_hidden=4096, proj_dim=256, proj_bn=True, pred_hidden=4096, momentum=0.99,
                         momentum_schedule="cosine", shuffle_bn=False, depositioning=False,
                         augment=AugmentConfig(prc=False, prm=False, rbj=False, compose=False,
                                               cutout=True, box_jitter=True)),
    "mocov2": MethodConfig(depositioning=False, augment=NO_REGION_AUGMENT),
}


def prepare(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """Loader batch (uint8 images) -> normalised float images and boxes on `device`."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            out[k] = v
        elif k in ("x1", "x2", "x2s"):
            x = (v.to(device, non_blocking=True).float() - mean) / std
            out[k] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        else:
            out[k] = v.to(device, non_blocking=True)
    return out


def ema_momentum(cfg: MethodConfig, progress: float) -> float:
    """The teacher momentum at `progress` in [0, 1] of training."""
    if cfg.momentum_schedule == "cosine":
        return 1.0 - (1.0 - cfg.momentum) * (math.cos(math.pi * progress) + 1) / 2
    return cfg.momentum


SWITCHES = ("prc", "prm", "rbj", "compose", "cutout", "box_jitter")


class Method(nn.Module):
    """Student, teacher (momentum copy) and what a method adds; subclasses define `forward`.

    `bn_splits`: batch-norm groups per process for both networks (train.model); with
    `cfg.shuffle_bn` the teacher sees the batch shuffled across them (train.shuffle_bn).
    `UNUSABLE`: the settings a method cannot honour; `build` rejects them when switched on.
    """

    UNUSABLE: dict[str, str] = {}

    def __init__(self, arch: str, cfg: MethodConfig, roi_size: int = 14, bn_splits: int = 1):
        super().__init__()
        self.cfg = cfg
        self.bn_splits = bn_splits
        self.student = RegionEncoder(arch, cfg.proj_hidden, cfg.proj_dim, cfg.proj_bn, roi_size)
        self.teacher = momentum_copy(self.student)
        self.last_momentum = cfg.momentum

    @classmethod
    def check(cls, name: str, cfg: MethodConfig) -> None:
        """Raise on a setting switched on that this method cannot use, naming it."""
        on = [f"augment.{k}" for k in SWITCHES if getattr(cfg.augment, k)]
        on += ["depositioning"] * cfg.depositioning
        for key in on:
            if key in cls.UNUSABLE:
                raise ValueError(f"methods.{name}.{key} is true, but {name} cannot use it ({cls.UNUSABLE[key]}); "
                                 "set it to false")

    def student_regions(self, x, boxes, valid):
        return self.student.regions(x, boxes, valid, self.bn_splits)

    @torch.no_grad()
    def teacher_regions(self, x, boxes, valid, g):
        if not self.cfg.shuffle_bn:
            return self.teacher.regions(x, boxes, valid, self.bn_splits)
        return shuffled_forward(lambda *t: self.teacher.regions(*t, self.bn_splits), [x, boxes, valid],
                                valid.sum(1), self.bn_splits, g)

    @torch.no_grad()
    def teacher_images(self, x, g):
        if not self.cfg.shuffle_bn:
            return self.teacher.images(x, self.bn_splits)
        ones = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        return shuffled_forward(lambda t: self.teacher.images(t, self.bn_splits), [x], ones, self.bn_splits, g)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def _momentum_update_teacher(self, progress: float) -> None:
        self.last_momentum = ema_momentum(self.cfg, progress)
        momentum_update(self.student, self.teacher, self.last_momentum)

    def queue_fill(self) -> float:
        return self.queue.fill_ratio() if hasattr(self, "queue") else 0.0


class D3SSL(Method):
    """De-coupling (L_dc) and, unless `depositioning` is off, de-positioning (L_dp)."""

    def __init__(self, arch: str, cfg: MethodConfig, roi_size: int = 14, bn_splits: int = 1):
        super().__init__(arch, cfg, roi_size, bn_splits)
        if cfg.depositioning and not cfg.augment.compose:
            raise ValueError("L_dp needs the composition x3: set augment.compose: true or depositioning: false")
        if cfg.augment.compose and not cfg.depositioning:
            raise ValueError("augment.compose: true builds x3 for L_dp, which depositioning: false switches off; "
                             "set compose: false (d3ssl_dc) or depositioning: true")
        self.queue = Queue(cfg.queue_size, cfg.proj_dim, cfg.queue_init, cfg.exclude_same_image)

    def forward(self, batch: dict, g: torch.Generator, progress: float) -> tuple[torch.Tensor, dict]:
        valid = batch["valid"]
        ids = batch["image_id"].view(-1, 1).expand_as(valid)                   # image of every region slot
        v = region_views(batch, self.cfg.augment, g)
        z_s1 = self.student_regions(v["x1h"], v["s1"], valid)          # N x D, eq. 3
        z_s2 = self.student_regions(v["x2sh"], v["s2s"], valid)
        with torch.no_grad():
            self._momentum_update_teacher(progress)
            z_t1 = self.teacher_regions(v["x1h"], v["t1"], valid, g)
            z_t2 = self.teacher_regions(batch["x2"], v["t2"], valid, g)
        neg, T = self.queue.negatives(), self.cfg.temperature
        same = self.queue.same_image(ids[valid])                                 # rows of z_s1, z_s2, z_t1, z_t2
        l_dc = info_nce(z_s1, z_t2, neg, T, same) + info_nce(z_s2, z_t1, neg, T, same)      # eq. 4
        chance = chance_loss(len(neg), same)
        terms = {"loss_dc": l_dc.detach(), "loss_dc_chance": 2 * chance,
                 "top1": queue_top1(z_s1, z_t2, neg, same), "key_std": key_spread(torch.cat([z_t1, z_t2]))}
        loss = l_dc
        if self.cfg.depositioning:
            # x3 holds the boxes that stay on the canvas after the shift (valid3, a subset of valid)
            keep = v["valid3"][valid]                                            # rows of z_t1/z_t2
            if bool(keep.any()):
                z_s3 = self.student_regions(v["x3"], v["s3"], v["valid3"])        # eq. 8
                same3 = self.queue.same_image(ids[v["valid3"]])                   # rows of z_s3
                l_dp = info_nce(z_s3, z_t2[keep], neg, T, same3) + info_nce(z_s3, z_t1[keep], neg, T, same3)  # eq. 9
                # eq. 10 averages over all proposals: L_dp counts for the share of them in x3
                l_dp = l_dp * keep.float().mean()
                chance3 = chance_loss(len(neg), same3)                            # over z_s3's own negatives
            else:
                l_dp, chance3 = z_s1.new_zeros(()), 0.0
            terms["loss_dp"] = l_dp.detach()
            terms["loss_dp_chance"] = 2 * chance3 * float(keep.float().mean())
            terms["shift_px"] = v["shift_px"].detach()
            loss = loss + l_dp                                                   # eq. 10
        self.queue.enqueue(torch.cat([z_t1, z_t2]), torch.cat([ids[valid], ids[valid]]))
        return loss, terms


class SoCo(Method):
    """SoCo, C4: BYOL-style region regression between x1 and x2.

    Its own region augmentations are `cutout` and `box_jitter`; D3SSL's PRC, PRM and RBJ apply
    too when switched on (the paper's Table 6: SoCo with D3SSL's augmentations), each view with
    its own PRM background. There is no L_dp, so `compose`/`depositioning` are rejected.
    """

    UNUSABLE = {"augment.compose": "SoCo has no de-positioning loss", "depositioning": "SoCo has no L_dp"}

    def __init__(self, arch: str, cfg: MethodConfig, roi_size: int = 14, bn_splits: int = 1):
        super().__init__(arch, cfg, roi_size, bn_splits)
        if not cfg.pred_hidden:
            raise ValueError("soco needs a predictor: set pred_hidden > 0")
        self.predictor = use_split_batch_norm(MLP(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, batch_norm=True))

    def forward(self, batch: dict, g: torch.Generator, progress: float) -> tuple[torch.Tensor, dict]:
        a, valid = self.cfg.augment, batch["valid"]
        bg = backgrounds(batch["x1"], 2, g) if needs_backgrounds(a) else [None, None]
        x1 = augment_view(batch["x1"], batch["boxes1"], valid, a, g, bg[0])[0]
        x2 = augment_view(batch["x2"], batch["boxes2"], valid, a, g, bg[1])[0]
        H, W = x1.shape[-2:]
        b1 = jitter_boxes(batch["boxes1"], valid, a, g, H, W)
        b2 = jitter_boxes(batch["boxes2"], valid, a, g, H, W)
        with bn_segments(region_segments(valid, self.bn_splits) if self.bn_splits > 1 else None):
            p1 = self.predictor(self.student_regions(x1, b1, valid))
            p2 = self.predictor(self.student_regions(x2, b2, valid))
        with torch.no_grad():
            self._momentum_update_teacher(progress)
            z1 = self.teacher_regions(x1, b1, valid, g)
            z2 = self.teacher_regions(x2, b2, valid, g)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        # BYOL has no chance level: a collapsed target gives a falling loss; the in-batch
        # retrieval accuracy and the key spread tell
        return loss, {"loss_byol": loss.detach(), "top1": batch_top1(p1, z2), "key_std": key_spread(torch.cat([z1, z2]))}


class MoCoV2(Method):
    """Image-level MoCo v2 on x1 and x2, symmetric. It sees no boxes, so every region
    augmentation is rejected."""

    UNUSABLE = {**{f"augment.{k}": "MoCo v2 is image-level and sees no boxes" for k in SWITCHES},
                "depositioning": "MoCo v2 has no L_dp"}

    def __init__(self, arch: str, cfg: MethodConfig, roi_size: int = 14, bn_splits: int = 1):
        super().__init__(arch, cfg, roi_size, bn_splits)
        self.queue = Queue(cfg.queue_size, cfg.proj_dim, cfg.queue_init, cfg.exclude_same_image)

    def forward(self, batch: dict, g: torch.Generator, progress: float) -> tuple[torch.Tensor, dict]:
        n = self.bn_splits
        q1, q2 = self.student.images(batch["x1"], n), self.student.images(batch["x2"], n)
        with torch.no_grad():
            self._momentum_update_teacher(progress)
            k1, k2 = self.teacher_images(batch["x1"], g), self.teacher_images(batch["x2"], g)
        neg, T, ids = self.queue.negatives(), self.cfg.temperature, batch["image_id"]
        same = self.queue.same_image(ids)
        loss = info_nce(q1, k2, neg, T, same) + info_nce(q2, k1, neg, T, same)
        terms = {"loss_nce": loss.detach(), "loss_nce_chance": 2 * chance_loss(len(neg), same),
                 "top1": queue_top1(q1, k2, neg, same), "key_std": key_spread(torch.cat([k1, k2]))}
        self.queue.enqueue(torch.cat([k1, k2]), torch.cat([ids, ids]))
        return loss, terms


METHODS: dict[str, type[Method]] = {"d3ssl": D3SSL, "d3ssl_dc": D3SSL, "soco": SoCo, "mocov2": MoCoV2}


def build(name: str, arch: str, cfg: MethodConfig | None = None, roi_size: int = 14, bn_splits: int = 1) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(METHODS)}")
    cfg = cfg if cfg is not None else DEFAULTS[name]
    METHODS[name].check(name, cfg)
    return METHODS[name](arch, cfg, roi_size, bn_splits)
