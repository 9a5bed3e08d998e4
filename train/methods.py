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
  The paper leaves queue size, temperature, momentum, projector and optimiser unsaid; they follow
  MoCo v2, whose InfoNCE-with-queue formalism eq. 3-5 use: queue 65536, T = 0.2, momentum 0.999,
  2-layer MLP projector (C5 width hidden, 128 out). K = 4 proposals per image follows SoCo.
- d3ssl_dc: the same without L_dp (Table 7), so no composition.
- soco: SoCo's C4 recipe: views x1 and x2, SoCo's random cutout in each box and box jitter,
  online network with projector and predictor (4096 hidden, 256 out, BN), BYOL loss
  2 - 2 cos, symmetric, target momentum 0.99 rising to 1 on a cosine schedule.
- mocov2: image-level MoCo v2 on the same views x1 and x2 (global pooling of C5), queue, T = 0.2,
  MLP head; the loss is symmetrised over the two views.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from train.augment import (
    AugmentConfig, apply_box_jitter, apply_cutout, region_views, sample_box_jitter, sample_cutout,
)
from train.losses import Queue, byol_loss, info_nce
from train.model import MLP, RegionEncoder, momentum_copy, momentum_update

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

NO_REGION_AUGMENT = AugmentConfig(prc=False, prm=False, rbj=False, compose=False)


@dataclass(frozen=True)
class MethodConfig:
    """One method's settings (a block under `methods:` in params.yaml)."""

    temperature: float = 0.2                  # MoCo v2
    queue_size: int = 65536                   # MoCo v2 / SoCo
    proj_hidden: int = 0                      # 0: the C5 width (MoCo v2: 2048 for ResNet-50)
    proj_dim: int = 128                       # MoCo v2
    proj_bn: bool = False
    pred_hidden: int = 0                      # BYOL/SoCo predictor hidden width (0: no predictor)
    momentum: float = 0.999                   # teacher EMA
    momentum_schedule: Literal["constant", "cosine"] = "constant"   # cosine: BYOL/SoCo, rises to 1
    depositioning: bool = True                # L_dp (d3ssl); off for d3ssl_dc
    augment: AugmentConfig = field(default_factory=AugmentConfig)


DEFAULTS = {
    "d3ssl": MethodConfig(),
    "d3ssl_dc": MethodConfig(depositioning=False, augment=AugmentConfig(compose=False)),
    "soco": MethodConfig(proj_hidden=4096, proj_dim=256, proj_bn=True, pred_hidden=4096, momentum=0.99,
                         momentum_schedule="cosine",
                         augment=AugmentConfig(prc=False, prm=False, rbj=False, compose=False,
                                               cutout=True, box_jitter=True)),
    "mocov2": MethodConfig(augment=NO_REGION_AUGMENT),
}


