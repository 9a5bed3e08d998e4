"""The backbone every evaluation judges, and the region features they share.

Contract: a backbone is a plain torchvision ResNet `state_dict` (what the trainer exports, e.g.
`runs/d3ssl/export/backbone.pth`), loaded with `weights_only=True` and `strict=True` except for the
classifier `fc.*` (absent from an exported backbone, and never used here). `"random"` instead of a
file gives the randomly initialised network (seeded, `weights=None`: nothing is ever downloaded),
the reference the paper plots beside the trained models.

    net = build_resnet("resnet50", "runs/d3ssl/export/backbone.pth")
    stages = ResNetStages(net).eval()           # forward(x) -> {"C2": ..., "C5": ...}
    feats = REGION_FEATURES["c5_roialign7"](stages, images, boxes)   # (n_boxes, 2048)

Layer names follow the paper (and detectron2): C2 = `layer1` (stride 4), C3 = `layer2` (8),
C4 = `layer3` (16), C5 = `layer4` (32). Images are RGB, scaled to [0, 1] and normalised with the
ImageNet mean/std (torchvision's and MoCo's detection convention).

Region features are RoIAlign (torchvision `roi_align`, `aligned=True`, adaptive sampling: the
ROIAlignV2 of detectron2) of a box on a feature map followed by average pooling over the output
grid. Two ways of reaching C5, as a registry:
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
from torchvision.ops import roi_align

from pipeline import images as image_io

ARCHS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}
LAYERS = ("C2", "C3", "C4", "C5")
STRIDES = {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
RANDOM = "random"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------ loading


def build_resnet(arch: str, backbone: str | Path, seed: int = 0) -> torchvision.models.ResNet:
    """A torchvision ResNet of `arch` with the weights of `backbone` (a state_dict file or "random").

    A file is loaded strictly: every key of the architecture except `fc.*` must be present with
    its shape, and no other key may be; a missing file, a wrapped checkpoint or a mismatch is an
    error that names it. "random" seeds torch with `seed` and builds the network with weights=None.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; valid: {sorted(ARCHS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ARCHS[arch](weights=None)
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


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; anything else as torch.device(name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ResNetStages(nn.Module):
    """The C2..C5 maps of a torchvision ResNet, each computed only when asked for.

    forward(x, layers) -> OrderedDict name -> map, x: Bx3xHxW normalised images.
    `strides` and `channels` describe the maps; any module with the same attributes and forward
    can stand in for it (the probes' tests use 1x1-convolution networks).
    """

    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.blocks = nn.ModuleDict({"C2": net.layer1, "C3": net.layer2, "C4": net.layer3, "C5": net.layer4})
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


def out_channels(block: nn.Sequential) -> int:
    """Channels out of a ResNet stage (BasicBlock or Bottleneck)."""
    last = block[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


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
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


# ------------------------------------------------------------------------------ region features


def pool_boxes(fmap: torch.Tensor, boxes: list[torch.Tensor], stride: int, output_size: int) -> torch.Tensor:
    """RoIAlign (aligned, adaptive sampling) of image-pixel `boxes` (one Nx4 x1y1x2y2 tensor per
    image of the batch) on `fmap` (BxCxhxw, `stride` pixels per cell), averaged over the
    output_size x output_size grid -> (sum N)xC.

    When a box's sides are multiples of output_size * stride pixels and start on the stride grid,
    every sample point falls on a cell centre, so this is exactly the mean of the cells the box
    covers (the probes rely on this)."""
    boxes = [b.to(fmap.device, fmap.dtype) for b in boxes]
    r = roi_align(fmap, boxes, output_size=output_size, spatial_scale=1.0 / stride,
                  sampling_ratio=0, aligned=True)
    return r.mean(dim=(2, 3))


def c5_roialign7(stages: nn.Module, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    c5 = stages(images, ("C5",))["C5"]                       # B x C x H/32 x W/32
    return pool_boxes(c5, boxes, stages.strides["C5"], 7)   # N x C


def c4_roialign14_res5(stages: ResNetStages, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    c4 = stages(images, ("C4",))["C4"]                       # B x C4 x H/16 x W/16
    boxes = [b.to(c4.device, c4.dtype) for b in boxes]
    crops = roi_align(c4, boxes, output_size=14, spatial_scale=1.0 / stages.strides["C4"],
                      sampling_ratio=0, aligned=True)          # N x C4 x 14 x 14
    return stages.blocks["C5"](crops).mean(dim=(2, 3))       # N x C5 (res5 halves to 7x7)


REGION_FEATURES: dict[str, Callable[..., torch.Tensor]] = {
    "c5_roialign7": c5_roialign7,
    "c4_roialign14_res5": c4_roialign14_res5,
}


def region_feature(name: str) -> Callable[..., torch.Tensor]:
    if name not in REGION_FEATURES:
        raise ValueError(f"unknown region feature {name!r}; valid: {sorted(REGION_FEATURES)}")
    return REGION_FEATURES[name]
