"""The region encoder of D3SSL (paper eq. 1) on a torchvision ResNet, C4 structure.

    z = f(x, b) = projector(avgpool(res5(RoIAlign(res4(...stem(x)), b))))

- backbone: a torchvision ResNet (`weights=None`: never a download), stem to res4 (C4, stride 16);
- RoIAlign on C4: 14x14 output, aligned=True, spatial scale 1/16 (the MoCo/SoCo C4 setting);
- head: res5 (stride 2: 14x14 -> 7x7) and global average pooling, one vector per region
  (`train.resnet.region_features`, the same function the evaluations use);
- projector: an MLP. For the InfoNCE methods (d3ssl, mocov2) MoCo v2's: Linear-ReLU-Linear,
  hidden = the C5 width, 128 out; with `proj_bn` a BN after the hidden layer (Linear-BN-ReLU-
  Linear, as MoCo v3 and SimCLR; MoCo v2 has none). params.yaml sets `proj_bn: true` for every
  queue method: without it the short embedded runs collapsed (reports/experiments/README.md); a
  run that wants MoCo v2's head exactly sets it false. For the BYOL-style soco, SoCo's:
  Linear-BN-ReLU-Linear, 4096 hidden, 256 out (and a predictor of the same shape). The paper says
  "an MLP projector" only.

Batch norm: every BN layer is a `SplitBatchNorm*` (a subclass with the same parameters and
buffers, so the state_dict is torchvision's). Given `groups` > 1, a forward normalises contiguous
groups of its batch separately (MoCo's SplitBatchNorm, its single-GPU stand-in for per-GPU BN):
the image batch in `groups` chunks, the regions by the chunk their image is in. This is what
shuffle-BN (train.methods) needs on one process.

Convolutions: every one is a `GemmGradConv2d` (train.conv_grad; an nn.Conv2d with the same
state), whose backward on the CPU is two matrix products where the output map is tiny (res5 on
4x4 RoIAlign regions, 2x2 out): oneDNN's weight gradient is slow there.

RoI coordinates stay float32 under autocast (`train.resnet.align`): RoIAlign runs in float32 and
its output is cast to the feature dtype.

ResNet-50 for real runs; the embedded CPU default uses a smaller ResNet through the same code
(`arch`). `backbone_state_dict()` returns the weights as a plain torchvision ResNet state_dict.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.conv_grad import use_gemm_grad_conv
from train.resnet import STRIDES, c4_trunk, make_resnet, out_channels, region_features, torchvision_backbone

# ------------------------------------------------------------------------------ split batch norm

_BN_SEGMENTS: ContextVar[list[int] | None] = ContextVar("bn_segments", default=None)


@contextmanager
def bn_segments(sizes: list[int] | None) -> Iterator[None]:
    """Within the block, every SplitBatchNorm in training mode normalises the batch in contiguous
    segments of these sizes, each with its own statistics (None or one segment: the whole batch)."""
    token = _BN_SEGMENTS.set(sizes)
    try:
        yield
    finally:
        _BN_SEGMENTS.reset(token)


class _SplitBatchNorm:
    """Batch norm over segments of the batch. The running statistics move by the mean over the
    segments of their means and variances, as MoCo's SplitBatchNorm (the variance between segment
    means is left out, as there). `momentum=None` is taken as 0.1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = _BN_SEGMENTS.get()
        if not self.training or not sizes or len(sizes) == 1:
            return super().forward(x)
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"batch-norm segments {sizes} do not add up to the batch {x.shape[0]}")
        if x.dim() == 4 and len(set(sizes)) == 1:
            return self._equal_groups(x, len(sizes))
        return self._segment_loop(x, sizes)

    def _segment_loop(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Any segment sizes (the regions' segments follow their images): one call per segment."""
        dims = [0] + list(range(2, x.dim()))
        if x.dim() == 2 and min(n for n in sizes if n) < 2:
            raise ValueError(f"batch-norm segments {sizes}: a segment of one row has no batch statistics; "
                             "lower pretrain.bn_splits")
        parts, means, variances = [], [], []
        for chunk in x.split(list(sizes)):
            if chunk.shape[0] == 0:
                continue
            parts.append(F.batch_norm(chunk, None, None, self.weight, self.bias, True, 0.0, self.eps))
            with torch.no_grad():
                c = chunk.detach().float()
                means.append(c.mean(dims))
                n = c.numel() // c.shape[1]
                variances.append(c.var(dims, unbiased=n > 1))
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(torch.stack(means).mean(0), alpha=m)
                self.running_var.mul_(1 - m).add_(torch.stack(variances).mean(0), alpha=m)
                self.num_batches_tracked.add_(1)
        return torch.cat(parts)


    def _equal_groups(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """The same for `groups` segments of equal size, in one fused batch-norm call: the groups
        are moved into the channel axis ((G*n, C, H, W) -> (n, G*C, H, W)), so each (group,
        channel) pair gets its own statistics; the step time against a loop over the groups is in
        `benchmarks/results/step_costs.json` (`python -m benchmarks.bench_step_costs`)."""
        n, (c, h, w) = x.shape[0] // groups, x.shape[1:]
        xg = x.view(groups, n, c, h, w).transpose(0, 1).reshape(n, groups * c, h, w)
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        track = self.track_running_stats and self.running_mean is not None
        # momentum 1: the scratch buffers end as the batch statistics (the variance unbiased)
        mean = torch.zeros(groups * c, device=x.device, dtype=torch.float32) if track else None
        var = torch.ones(groups * c, device=x.device, dtype=torch.float32) if track else None
        y = F.batch_norm(xg, mean, var, weight, bias, True, 1.0, self.eps)
        if track:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.view(groups, c).mean(0).to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(var.view(groups, c).mean(0).to(self.running_var.dtype), alpha=m)
                self.num_batches_tracked.add_(1)
        y = y.view(n, groups, c, h, w).transpose(0, 1).reshape(groups * n, c, h, w)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)      # keep CUDA's channels_last layout
        return y


class SplitBatchNorm2d(_SplitBatchNorm, nn.BatchNorm2d):
    pass


class SplitBatchNorm1d(_SplitBatchNorm, nn.BatchNorm1d):
    pass


def use_split_batch_norm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d/2d of `module` for its split version in place (same state)."""
    for name, child in module.named_children():
        kind = {nn.BatchNorm2d: SplitBatchNorm2d, nn.BatchNorm1d: SplitBatchNorm1d}.get(type(child))
        if kind is not None:
            new = kind(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            use_split_batch_norm(child)
    return module


def chunk_sizes(n: int, groups: int) -> list[int]:
    """Sizes of `groups` contiguous chunks of n items (as torch.tensor_split: the first n % groups
    chunks one larger)."""
    return [n // groups + (i < n % groups) for i in range(groups)]


def region_segments(valid: torch.Tensor, groups: int) -> list[int]:
    """Region counts per chunk of images: the regions (image-major) of each image chunk."""
    per_image = valid.sum(1)
    return [int(c.sum()) for c in per_image.split(chunk_sizes(valid.shape[0], groups))]


class MLP(nn.Module):
    """Linear -> [BN] -> ReLU -> Linear."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, batch_norm: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RegionEncoder(nn.Module):
    """Backbone to C4, RoIAlign, res5 + pooling, projector. Regions or whole images."""

    def __init__(self, arch: str = "resnet50", proj_hidden: int = 0, proj_dim: int = 128,
                 proj_bn: bool = False, roi_size: int = 14):
        super().__init__()
        net = make_resnet(arch)
        self.c4 = c4_trunk(net)
        self.res5 = net.layer4
        self.roi_size = roi_size
        width = out_channels(net.layer4)
        self.projector = MLP(width, proj_hidden or width, proj_dim, proj_bn)
        self.arch = arch
        use_split_batch_norm(self)
        use_gemm_grad_conv(self)          # same state; a faster backward on small CPU maps (train.conv_grad)

    def regions(self, images: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Projected features of the valid boxes: images (B, 3, H, W), boxes (B, K, 4) in pixels,
        valid (B, K) -> (N, D) with N = valid.sum(), in (image, box) order. `groups` > 1: batch
        norm per contiguous chunk of images (and of their regions)."""
        with bn_segments(chunk_sizes(images.shape[0], groups) if groups > 1 else None):
            c4 = self.c4(images)                                        # B x C4 x H/16 x W/16
        index = torch.arange(images.shape[0], device=images.device, dtype=torch.float32)[:, None].expand_as(valid)
        rois = torch.cat([index[valid][:, None], boxes[valid].float()], dim=1)   # N x 5, float32
        with bn_segments(region_segments(valid, groups) if groups > 1 else None):
            h = region_features(c4, rois, STRIDES["C4"], self.roi_size, head=self.res5)   # N x C5
            return self.projector(h)

    def images(self, images: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Projected global features (image-level methods): (B, 3, H, W) -> (B, D)."""
        with bn_segments(chunk_sizes(images.shape[0], groups) if groups > 1 else None):
            h = self.res5(self.c4(images)).mean(dim=(2, 3))
            return self.projector(h)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone as a torchvision ResNet state_dict (every key but `fc.*`), copies."""
        return {k: v.detach().clone() for k, v in torchvision_backbone(self.state_dict()).items()}


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy for the momentum (teacher) encoder."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def momentum_update(student: nn.Module, teacher: nn.Module, m: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter (MoCo's key encoder
    update). The teacher runs in training mode like MoCo's, so its BN uses batch statistics."""
    for ps, pt in zip(student.parameters(), teacher.parameters()):
        pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
