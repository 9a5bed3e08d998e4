"""Faster R-CNN / Mask R-CNN on a torchvision ResNet, C4 structure (MoCo's detectron2
Base-RCNN-C4-BN rebuilt on torchvision), and detectron2's stage freezing.

- Backbone: stem..res4 (`train.resnet.c4_trunk`: C4, stride 16), every layer fine-tuned unless
  `freeze_at`, RGB input with the ImageNet mean/std (`train.resnet`).
- RPN on C4: one 3x3 conv, anchors `anchor_sizes` x ratios 0.5/1/2 at stride 16.
- Box head: RoIAlign on C4 (`train.resnet.align`: aligned, adaptive sampling = detectron2's
  ROIAlignV2), res5, an extra BatchNorm after res5 (MoCo's Res5ROIHeadsExtraNorm), average
  pooling, linear classifier and class-specific box regression.
- Mask head (Mask R-CNN, `masks` in the schedule): the same res5 (shared weights, as detectron2's
  Res5ROIHeads) on the mask RoIs, a 2x deconvolution and a per-class 1x1 conv.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from eval.detection.schedule import Schedule
from train.resnet import IMAGENET_MEAN, IMAGENET_STD, STRIDES, align, c4_trunk, out_channels, stages


class C4RoIAlign(MultiScaleRoIAlign):
    """RoIAlign of proposals on the C4 map, aligned, adaptive sampling (detectron2's ROIAlignV2;
    torchvision's MultiScaleRoIAlign, whose interface and type this keeps, is not aligned).
    Returns R x C x size x size."""

    def __init__(self, output_size: int = 14, stride: int = STRIDES["C4"]):
        super().__init__(["0"], output_size, sampling_ratio=0)
        self.size, self.stride = output_size, stride

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes) -> torch.Tensor:
        return align(x["0"], boxes, self.stride, self.size)


def build_detector(resnet: nn.Module, num_classes: int, schedule: Schedule) -> FasterRCNN:
    """Faster R-CNN (or Mask R-CNN with schedule.masks) on a torchvision ResNet, C4 structure.

    num_classes excludes the background."""
    freeze_stages(resnet, schedule.freeze_at)
    body = c4_trunk(resnet)                                                  # image -> C4, stride 16
    c4 = out_channels(resnet.layer3)
    c5 = out_channels(resnet.layer4)
    body.out_channels = c4
    res5 = nn.Sequential(resnet.layer4, nn.BatchNorm2d(c5))                  # R x C4 x 14 x 14 -> R x C5 x 7 x 7
    box_head = nn.Sequential(res5, nn.AdaptiveAvgPool2d(1), nn.Flatten())   # -> R x C5
    anchors = AnchorGenerator((tuple(schedule.anchor_sizes),), ((0.5, 1.0, 2.0),))
    kwargs = dict(
        min_size=tuple(schedule.min_size_train), max_size=schedule.max_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors, rpn_head=RPNHead(c4, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=schedule.rpn_pre_nms_train, rpn_post_nms_top_n_train=schedule.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=schedule.rpn_pre_nms_test, rpn_post_nms_top_n_test=schedule.rpn_post_nms_test,
        box_roi_pool=C4RoIAlign(schedule.pooler_resolution), box_head=box_head,
        box_predictor=FastRCNNPredictor(c5, num_classes + 1),
        box_batch_size_per_image=schedule.roi_per_image, box_detections_per_img=schedule.detections_per_image,
    )
    if schedule.masks:
        return MaskRCNN(body, mask_roi_pool=C4RoIAlign(schedule.pooler_resolution), mask_head=res5,
                        mask_predictor=MaskRCNNPredictor(c5, 256, num_classes + 1), **kwargs)
    return FasterRCNN(body, **kwargs)


def freeze_stages(resnet: nn.Module, freeze_at: int) -> None:
    """Freeze the first `freeze_at` stages (stem, res2, ...): no gradient, and their BatchNorm
    replaced by FrozenBatchNorm2d with the same statistics (detectron2 FREEZE_AT)."""
    frozen = [nn.ModuleList([resnet.conv1, resnet.bn1]), *stages(resnet).values()][:freeze_at]
    for stage in frozen:
        for p in stage.parameters():
            p.requires_grad_(False)
    if freeze_at >= 1:
        resnet.bn1 = _frozen(resnet.bn1)
    for stage in frozen[1:]:
        for block in stage:
            for name, child in list(block.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    setattr(block, name, _frozen(child))
            if block.downsample is not None:
                block.downsample[1] = _frozen(block.downsample[1])


def _frozen(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    f = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    f.load_state_dict(bn.state_dict())
    return f
