"""Detection fine-tuning of a backbone, one job per module (as torchvision's detection references):

- `eval.detection.schedule`: the recipes (`Schedule`, `PRESETS`), the `detect` params section
  (`DetectConfig`) and the learning-rate curve;
- `eval.detection.model`: Faster / Mask R-CNN on a ResNet, C4 structure, and stage freezing;
- `eval.detection.data`: the COCO-format data set (through `pipeline.readers`), the batch
  sampler and the collate function;
- `eval.detection.engine`: the training loop, PreciseBN and prediction;
- `eval.detection.coco_eval`: COCOeval AP, gathered over processes.

`python -m eval.detect` is the stage that puts them together.
"""
