"""The backbone every evaluation judges, and the region features they share.

Contract: a backbone is a plain torchvision ResNet `state_dict` (what the trainer exports, e.g.
`runs/d3ssl/export/backbone.pth`), loaded with `weights_only=True` and `strict=True` except for the
classifier `fc.*` (absent from an exported backbone, and never used here). `"random"` instead of a
file gives the randomly initialised network (seeded, `weights=None`: nothing is ever downloaded),
the reference the paper plots beside the trained models.

    net = build_resnet("resnet50", "runs/d3ssl/export/backbone.pth")
    stages = ResNetStages(net).eval()           # forward(x) -> {"C2": ..., "C5": ...}
    feats = REGION_FEATURES["c5_roialign7"](stages, images, boxes)   # (n_boxes, 2048)

The architectures, the stage split (C2 = `layer1` at stride 4 ... C5 = `layer4` at 32, the paper's
and detectron2's names), the ImageNet mean/std and the region features are pre-training's own,
from `train.resnet`: an evaluation sees the network exactly as training built it.

Region features are RoIAlign (torchvision `roi_align`, `aligned=True`, adaptive sampling: the
ROIAlignV2 of detectron2) of a box on a feature map followed by average pooling over the output
grid (`train.resnet.region_features`). Two ways of reaching C5, as a registry:
- `c5_roialign7`: RoIAlign 7x7 on the C5 map (stride 32), then average pooling. The paper's
  O-KNN wording ("object-level features from the C5 block ... RoI Align with a size of 7x7 and
  average pooling"); it treats every backbone alike, whatever head it was trained with.
- `c4_roialign14_res5`: RoIAlign 14x14 on the C4 map (stride 16), res5 on the 14x14 crops
  (7x7 out), average pooling: the region head of SoCo/D3SSL pre-training and of the C4 detector.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from pipeline import images as image_io
from train.resnet import seeded_resnet
from train.resnet import (  # ARCHS, LAYERS, STRIDES: the evaluations take them from here
    ARCHS, LAYERS, STRIDES, normalize, out_channels, region_features, stages as resnet_stages, stem,
)

RANDOM = "random"


# ------------------------------------------------------------------------------ loading


def build_resnet(arch: str, backbone: str | Path, seed: int = 0) -> torchvision.models.ResNet:
    """A torchvision ResNet of `arch` with the weights of `backbone` (a state_dict file or "random").

    A file is loaded strictly: every key of the architecture except `fc.*` must be present with
    its shape, and no other key may be; a missing file, a wrapped checkpoint or a mismatch is an
    error that names it. "random" seeds torch with `seed` and builds the network with weights=None.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; valid: {sorted(ARCHS)}")
    net = seeded_resnet(arch, seed)
    if str(backbone) == RANDOM:
        return net
    path = Path(backbone)
    if not path.is_file():
        raise FileNotFoundError(f"backbone {path} does not exist; pass a ResNet state_dict file or 'random'")
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_backbone_state(net, state, str(path))
    return net


def load_backbone_state(net: nn.Module, state: dict, where: str = "state_dict") -> None:
    """Load `state` into `net` with strict=True semantics, ignoring the classifier `fc.*`."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{where}: expected a plain ResNet state_dict (name -> tensor), got {keys}; "
            "export the backbone with the trainer's export step"
        )
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"{where}: does not match the architecture: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''} (is --arch right? a 'module.' or 'encoder.' "
            "prefix must be stripped at export)"
        )


class ResNetStages(nn.Module):
    """The C2..C5 maps of a torchvision ResNet, each computed only when asked for.

    forward(x, layers) -> OrderedDict name -> map, x: Bx3xHxW normalised images.
    `strides` and `channels` describe the maps; any module with the same attributes and forward
    can stand in for it (the probes' tests use 1x1-convolution networks).
    """

    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        self.stem = stem(net)
        self.blocks = nn.ModuleDict(resnet_stages(net))
        self.strides = dict(STRIDES)
        self.channels = {name: out_channels(block) for name, block in self.blocks.items()}

    def forward(self, x: torch.Tensor, layers: tuple[str, ...] = LAYERS) -> "OrderedDict[str, torch.Tensor]":
        last = max(LAYERS.index(n) for n in layers)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        x = self.stem(x)
        for name in LAYERS[: last + 1]:
            x = self.blocks[name](x)
            if name in layers:
                out[name] = x
        return out


# ------------------------------------------------------------------------------ images


def load_rgb(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB, decoded as every stage decodes (`pipeline.images`)."""
    return image_io.decode(path)[0]


def resize_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the shorter side at `min_size` and the longer at most `max_size`
    (detectron2's ResizeShortestEdge, torchvision's GeneralizedRCNNTransform)."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(round(height * scale)), int(round(width * scale))


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.array(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW uint8 (any device) -> float, ImageNet-normalised."""
    return normalize(images, 255.0)


# ------------------------------------------------------------------------------ region features


def pool_boxes(fmap: torch.Tensor, boxes: list[torch.Tensor], stride: int, output_size: int) -> torch.Tensor:
    """RoIAlign of image-pixel `boxes` (one Nx4 x1y1x2y2 tensor per image of the batch) on `fmap`
    (BxCxhxw, `stride` pixels per cell), averaged over the output_size x output_size grid ->
    (sum N)xC: `train.resnet.region_features` without a head.

    When a box's sides are multiples of output_size * stride pixels and start on the stride grid,
    every sample point falls on a cell centre, so this is exactly the mean of the cells the box
    covers (the probes rely on this)."""
    return region_features(fmap, boxes, stride, output_size)


def c5_roialign7(stages: nn.Module, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    c5 = stages(images, ("C5",))["C5"]                       # B x C x H/32 x W/32
    return pool_boxes(c5, boxes, stages.strides["C5"], 7)   # N x C


def c4_roialign14_res5(stages: ResNetStages, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """RoIAlign 14x14 on C4, res5 on the crops (7x7 out), average pooling: the region head of
    pre-training (`train.model.RegionEncoder`), through the same function."""
    c4 = stages(images, ("C4",))["C4"]                       # B x C4 x H/16 x W/16
    return region_features(c4, boxes, stages.strides["C4"], 14, head=stages.blocks["C5"])   # N x C5


REGION_FEATURES: dict[str, Callable[..., torch.Tensor]] = {
    "c5_roialign7": c5_roialign7,
    "c4_roialign14_res5": c4_roialign14_res5,
}


def region_feature(name: str) -> Callable[..., torch.Tensor]:
    if name not in REGION_FEATURES:
        raise ValueError(f"unknown region feature {name!r}; valid: {sorted(REGION_FEATURES)}")
    return REGION_FEATURES[name]