def prepare(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """Loader batch (uint8 images) -> normalised float images and boxes on `device`."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            out[k] = v
        elif k in ("x1", "x2", "x2s", "xb"):
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


class Method(nn.Module):
    """Student, teacher (momentum copy) and what a method adds; subclasses define `forward`."""

    def __init__(self, arch: str, cfg: MethodConfig, roi_size: int = 14):
        super().__init__()
        self.cfg = cfg
        self.student = RegionEncoder(arch, cfg.proj_hidden, cfg.proj_dim, cfg.proj_bn, roi_size)
        self.teacher = momentum_copy(self.student)
        self.last_momentum = cfg.momentum

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

    def __init__(self, arch: str, cfg: MethodConfig, roi_size: int = 14):
        super().__init__(arch, cfg, roi_size)
        if cfg.depositioning and not cfg.augment.compose:
            raise ValueError("L_dp needs the composition x3: set augment.compose: true or depositioning: false")
        self.queue = Queue(cfg.queue_size, cfg.proj_dim)

    def forward(self, batch: dict, g: torch.Generator, progress: float) -> tuple[torch.Tensor, dict]:
        valid = batch["valid"]
        v = region_views(batch, self.cfg.augment, g)
        z_s1 = self.student.regions(v["x1h"], v["s1"], valid)          # N x D, eq. 3
        z_s2 = self.student.regions(v["x2sh"], v["s2s"], valid)
        with torch.no_grad():
            self._momentum_update_teacher(progress)
            z_t1 = self.teacher.regions(v["x1h"], v["t1"], valid)
            z_t2 = self.teacher.regions(batch["x2"], v["t2"], valid)
        neg, T = self.queue.negatives(), self.cfg.temperature
        l_dc = info_nce(z_s1, z_t2, neg, T) + info_nce(z_s2, z_t1, neg, T)      # eq. 4
        terms = {"loss_dc": l_dc.detach()}
        loss = l_dc
        if self.cfg.depositioning:
            z_s3 = self.student.regions(v["x3"], v["s3"], valid)                 # eq. 8
            l_dp = info_nce(z_s3, z_t2, neg, T) + info_nce(z_s3, z_t1, neg, T)  # eq. 9
            terms["loss_dp"] = l_dp.detach()
            loss = loss + l_dp                                                   # eq. 10
        self.queue.enqueue(torch.cat([z_t1, z_t2]))
        return loss, terms


class SoCo(Method):
    """SoCo, C4: BYOL-style region regression between x1 and x2."""

    def __init__(self, arch: str, cfg: MethodConfig, roi_size: int = 14):
        super().__init__(arch, cfg, roi_size)
        if not cfg.pred_hidden:
            raise ValueError("soco needs a predictor: set pred_hidden > 0")
        self.predictor = MLP(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, batch_norm=True)

    def _view(self, x: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, g: torch.Generator):
        a = self.cfg.augment
        if a.cutout:
            x = apply_cutout(x, sample_cutout(boxes, valid, a, g))
        if a.box_jitter:
            boxes = apply_box_jitter(boxes, sample_box_jitter(boxes, valid, a, g), x.shape[-2], x.shape[-1])
        return x, boxes

    def forward(self, batch: dict, g: torch.Generator, progress: float) -> tuple[torch.Tensor, dict]:
        valid = batch["valid"]
        x1, b1 = self._view(batch["x1"], batch["boxes1"], valid, g)
        x2, b2 = self._view(batch["x2"], batch["boxes2"], valid, g)
        p1 = self.predictor(self.student.regions(x1, b1, valid))
        p2 = self.predictor(self.student.regions(x2, b2, valid))
        with torch.no_grad():
            self._momentum_update_teacher(progress)
            z1 = self.teacher.regions(x1, b1, valid)
            z2 = self.teacher.regions(x2, b2, valid)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        return loss, {"loss_byol": loss.detach()}


class MoCoV2(Method):
    """Image-level MoCo v2 on x1 and x2, symmetric."""

    def __init__(self, arch: str, cfg: MethodConfig, roi_size: int = 14):
        super().__init__(arch, cfg, roi_size)
        self.queue = Queue(cfg.queue_size, cfg.proj_dim)

    def forward(self, batch: dict, g: torch.Generator, progress: float) -> tuple[torch.Tensor, dict]:
        q1, q2 = self.student.images(batch["x1"]), self.student.images(batch["x2"])
        with torch.no_grad():
            self._momentum_update_teacher(progress)
            k1, k2 = self.teacher.images(batch["x1"]), self.teacher.images(batch["x2"])
        neg, T = self.queue.negatives(), self.cfg.temperature
        loss = info_nce(q1, k2, neg, T) + info_nce(q2, k1, neg, T)
        self.queue.enqueue(torch.cat([k1, k2]))
        return loss, {"loss_nce": loss.detach()}


METHODS: dict[str, type[Method]] = {"d3ssl": D3SSL, "d3ssl_dc": D3SSL, "soco": SoCo, "mocov2": MoCoV2}


def build(name: str, arch: str, cfg: MethodConfig | None = None, roi_size: int = 14) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(METHODS)}")
    return METHODS[name](arch, cfg if cfg is not None else DEFAULTS[name], roi_size)
