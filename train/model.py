"""The region encoder of D3SSL (paper eq. 1) on a torchvision ResNet, C4 structure.

    z = f(x, b) = projector(avgpool(res5(RoIAlign(res4(...stem(x)), b))))

- backbone: a torchvision ResNet (`weights=None`: never a download), stem to res4 (C4, stride 16);
- RoIAlign on C4: 14x14 output, aligned=True, spatial scale 1/16 (the MoCo/SoCo C4 setting);
- head: res5 (stride 2: 14x14 -> 7x7) and global average pooling, one vector per region;
- projector: an MLP. For the InfoNCE methods (d3ssl, mocov2) MoCo v2's: Linear-ReLU-Linear,
  hidden = the C5 width, 128 out. For the BYOL-style soco, SoCo's: Linear-BN-ReLU-Linear, 4096
  hidden, 256 out (and a predictor of the same shape). The paper says "an MLP projector" only.

ResNet-50 for real runs; the embedded CPU default uses a smaller ResNet through the same code
(`arch`). `backbone_state_dict()` returns the weights as a plain torchvision ResNet state_dict.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torchvision
from torchvision.ops import roi_align

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


def make_resnet(arch: str) -> torchvision.models.ResNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {list(ARCHS)}")
    return getattr(torchvision.models, arch)(weights=None)


def c5_channels(arch: str) -> int:
    return 512 if arch in ("resnet18", "resnet34") else 2048


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
        self.c4 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
        self.res5 = net.layer4
        self.roi_size = roi_size
        width = c5_channels(arch)
        self.projector = MLP(width, proj_hidden or width, proj_dim, proj_bn)
        self.arch = arch

    def regions(self, images: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Projected features of the valid boxes: images (B, 3, H, W), boxes (B, K, 4) in pixels,
        valid (B, K) -> (N, D) with N = valid.sum(), in (image, box) order."""
        c4 = self.c4(images)                                            # B x C4 x H/16 x W/16
        index = torch.arange(images.shape[0], device=images.device, dtype=boxes.dtype)[:, None].expand_as(valid)
        rois = torch.cat([index[valid][:, None], boxes[valid]], dim=1)  # N x 5: (image, x1, y1, x2, y2)
        r = roi_align(c4, rois.to(c4.dtype), output_size=self.roi_size, spatial_scale=1 / 16,
                      sampling_ratio=0, aligned=True)                   # N x C4 x 14 x 14
        h = self.res5(r).mean(dim=(2, 3))                              # N x C5
        return self.projector(h)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected global features (image-level methods): (B, 3, H, W) -> (B, D)."""
        h = self.res5(self.c4(images)).mean(dim=(2, 3))
        return self.projector(h)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone as a torchvision ResNet state_dict (every key but `fc.*`)."""
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
        out = {}
        for name, module in zip(names, self.c4):
            for k, v in module.state_dict().items():
                out[f"{name}.{k}"] = v.detach().clone()
        for k, v in self.res5.state_dict().items():
            out[f"layer4.{k}"] = v.detach().clone()
        return out


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
