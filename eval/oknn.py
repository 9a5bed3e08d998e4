"""Object-level kNN (O-KNN) and disturbed O-KNN (paper section 5.3, Table 4).

    python -m eval.oknn --backbone runs/d3ssl/export/backbone.pth --arch resnet50 \
        --coco-root /datasets/coco --out reports/d3ssl/oknn.json [--params params.yaml] [--device auto]
    python -m eval.oknn --backbone random --arch resnet18 --coco-root data/synth/coco --out /tmp/oknn.json

What runs (the paper's settings, and whose setting fills each gap it leaves):
- Object features: "from the C5 block with ground-truth bounding boxes by using RoI Align with a
  size of 7x7 and average pooling" (paper). `feature: c5_roialign7` (the default, and the
  embedded params): the whole image goes through the backbone to C5 (stride 32); each box is
  RoIAlign 7x7 (aligned, adaptive sampling) on that map, averaged to one vector (2048-d for
  ResNet-50, 512-d for ResNet-18). A C5 cell sees far beyond the box, so what surrounds an object
  reaches its feature: that is what disturbed O-KNN measures. `c4_roialign14_res5` (RoIAlign
  14x14 on C4, then res5 on the crop and average pooling: the pre-training region head) is kept
  as a named alternative; its res5 sees only the box, so it hides most of the disturbance. See
  eval/backbone.py.
- Images: shorter side resized to `min_size` (longer side at most `max_size`), no padding, no crop,
  same-shape images batched. The paper does not give the input size. The embedded params use 192
  / 320: the synthetic images are 240-320 px with objects of 0.25-0.6 of the image side
  (params.yaml `synth.object_scale`), and at 192 the objects' shorter side is 1.2 / 1.7 / 2.6 C5
  cells (10th percentile / median / 90th; 1-2% under one cell), where at 128 (the earlier
  setting) it is 0.8 / 1.15 / 1.7 (33% under one cell: RoIAlign reads mostly interpolated
  neighbours). With channels-last convolutions a run at 192 costs what the former
  `c4_roialign14_res5` run at 128 did (ResNet-18 on 2 CPU cores). For real COCO (about 640x480)
  min_size 480 / max_size 800 keeps the images at their own resolution.
  The JSON records `feature`, `image_size` (the settings and the shorter sides actually fed),
  `k`, and `object_c5_cells`: percentiles of the objects' shorter side at the fed size divided by
  the C5 stride, for the bank and the queries.
- Memory bank: COCO train2017, at most `per_image` objects per image (the paper's N, value not
  given), picked to keep frequent classes from swamping the bank: round by round, one object per
  class present in the image, the globally rarest class first, objects at random within a class.
- Queries: every object of COCO val2017.
- Both sides skip crowd boxes (`iscrowd`, a group, not one object) and boxes whose shorter side is
  under `min_box_size` pixels of the original image (about a quarter of a C5 cell at the default 8:
  RoIAlign would only see interpolated context); the JSON counts what was skipped.
- Vote: the standard weighted kNN protocol (Wu et al. 2018, as in DINO/solo-learn): cosine
  similarity of L2-normalised features, the k = 20 nearest, each voting exp(sim / T) with
  T = 0.07 for its class; top-1 and top-5 accuracy in percent.
- Disturbed O-KNN: the same queries on images whose every pixel outside the image's query boxes is
  replaced by another val image (seeded random choice, resized to the same size); the pixels of
  the boxes are unchanged. The bank is not disturbed.
- Positive control (tests/eval/test_oknn.py): a small CNN trained with the labels beats the same
  network untrained through this code, at an input size where the objects cover C5 cells.
- The search runs over bank chunks x query chunks with a running top-k, so memory beyond the
  bank itself is O(bank_chunk x query_chunk), whatever the bank size (COCO train: 860k objects).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval.backbone import (
    ARCHS, ResNetStages, build_resnet, load_rgb, region_feature, resize_rgb, resize_shape, to_input,
)
from eval.knn import knn_classify
from eval.oknn_objects import disturb, eligible, pick_donors, select_bank
from pipeline import cli
from pipeline.files import write_text
from pipeline.params import as_dict, load_section
from pipeline.readers import read_coco
from train.dist import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OknnConfig:
    """The `oknn` section of params.yaml."""

    feature: str = "c5_roialign7"   # eval.backbone.REGION_FEATURES: RoIAlign 7x7 on C5 + average pooling
    min_size: int = 320             # shorter image side fed to the backbone (pixels); the paper gives none
    max_size: int = 533             # cap on the longer side
    per_image: int = 5              # N: bank objects per train image, rarest class first
    min_box_size: float = 8.0       # skip boxes whose shorter side is below this (original pixels)
    k: int = 20                     # neighbours
    temperature: float = 0.07       # vote weight exp(sim / T)
    batch_size: int = 4             # images per forward (same-shape images only, never padded)
    workers: int = 2                # DataLoader processes decoding images
    bank_chunk: int = 65536         # bank rows per search step
    query_chunk: int = 1024         # query rows per search step
    seed: int = 0                   # bank choice, disturbing images, the random backbone


# ------------------------------------------------------------------------------ feature extraction


class RegionImages(torch.utils.data.Dataset):
    """Item i: (3xHxW uint8 image resized to shapes[i], its boxes scaled to it, i).

    `boxes[i]` are in pixels of the annotated size `sizes[i]` (h, w). With `donor_paths`, image i is
    first disturbed at its own size by the image at donor_paths[i] (see `disturb`)."""

    def __init__(self, paths, sizes, shapes, boxes, donor_paths=None):
        self.paths, self.sizes, self.shapes, self.boxes, self.donor_paths = paths, sizes, shapes, boxes, donor_paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        im = load_rgb(self.paths[i])
        (h0, w0), (h, w) = self.sizes[i], self.shapes[i]
        if im.shape[:2] != (h0, w0):
            raise ValueError(f"{self.paths[i]}: image is {im.shape[1]}x{im.shape[0]} but annotated {w0}x{h0}")
        if self.donor_paths is not None:
            im = disturb(im, self.boxes[i], resize_rgb(load_rgb(self.donor_paths[i]), h0, w0))
        scale = np.array([w / w0, h / h0, w / w0, h / h0], np.float32)
        im = resize_rgb(im, h, w)
        # a decoded image at its fed size comes back unresized and read-only: copy it rather than
        # hand out a tensor over memory numpy marked read-only (PyTorch warns, and writes are undefined)
        im = np.require(im, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        return torch.from_numpy(im).permute(2, 0, 1), torch.from_numpy(self.boxes[i] * scale), i


def shape_batches(shapes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of one input shape each (so nothing is padded)."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shapes):
        by_shape.setdefault(tuple(s), []).append(i)
    return [idx[j:j + batch_size] for _, idx in sorted(by_shape.items()) for j in range(0, len(idx), batch_size)]


def _collate(items):
    images, boxes, index = zip(*items)
    return torch.stack(images), list(boxes), list(index)


@torch.inference_mode()
def extract(stages: torch.nn.Module, feature: str, dataset: RegionImages, rows: list[np.ndarray],
            n_rows: int, cfg: OknnConfig, device: torch.device, what: str = "features") -> np.ndarray:
    """L2-normalised region features, n_rows x C (float32); image i's boxes fill rows[i]. Logs its
    progress (`what`: which extraction) at every `PROGRESS_STEPS`-th of the images."""
    fn = region_feature(feature)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=shape_batches(dataset.shapes, cfg.batch_size), collate_fn=_collate,
        num_workers=cfg.workers, pin_memory=device.type == "cuda")
    out = None
    progress = Progress(what, len(dataset))
    for images, boxes, index in loader:
        progress.update(len(index))
        x = to_input(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        f = F.normalize(fn(stages, x, boxes).float(), dim=1)
        f = f.cpu().numpy()                                   # boxes of the batch x C
        if out is None:
            out = np.zeros((n_rows, f.shape[1]), np.float32)
        out[np.concatenate([rows[i] for i in index])] = f
    if out is None:
        raise ValueError("no image with an eligible box to extract features from")
    return out


PROGRESS_STEPS = 10        # progress lines per extraction (every 10% of its images)


class Progress:
    """Logs `done/total images (percent)` of a long extraction each time another
    1/PROGRESS_STEPS of it is done (COCO's bank is 118k images), and at the end, with the rate."""

    def __init__(self, what: str, total: int, steps: int = PROGRESS_STEPS):
        self.what, self.total, self.steps = what, total, steps
        self.done, self.next_mark, self.t0 = 0, 1, time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.next_mark > self.steps or self.done * self.steps < self.next_mark * self.total:
            return
        while self.next_mark <= self.steps and self.done * self.steps >= self.next_mark * self.total:
            self.next_mark += 1
        seconds = time.perf_counter() - self.t0
        log.info("O-KNN %s: %d/%d images (%.0f%%), %.1f images/s", self.what, self.done, self.total,
                 100.0 * self.done / max(self.total, 1), self.done / max(seconds, 1e-9))


# ------------------------------------------------------------------------------ the whole evaluation


@dataclass
class Split:
    """Objects of one COCO split, grouped by image."""

    paths: list[str]
    sizes: list[tuple[int, int]]        # annotated (h, w)
    image: np.ndarray                   # per object: index into paths
    boxes: np.ndarray                   # per object: x1y1x2y2, original pixels (float32)
    category: np.ndarray                # per object: COCO category id
    skipped: dict[str, int]

    def by_image(self, select: np.ndarray):
        """(image indices, per-image boxes, per-image output rows) of the objects `select`."""
        img = self.image[select]                      # non-decreasing: objects are sorted by image
        ims, start = np.unique(img, return_index=True)
        rows = np.split(np.arange(len(select)), start[1:])
        boxes = self.boxes[select]
        return ims, [boxes[r] for r in rows], rows


def read_split(coco_root: Path, split: str, min_box_size: float) -> Split:
    """The eligible objects of `split` (e.g. 'val2017') of a COCO-layout folder."""
    res = read_coco(coco_root / "annotations" / f"instances_{split}.json", coco_root / split)
    index = {k: i for i, k in enumerate(res.images.column("key").to_pylist())}
    b = res.boxes
    image = np.fromiter((index[k] for k in b.column("key").to_pylist()), np.int64, b.num_rows)
    boxes = np.stack([b.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1).astype(np.float32)
    m = eligible(boxes, b.column("is_group").to_numpy(zero_copy_only=False), min_box_size)
    keep = np.flatnonzero(m["keep"])
    order = keep[np.argsort(image[keep], kind="stable")]
    return Split(
        paths=res.images.column("path").to_pylist(),
        sizes=list(zip(res.images.column("height").to_pylist(), res.images.column("width").to_pylist())),
        image=image[order], boxes=boxes[order], category=b.column("category_id").to_numpy()[order],
        skipped={"crowd": int(m["crowd"].sum()), "tiny": int(m["tiny"].sum())},
    )


def fed_shapes(split: Split, cfg: OknnConfig) -> list[tuple[int, int]]:
    """(h, w) each image of the split is fed to the backbone at."""
    return [resize_shape(h, w, cfg.min_size, cfg.max_size) for h, w in split.sizes]


def object_cells(split: Split, select: np.ndarray, cfg: OknnConfig, stride: int) -> dict[str, float]:
    """The shorter side of the objects `select` at the fed size, in cells of a `stride`-pixel map:
    10th, 50th and 90th percentiles, and the share of objects under one cell."""
    shapes = np.array(fed_shapes(split, cfg), np.float64)[split.image[select]]          # n x (h, w)
    sizes = np.array(split.sizes, np.float64)[split.image[select]]
    b = split.boxes[select].astype(np.float64)
    side = np.minimum((b[:, 2] - b[:, 0]) * shapes[:, 1] / sizes[:, 1], (b[:, 3] - b[:, 1]) * shapes[:, 0] / sizes[:, 0])
    cells = side / stride
    p10, p50, p90 = np.percentile(cells, [10, 50, 90]) if len(cells) else (np.nan,) * 3
    return {"p10": round(float(p10), 3), "median": round(float(p50), 3), "p90": round(float(p90), 3),
            "under_one_cell": round(float((cells < 1).mean()), 4) if len(cells) else float("nan")}


def split_features(stages: torch.nn.Module, split: Split, select: np.ndarray, cfg: OknnConfig,
                   device: torch.device, donors: np.ndarray | None = None, what: str = "features") -> np.ndarray:
    """Features of the objects `select` (indices into split's objects, sorted), one row each;
    with `donors` (an image index per image of the split), on the disturbed images."""
    ims, boxes, rows = split.by_image(select)
    sizes = [split.sizes[i] for i in ims]
    all_shapes = fed_shapes(split, cfg)
    shapes = [all_shapes[i] for i in ims]
    donor_paths = None if donors is None else [split.paths[d] for d in donors[ims]]
    dataset = RegionImages([split.paths[i] for i in ims], sizes, shapes, boxes, donor_paths)
    return extract(stages, cfg.feature, dataset, rows, len(select), cfg, device, what)


def run_oknn(stages: torch.nn.Module, coco_root: Path, cfg: OknnConfig, device: torch.device,
             neighbours: Path | None = None) -> dict:
    """O-KNN and disturbed O-KNN of `stages` on a COCO-layout folder; the JSON-ready result, with
    the seconds of each step under `time_s` (`main` logs them and leaves them out of the file).
    With `neighbours`, each query's nearest bank objects go to that parquet file (eval.neighbours)."""
    t0 = time.perf_counter()
    train = read_split(coco_root, "train2017", cfg.min_box_size)
    val = read_split(coco_root, "val2017", cfg.min_box_size)
    classes = np.union1d(np.unique(train.category), np.unique(val.category))
    bank_y = np.searchsorted(classes, train.category)
    query_y = np.searchsorted(classes, val.category)
    bank_sel = select_bank(train.image, bank_y, cfg.per_image, cfg.seed)
    queries = np.arange(len(val.image))
    times = {"read_annotations": time.perf_counter() - t0}

    # channels-last convolutions: 1.6x faster for ResNet-18 on a CPU (same features up to rounding)
    stages = stages.to(device, memory_format=torch.channels_last).eval()
    jobs = {"extract_bank": (train, bank_sel, None, "bank (train2017)"),
            "extract_queries": (val, queries, None, "queries (val2017)"),
            "extract_disturbed": (val, queries, pick_donors(len(val.paths), cfg.seed), "disturbed queries")}
    feats = {}
    for name, (split, select, donors, what) in jobs.items():
        t = time.perf_counter()
        feats[name] = split_features(stages, split, select, cfg, device, donors, what)
        times[name] = time.perf_counter() - t
    bank, q, qd = feats["extract_bank"], feats["extract_queries"], feats["extract_disturbed"]

    t = time.perf_counter()
    acc = knn_classify(bank, bank_y[bank_sel], q, query_y, len(classes), cfg, device)
    dacc = knn_classify(bank, bank_y[bank_sel], qd, query_y, len(classes), cfg, device)
    times["search"] = time.perf_counter() - t
    if neighbours is not None:
        from eval.neighbours import write_neighbours

        write_neighbours(neighbours, bank, q, train, val, bank_sel, classes, cfg, device, coco_root)
    return {"top1": acc[1], "top5": acc[5], "disturbed_top1": dacc[1], "disturbed_top5": dacc[5],
            **protocol(stages, train, val, bank_sel, bank_y, query_y, classes, cfg), "feature_dim": int(bank.shape[1]),
            "skipped": {"train": train.skipped, "val": val.skipped},
            "time_s": {k: round(v, 2) for k, v in times.items()}, "settings": as_dict(cfg)}


def protocol(stages, train: Split, val: Split, bank_sel: np.ndarray, bank_y: np.ndarray, query_y: np.ndarray,
             classes: np.ndarray, cfg: OknnConfig) -> dict:
    """The protocol, beside the numbers it produced: feature, k, fed image sizes, the objects' size
    in C5 cells, the prior, and the bank's and queries' sizes."""
    share = np.bincount(bank_y[bank_sel], minlength=len(classes)) / max(len(bank_sel), 1)
    query_share = np.bincount(query_y, minlength=len(classes)) / max(len(query_y), 1)
    fed = [min(hw) for hw in fed_shapes(train, cfg) + fed_shapes(val, cfg)]
    c5 = stages.strides["C5"]
    queries = np.arange(len(val.image))
    return {
        "feature": cfg.feature, "k": int(cfg.k),
        "image_size": {"min_size": int(cfg.min_size), "max_size": int(cfg.max_size),
                       "shorter_side_min": int(min(fed)), "shorter_side_max": int(max(fed))},
        # objects' shorter side at the fed size in C5 cells: under one, RoIAlign reads mostly neighbours
        "object_c5_cells": {"stride": int(c5), "bank": object_cells(train, bank_sel, cfg, c5),
                            "queries": object_cells(val, queries, cfg, c5)},
        # top-1 of a predictor that ignores the image and answers the label of a random bank
        # object: the floor features must beat. Below 100/classes where the class-balanced bank
        # holds the queries' frequent classes less often than the queries do.
        "prior_top1": float(100.0 * (share * query_share).sum()),
        "bank_objects": int(len(bank_sel)), "bank_images": int(len(np.unique(train.image[bank_sel]))),
        "bank_largest_class_share": float(share.max()),
        "queries": int(len(queries)), "query_images": int(len(np.unique(val.image))),
        "classes": int(len(classes)),
    }


def add_protocol_args(p) -> None:
    """The arguments of every command that runs O-KNN (this stage, `eval.curve`): the backbones'
    ResNet, the COCO data, the result file, the params file of the protocol, the device."""
    p.add_argument("--arch", required=True, choices=sorted(ARCHS), help="the backbone's ResNet")
    p.add_argument("--coco-root", required=True, type=Path,
                   help="COCO 2017 layout: annotations/instances_{train,val}2017.json, train2017/, val2017/")
    p.add_argument("--out", required=True, type=Path, help="result JSON")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'oknn' section from")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m eval.oknn", __doc__)
    p.add_argument("--backbone", required=True, help="ResNet state_dict file, or 'random'")
    add_protocol_args(p)
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    cfg = load_section(OknnConfig, "oknn", args.params)
    region_feature(cfg.feature)  # an unknown name fails before any work
    device = resolve_device(args.device)
    stages = ResNetStages(build_resnet(args.arch, args.backbone, seed=cfg.seed))
    result = {"backbone": str(args.backbone), "arch": args.arch, **run_oknn(stages, args.coco_root, cfg, device,
                                                                        args.out.with_name("oknn_neighbours.parquet"))}
    result["device"] = str(device)
    # seconds vary between runs of the same inputs: logged, never in the output DVC hashes
    times = result.pop("time_s")
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    log.info("O-KNN seconds (not in %s): %s", args.out, json.dumps(times))
    log.info("wrote %s (and %s): O-KNN top-1 %.2f top-5 %.2f; disturbed top-1 %.2f top-5 %.2f (%d bank objects, "
             "%d queries)", args.out, args.out.with_name("oknn_neighbours.parquet").name, result["top1"],
             result["top5"], result["disturbed_top1"], result["disturbed_top5"], result["bank_objects"],
             result["queries"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
