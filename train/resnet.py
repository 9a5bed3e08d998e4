"""The ResNet every stage shares: the architectures, the input normalisation, the stage split and
the region features. Pre-training (`train.model`), the evaluations (`eval.backbone`,
`eval.detection`) and the benchmarks import these; nothing here is defined twice.

- `ARCHS`: the torchvision ResNets a backbone may be, built with `weights=None` (never a download).
- `IMAGENET_MEAN` / `IMAGENET_STD` and the stage split (`STEM`, `STAGES`, `LAYERS`, `STRIDES`,
  `C4_TRUNK`): defined in `train.resnet_layout` (no torch import) and re-exported here.
  `c4_trunk` is stem..res4 as one flat `nn.Sequential` (the C4 structure of SoCo, D3SSL and the
  C4 detector); `C4_TRUNK` names its children, in order, as torchvision's ResNet does.
- Region features: `align` is RoIAlign of boxes on a feature map (aligned=True, adaptive sampling:
  detectron2's ROIAlignV2), in float32 whatever the autocast (bf16 would round coordinates of
  128-256 to 1 px and an image index past 256), cast back to the map's dtype. `region_features`
  follows it with an optional head (res5 for the C4 structure) and average pooling over the grid.

    net = make_resnet("resnet50")
    c4 = c4_trunk(net)(x)                                            # B x 1024 x H/16 x W/16
    z = region_features(c4, boxes, STRIDES["C4"], 14, head=net.layer4)   # N x 2048
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torchvision
from torchvision.ops import roi_align

# the names (torch-free, one definition), re-exported: every consumer of the network imports them from here
from train.resnet_layout import C4_TRUNK, IMAGENET_MEAN, IMAGENET_STD, LAYERS, STAGES, STEM, STRIDES  # noqa: F401

ARCHS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}



def make_resnet(arch: str) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet of `arch` (from torch's global generator)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
    return ARCHS[arch](weights=None)


def torchvision_backbone(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The `train.model.RegionEncoder` backbone in `state` (keys `{prefix}c4.I.*`, `{prefix}res5.*`; other keys
    are left out) under torchvision ResNet names (`C4_TRUNK[I].*`, `layer4.*`), in `state`'s order."""
    out = {}
    for k, v in state.items():
        if k.startswith(prefix + "c4."):
            idx, rest = k[len(prefix + "c4."):].split(".", 1)
            out[f"{C4_TRUNK[int(idx)]}.{rest}"] = v
        elif k.startswith(prefix + "res5."):
            out["layer4." + k[len(prefix + "res5."):]] = v
    return out


def seeded_resnet(arch: str, seed: int) -> nn.Module:
    """`make_resnet(arch)` initialised from torch's generator seeded with `seed`; the global
    generator is left as it was. The `random` backbone of the exports and of the evaluations."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_resnet(arch)


def stem(net: torchvision.models.ResNet) -> nn.Sequential:
    """conv1, bn1, relu, maxpool of `net` (the modules themselves, not copies): image -> stride 4."""
    return nn.Sequential(*(getattr(net, name) for name in STEM))


def stages(net: torchvision.models.ResNet) -> dict[str, nn.Sequential]:
    """{"C2": net.layer1, ..., "C5": net.layer4}: the residual stages, by their map's name."""
    return {name: getattr(net, layer) for name, layer in STAGES.items()}


def c4_trunk(net: torchvision.models.ResNet) -> nn.Sequential:
    """stem..res4 of `net` as one flat Sequential (children `0`..`6` are `C4_TRUNK`): image -> C4."""
    return nn.Sequential(*(getattr(net, name) for name in C4_TRUNK))


def out_channels(block: nn.Sequential) -> int:
    """Channels out of a ResNet stage (BasicBlock or Bottleneck)."""
    last = block[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def normalize(images: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(images / scale - mean) / std over the channel axis (dim 1) of a B x 3 x H x W batch, in
    float: `scale` 255 for uint8 pixels, 1 for [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / scale - mean) / std


def align(fmap: torch.Tensor, boxes: torch.Tensor | list[torch.Tensor], stride: int,
          output_size: int) -> torch.Tensor:
    """RoIAlign of image-pixel boxes on `fmap` (B x C x h x w, `stride` pixels per cell):
    `boxes` is one N_i x 4 (x1, y1, x2, y2) tensor per image, or one K x 5 tensor (image index
    first). Runs in float32 under any autocast; returns (sum N_i) x C x output_size x output_size
    in fmap's dtype."""
    if torch.is_tensor(boxes):
        rois = boxes.to(fmap.device, torch.float32)
    else:
        rois = [b.to(fmap.device, torch.float32) for b in boxes]
    with torch.autocast(fmap.device.type, enabled=False):
        crops = roi_align(fmap.float(), rois, output_size=output_size, spatial_scale=1.0 / stride,
                          sampling_ratio=0, aligned=True)
    return crops.to(fmap.dtype)


def region_features(fmap: torch.Tensor, boxes: torch.Tensor | list[torch.Tensor], stride: int,
                    output_size: int, head: nn.Module | None = None) -> torch.Tensor:
    """One vector per box: `align`, then `head` (e.g. res5 on C4 crops), then the mean over the
    grid -> N x C.

    Without a head, when a box's sides are multiples of output_size * stride pixels and start on
    the stride grid, every sample point falls on a cell centre, so this is exactly the mean of the
    cells the box covers."""
    crops = align(fmap, boxes, stride, output_size)
    if head is not None:
        crops = head(crops)
    return crops.mean(dim=(2, 3))
