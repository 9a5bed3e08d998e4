"""The names of the ResNet's parts, with no torch import: what a consumer that only labels tables
and plots (the report) needs, and what `train.resnet` builds the network by.

- The stage split (detectron2's names): the stem `STEM`, then C2 = `layer1` (stride 4), C3 =
  `layer2` (8), C4 = `layer3` (16), C5 = `layer4` (32); `LAYERS` in order, `STRIDES` per layer.
- `C4_TRUNK`: the children of stem..res4, in order, as torchvision's ResNet names them.
- `IMAGENET_MEAN` / `IMAGENET_STD`: RGB in [0, 1] is normalised with these (torchvision's and
  MoCo's convention), in training and in every evaluation.
"""
from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

STEM = ("conv1", "bn1", "relu", "maxpool")
STAGES = {"C2": "layer1", "C3": "layer2", "C4": "layer3", "C5": "layer4"}
LAYERS = tuple(STAGES)
STRIDES = {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
C4_TRUNK = STEM + ("layer1", "layer2", "layer3")
