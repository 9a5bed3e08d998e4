"""Evaluation of a pre-trained backbone (a torchvision ResNet state_dict, or 'random').

- `eval.backbone`: loading (strict, `fc.*` ignored), the C2..C5 maps, RoIAlign region features.
- `eval.oknn`: object-level kNN and disturbed O-KNN (section 5.3, Table 4).
- `eval.probes`, `eval.plot_probes`: coupling rate and mean cosine similarity per layer
  (sections 3.1 and 3.2, Figures 3 and 4, Table 7).
- `eval.detect`: Faster / Mask R-CNN R-C4 fine-tuning with COCO evaluation (section 5.2,
  Tables 1 and 3); `eval.voc`: PASCAL VOC XML to COCO format for the VOC07+12 protocol.
- `eval.curve`, `eval.trainlog`: the O-KNN learning curve and the training-loss log of each run.
- `eval.report`: the tables, orderings and run-health checks (`eval.report_checks`) and the
  figures (`eval.report_plots`) of every model over its seeds.
"""
