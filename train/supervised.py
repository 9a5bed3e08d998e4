"""The supervised ceiling: the pre-training backbone trained with labels on the pre-training images.

    python -m train.supervised --params params.yaml --images data/openimage_mini/images.parquet \
        --boxes data/openimage_mini/boxes.parquet --seed 0 --out runs/supervised/seed0/export

Where the self-supervised methods sit between the random network (the floor) and this model (a
ceiling for the same backbone, images and budget) is what the report shows. Same architecture
(`pretrain.arch`), same region head as pre-training (RoIAlign on C4, `pretrain.roi_size`, res5,
average pooling), same view size and colour augmentation as x1 (`loader.views`), the same number
of optimiser steps as one pre-training run (`pretrain.epochs` x the run's steps per epoch, or
`pretrain.max_steps`), the same optimiser and learning-rate schedule. The head is a linear
classifier over the COCO categories of the ground-truth boxes (`category_id` >= 0: the classes the
evaluations score; group boxes are skipped) on the whole image resized to the view size with a
random horizontal flip. Writes the backbone as the trainer's export does (`backbone.pth`,
`backbone_detectron2.pkl`, `export.json`), so every evaluation takes it like the others.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import cli, contracts
from pipeline import images as image_io
from pipeline.params import override
from train.methods import MEAN, STD
from train.model import RegionEncoder
from train.optim import learning_rate, make_optimizer
from train.pretrain import PretrainConfig, load_config
from train.views import colour_augment

log = logging.getLogger(__name__)
MAX_BOXES = 8          # labelled boxes per image and step (a random subset when there are more)


def load_labelled(images: Path, boxes: Path, size: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(uint8 N x size x size x 3 images, per image boxes in view pixels, per image class index,
    the COCO category id of each class index): images with at least one labelled box."""
    from PIL import Image

    im = contracts.read_table(images, contracts.IMAGES).to_pylist()
    b = contracts.read_table(boxes, contracts.BOXES).to_pandas()
    b = b[(b.category_id >= 0) & ~b.is_group]
    classes = np.unique(b.category_id.to_numpy())
    by_key = {k: g for k, g in b.groupby("key")}
    xs, bs, ys = [], [], []
    for row in im:
        g = by_key.get(row["key"])
        if g is None:
            continue
        try:
            rgb, _ = image_io.decode(row["path"], row["width"], row["height"])
        except image_io.ImageFailure as e:
            raise ValueError(f"{images}: row key {row['key']!r}, {row['path']}: {e}; rebuild the images table "
                             "from the files (its width and height scale the boxes)") from None
        xs.append(np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR)))
        scale = np.array([size / row["width"], size / row["height"]] * 2, np.float32)
        bs.append(g[["x1", "y1", "x2", "y2"]].to_numpy(np.float32) * scale)
        ys.append(np.searchsorted(classes, g.category_id.to_numpy()))
    if not xs:
        raise ValueError(f"{boxes}: no box with a COCO category (category_id >= 0) on the images of {images}")
    return np.stack(xs), bs, ys, classes


def batch(rng: np.random.Generator, xs, bs, ys, size: int, n: int, cfg: PretrainConfig):
    """A random batch: images (normalised), boxes (n, MAX_BOXES, 4), valid, labels (sum valid)."""
    idx = rng.integers(0, len(xs), n)
    images, boxes = np.zeros((n, size, size, 3), np.uint8), np.zeros((n, MAX_BOXES, 4), np.float32)
    valid, labels = np.zeros((n, MAX_BOXES), bool), []
    for j, i in enumerate(idx):
        x, b, y = xs[i], bs[i].copy(), ys[i]
        if rng.random() < 0.5:
            x = x[:, ::-1]
            b[:, [0, 2]] = size - b[:, [2, 0]]
        images[j] = colour_augment(np.ascontiguousarray(x), rng, cfg.loader.views.colour1)
        pick = rng.permutation(len(b))[:MAX_BOXES]
        boxes[j, :len(pick)], valid[j, :len(pick)] = b[pick], True
        labels.append(y[pick])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.from_numpy(boxes), torch.from_numpy(valid), torch.from_numpy(np.concatenate(labels)).long()


def steps_of(cfg: PretrainConfig, total_samples: int) -> int:
    """The optimiser steps of one pre-training run on `total_samples` images (one process)."""
    per_epoch = math.ceil((cfg.loader.epoch_samples or total_samples) / cfg.loader.batch_size)
    return min(cfg.max_steps, cfg.epochs * per_epoch) if cfg.max_steps else cfg.epochs * per_epoch


def train_supervised(images: Path, boxes: Path, cfg: PretrainConfig, pretrain_samples: int | None = None) -> RegionEncoder:
    size = cfg.loader.views.size
    xs, bs, ys, classes = load_labelled(images, boxes, size)
    steps = steps_of(cfg, pretrain_samples or len(xs))
    torch.manual_seed(cfg.seed)
    net = RegionEncoder(cfg.arch, proj_hidden=0, proj_dim=len(classes), roi_size=cfg.roi_size)
    n = cfg.loader.batch_size
    peak = cfg.base_lr * n / 256
    opt = make_optimizer([p for p in net.parameters()], cfg.optimizer, peak, cfg.weight_decay, cfg.sgd_momentum)
    warmup = int(round(cfg.warmup_epochs * steps / max(cfg.epochs, 1)))
    rng = np.random.default_rng(cfg.seed)
    log.info("supervised %s: %d images, %d classes, %d steps", cfg.arch, len(xs), len(classes), steps)
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, warmup, peak)
        x, b, v, y = batch(rng, xs, bs, ys, size, n, cfg)
        loss = F.cross_entropy(net.regions(x, b, v), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log.info("step %d/%d: loss %.3f", step + 1, steps, loss.item())
    return net


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m train.supervised", __doc__)
    p.add_argument("--images", required=True, type=Path, help="pre-training images table (images.parquet)")
    p.add_argument("--boxes", required=True, type=Path, help="their boxes table (boxes.parquet)")
    p.add_argument("--out", required=True, type=Path, help="export folder (backbone.pth, ...)")
    p.add_argument("--params", type=Path, help="params.yaml (sections pretrain and loader)")
    p.add_argument("--seed", type=int, help="overrides pretrain.seed")
    p.add_argument("--pretrain-samples", type=int,
                   help="images per pre-training epoch (the shards' total; default: the labelled images)")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    cfg = override(load_config(args.params), seed=args.seed)
    net = train_supervised(args.images, args.boxes, cfg, args.pretrain_samples)
    from train.export import write_export

    info = write_export(net.backbone_state_dict(), args.out, {"method": "supervised", "arch": cfg.arch, "step": None})
    log.info("wrote %s: the supervised %s backbone (%d tensors)", args.out, cfg.arch, info["keys"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
