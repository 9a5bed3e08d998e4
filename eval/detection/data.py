"""COCO-format detection data: the data set (read through `pipeline.readers`, the box rule every
COCO consumer shares), the endless seeded batch sampler and the collate function."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from eval.backbone import load_rgb
from pipeline.readers import coco_tables, load_coco
from train import dist

log = logging.getLogger(__name__)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection set: item i -> (3xHxW float image in [0, 1], target dict).

    Targets: `boxes` (x1y1x2y2 pixels), `labels` (1..K, contiguous over `category_ids`), `masks`
    (NxHxW uint8, with_masks only), `image_id`.

    Which boxes are targets: the annotations `pipeline.readers.coco_tables` keeps (4 finite
    numbers, positive width and height, at most 1 px outside the image, a listed category; kept
    boxes clipped to the image, and a box the clipping empties is left out; however small a box
    is, it is kept, as in torchvision's detection references), less the crowd annotations
    (`iscrowd=1`: not trained on, as in detectron2; COCOeval ignores them). With `train`, images
    without a target are dropped and images are flipped at random. Evaluation (`coco_eval`) uses
    the annotation file as it is, `self.coco`. Every listed image must have its file.
    """

    def __init__(self, annotations: Path, images_dir: Path, *, train: bool, with_masks: bool,
                 category_ids: list[int] | None = None):
        annotations, images_dir = Path(annotations), Path(images_dir)
        if not images_dir.is_dir():
            raise FileNotFoundError(f"image folder {images_dir} does not exist; pass the folder of the file_names")
        self.coco = load_coco(annotations)
        self.images_dir, self.train, self.with_masks = images_dir, train, with_masks
        self.category_ids = sorted(self.coco.getCatIds()) if category_ids is None else list(category_ids)
        unknown = sorted(set(self.coco.getCatIds()) - set(self.category_ids))
        if unknown:
            raise ValueError(f"{annotations}: categories {unknown[:10]} are not among the training categories")
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self.paths, self.targets = self._read(annotations, images_dir)
        ids = sorted(self.paths)
        if train:
            ids = [i for i in ids if i in self.targets]
            if not ids:
                raise ValueError(f"{annotations}: no image with a non-crowd box to train on")
        self.ids = ids

    def _read(self, annotations: Path, images_dir: Path) -> tuple[dict, dict]:
        """({image id: file}, {image id: (boxes Nx4 float32, labels N int64, annotation rows N)})
        of the non-crowd boxes; an image without a file is an error."""
        tables = coco_tables(self.coco, annotations, images_dir)
        res = tables.result
        missing = res.rejects.filter(pc.equal(res.rejects.column("source_file"), f"{annotations}:images"))
        if missing.num_rows:
            first = self.coco.imgs[int(missing.column("image_id")[0].as_py())]["file_name"]
            raise FileNotFoundError(f"{annotations}: {missing.num_rows} listed image(s) have no file in "
                                    f"{images_dir}, e.g. {images_dir / first}; pass the folder of the file_names")
        skipped = {k: v for k, v in res.reject_counts().items() if v}
        if skipped:
            log.warning("%s: %d annotation(s) left out by the box rule: %s", annotations, sum(skipped.values()), skipped)
        image_of = dict(zip(res.images.column("key").to_pylist(), (int(i) for i in res.images.column("image_id").to_pylist())))
        paths = dict(zip(image_of.values(), (Path(p) for p in res.images.column("path").to_pylist())))
        boxes = res.boxes
        use = ~boxes.column("is_group").to_numpy(zero_copy_only=False)
        image = np.array([image_of[k] for k in boxes.column("key").to_pylist()], np.int64)[use]
        xyxy = np.stack([boxes.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)[use]
        labels = np.array([self.label_of[c] for c in boxes.column("category_id").to_pylist()], np.int64)[use]
        rows = tables.annotation_rows[use]
        order = np.argsort(image, kind="stable")                       # annotation order within an image
        starts = np.flatnonzero(np.r_[True, image[order][1:] != image[order][:-1]]) if len(order) else []
        targets = {}
        for s, e in zip(starts, [*starts[1:], len(order)]):
            j = order[s:e]
            targets[int(image[j[0]])] = (xyxy[j], labels[j], rows[j])
        return paths, targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image_id = self.ids[i]
        image = load_rgb(self.paths[image_id])
        h, w = image.shape[:2]
        xyxy, labels, rows = self.targets.get(image_id, (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), []))
        boxes = torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "image_id": int(image_id)}
        if self.with_masks:
            anns = self.coco.dataset["annotations"]
            target["masks"] = torch.from_numpy(np.stack([self.coco.annToMask(anns[r]) for r in rows])
                                               if len(rows) else np.zeros((0, h, w), np.uint8))
        # a new float array: the decoded image may be read-only, which torch.from_numpy warns about
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)) / 255.0
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return x, target


class InfiniteBatches(torch.utils.data.Sampler):
    """Endless batches of dataset indices for this process: a seeded permutation per epoch,
    rank r of n taking every n-th index (the global batch is split over the processes)."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()[self.rank::self.world]
            for j in range(0, len(perm) - self.batch + 1, self.batch):
                yield perm[j:j + self.batch]
            epoch += 1


def collate(items):
    """A batch as (images, targets): lists, since the images differ in size."""
    return tuple(zip(*items))


def train_batches(dataset, ims_per_batch: int, seed: int, workers: int) -> Iterator:
    """Endless (images, targets) batches of this process's share of the global batch."""
    rank, world = dist.rank(), dist.world_size()
    if ims_per_batch % world:
        raise ValueError(f"ims_per_batch {ims_per_batch} is not divisible by {world} processes")
    sampler = InfiniteBatches(len(dataset), ims_per_batch // world, seed, rank, world)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                            num_workers=workers))
