"""Small networks with ResNetStages' interface (forward(x, layers) -> {name: map}, `strides`,
`channels`) for the evaluation tests."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from eval.backbone import LAYERS, STRIDES


class Stages(nn.Module):
    """C2..C5: four blocks applied in turn, at ResNet's strides 4, 8, 16, 32."""

    def __init__(self, blocks: list[nn.Module], channels: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.strides = dict(STRIDES)
        self.channels = dict(zip(LAYERS, channels))

    def forward(self, x, layers=LAYERS):
        out = OrderedDict()
        for name, block in zip(LAYERS, self.blocks):
            x = block(x)
            if name in layers:
                out[name] = x
        return out


class ConvStages(Stages):
    """k x k convolutions with zero padding k // 2, so k = 1 is a network whose receptive field is
    one pixel (no padding at all)."""

    def __init__(self, k: int, relu: bool = True, width: int = 16, seed: int = 0):
        torch.manual_seed(seed)
        act = nn.ReLU() if relu else nn.Identity()

        def conv(stride):
            return nn.Conv2d(width, width, k, stride, k // 2)

        super().__init__([nn.Sequential(nn.Conv2d(3, width, k, 4, k // 2), act),
                          *(nn.Sequential(conv(2), act, conv(1), act) for _ in range(3))], [width] * 4)


class TinyStages(Stages):
    """A small trainable CNN: stride-2 3x3 convolutions with batch norm, widths w, 2w, 4w, 4w."""

    def __init__(self, width: int = 16, seed: int = 0):
        torch.manual_seed(seed)

        def conv(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        w = [width, 2 * width, 4 * width, 4 * width]
        super().__init__([nn.Sequential(conv(3, w[0]), conv(w[0], w[0])), conv(w[0], w[1]), conv(w[1], w[2]),
                          conv(w[2], w[3])], w)
