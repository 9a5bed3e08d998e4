"""OpenImage-MINI: OpenImages images sampled to match COCO's label distribution (paper section 5.1).

    python -m pipeline.sample --coco-annotations COCO/annotations/instances_train2017.json \
        --openimages-boxes OI/oidv6-train-annotations-bbox.csv \
        --openimages-classes OI/class-descriptions-boxable.csv \
        --openimages-images OI/train --out data/openimage_mini [--mapping FILE] [--seed S]

The paper's two criteria, for the COCO <-> OpenImages class mapping
(`data_manifests/coco_openimages_classes.csv`, joined on MIDs):
 1. every selected image holds at least one object of a class that maps to COCO;
 2. for every COCO class, the objects of that class over all selected images do not exceed its
    objects in the COCO annotations.
Every object of a selected image is kept, whatever its class (that is how the set gets about seven
times more categories than COCO).

The selection is the greedy pass over the eligible images (criterion 1) in a random order fixed by
the seed: an image is taken if its COCO-class counts still fit under every cap. It is *maximal*:
an image that did not fit when it was visited cannot fit later, because the counts only grow, so
no image left out can be added without breaking criterion 2. The pass is a plain loop over
per-image sparse counts (CSR), about a microsecond per image.

Group-of boxes (OpenImages `IsGroupOf=1`, COCO `iscrowd=1`) count as `group_weight` objects each
on both sides (default 1: a box is an object, as the paper's Table 2 counts objects per image).

Outputs in `--out`: `images.parquet`, `boxes.parquet` (the contracts; OpenImages boxes keep their
MID as `label` and carry the mapped COCO id as `category_id`, else -1), `rejects.parquet` (bad CSV
rows, missing images), `stats.json` (the Table 2 columns for COCO and the sample, criteria checks),
`class_counts.parquet`, `class_distribution.png`, and `image_ids.txt` (`train/<ImageID>` per line,
the input of the official OpenImages downloader). Without `--openimages-images` (the images are not
downloaded yet) the selection, statistics and `image_ids.txt` are written, and the pixel tables
after a rerun with the downloaded images: the selection depends only on the CSVs and the seed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import cli, contracts
from pipeline.categories import COCO_OPENIMAGES_CSV, read_class_mapping, read_openimages_classes
from pipeline.files import atomic_path, write_text
from pipeline.params import as_dict, load_section, override
from pipeline.readers import (
    ReadResult, attach_images, openimages_source, read_coco, read_openimages_boxes, reject_counts,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleConfig:
    """The `sample` section of params.yaml."""

    seed: int = 0
    group_weight: int = 1     # objects counted for one group-of / crowd box, on both sides


# ------------------------------------------------------------------------------- pure selection


@dataclass(frozen=True)
class SparseCounts:
    """Per-image counts of COCO classes, CSR: image i has classes cls[ptr[i]:ptr[i+1]]."""

    ptr: np.ndarray     # (n_images + 1,) int64
    cls: np.ndarray     # (nnz,) int32, class index in [0, n_classes)
    cnt: np.ndarray     # (nnz,) int64, objects of that class in that image

    @classmethod
    def from_rows(cls, image: np.ndarray, klass: np.ndarray, weight: np.ndarray, n_images: int, n_classes: int):
        """Rows (image index, class index, weight) with class -1 for classes outside COCO."""
        keep = klass >= 0
        key = image[keep].astype(np.int64) * n_classes + klass[keep]
        uniq, inv = np.unique(key, return_inverse=True)
        cnt = np.bincount(inv, weights=weight[keep], minlength=len(uniq)).astype(np.int64)
        img = uniq // n_classes
        ptr = np.zeros(n_images + 1, dtype=np.int64)
        np.add.at(ptr, img + 1, 1)
        return cls(np.cumsum(ptr), (uniq % n_classes).astype(np.int32), cnt)

    def eligible(self) -> np.ndarray:
        """Criterion 1: images with at least one object of a COCO class."""
        return np.flatnonzero(np.diff(self.ptr) > 0)

    def totals(self, images: np.ndarray, n_classes: int) -> np.ndarray:
        """Objects per class summed over `images`."""
        sel = np.zeros(len(self.ptr) - 1, dtype=bool)
        sel[images] = True
        row_img = np.repeat(np.arange(len(self.ptr) - 1), np.diff(self.ptr))
        m = sel[row_img]
        return np.bincount(self.cls[m], weights=self.cnt[m], minlength=n_classes).astype(np.int64)


def greedy_select(counts: SparseCounts, caps: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Visit images in `order`; take one if every class count still fits under `caps`.

    Returns the taken image indices in visiting order. The result is maximal (see module doc).
    """
    ptr, cls, cnt = counts.ptr.tolist(), counts.cls.tolist(), counts.cnt.tolist()
    room = caps.astype(np.int64).tolist()
    taken = []
    for i in order.tolist():
        s, e = ptr[i], ptr[i + 1]
        fits = True
        for j in range(s, e):
            if cnt[j] > room[cls[j]]:
                fits = False
                break
        if fits and e > s:
            for j in range(s, e):
                room[cls[j]] -= cnt[j]
            taken.append(i)
    return np.asarray(taken, dtype=np.int64)


def violations_if_added(counts: SparseCounts, used: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Per image: would adding it (to a selection with class totals `used`) break a cap?"""
    row_img = np.repeat(np.arange(len(counts.ptr) - 1), np.diff(counts.ptr))
    over = used[counts.cls] + counts.cnt > caps[counts.cls]
    return np.bincount(row_img, weights=over, minlength=len(counts.ptr) - 1) > 0


def select(counts: SparseCounts, caps: np.ndarray, image_order_key: np.ndarray, seed: int) -> np.ndarray:
    """OpenImage-MINI selection: eligible images in a seeded random order, then the greedy pass.
    Returns the selected image indices sorted by `image_order_key`.

    `image_order_key[i]` is image i's rank in a canonical order (sorted ImageIDs), so the result
    depends on the seed and the data only, not on the order of rows in the CSV.
    """
    eligible = counts.eligible()
    canonical = eligible[np.argsort(image_order_key[eligible], kind="stable")]
    order = canonical[np.random.default_rng(seed).permutation(len(canonical))]
    taken = greedy_select(counts, caps, order)
    return taken[np.argsort(image_order_key[taken], kind="stable")]  # in canonical (ImageID) order


# ------------------------------------------------------------------------------------ statistics


def table_stats(boxes: pa.Table, num_images: int) -> dict:
    """The columns of the paper's Table 2 for a boxes table over `num_images` images."""
    per = boxes.group_by("key").aggregate([("label", "count"), ("label", "count_distinct")])
    return {
        "num_images": int(num_images),
        "num_objects": int(boxes.num_rows),
        "objects_per_image": boxes.num_rows / max(num_images, 1),
        "categories_per_image": float(pc.sum(per.column("label_count_distinct")).as_py() or 0) / max(num_images, 1),
        "num_categories": int(pc.count_distinct(boxes.column("label")).as_py()),
    }


def plot_distribution(class_counts: pa.Table, path: Path) -> None:
    """Per-COCO-class share of objects in COCO and in the sample, classes by COCO frequency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coco_class = pc.greater_equal(class_counts.column("coco_id"), 0)
    present = pc.or_(pc.greater(class_counts.column("coco_count"), 0), pc.greater(class_counts.column("sample_count"), 0))
    t = class_counts.filter(pc.and_(coco_class, present)).sort_by(
        [("coco_count", "descending"), ("label", "ascending")])
    names = t.column("label").to_pylist()
    coco = np.asarray(t.column("coco_count").to_pylist(), dtype=float)
    samp = np.asarray(t.column("sample_count").to_pylist(), dtype=float)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.18), 4.5))
    ax.bar(x - 0.2, coco / max(coco.sum(), 1), 0.4, label=f"COCO ({int(coco.sum())} objects)")
    ax.bar(x + 0.2, samp / max(samp.sum(), 1), 0.4, label=f"OpenImage-MINI ({int(samp.sum())} objects)")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.set_ylabel("share of objects of COCO classes")
    ax.set_title("Per-class distribution: COCO vs OpenImage-MINI")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------- stage


def coco_caps(coco_annotations: Path, coco_ids: list[int], group_weight: int) -> tuple[np.ndarray, dict]:
    """Objects per COCO class (criterion 2's caps, in `coco_ids` order) and COCO's Table 2 stats."""
    coco = read_coco(coco_annotations, None, check_files=False)
    cls = pc.fill_null(pc.index_in(coco.boxes.column("category_id"), value_set=pa.array(coco_ids, pa.int32())), -1)
    cls = cls.to_numpy(zero_copy_only=False)
    w = np.where(coco.boxes.column("is_group").to_numpy(zero_copy_only=False), group_weight, 1)
    caps = np.bincount(cls[cls >= 0], weights=w[cls >= 0], minlength=len(coco_ids)).astype(np.int64)
    return caps, table_stats(coco.boxes, coco.images.num_rows)


@dataclass
class Pool:
    """The OpenImages pool as the selection sees it: validated box rows, one image index per row,
    per-image COCO-class counts, and COCO's caps (criterion 2) and Table 2 statistics."""

    rows: pa.Table              # validated OpenImages box rows
    rejects: pa.Table           # rejected CSV rows
    image_ids: pa.Array         # distinct ImageIDs (the image index space)
    row_image: np.ndarray       # image index of each row
    mids: list[str]             # MIDs that map to a COCO class, sorted
    counts: SparseCounts
    caps: np.ndarray
    coco_stats: dict
    order_key: np.ndarray       # each image's rank among the sorted ImageIDs


def _require_files(coco_annotations: Path, openimages_boxes: Path) -> None:
    for path, what in ((coco_annotations, "COCO annotation file (--coco-annotations)"),
                       (openimages_boxes, "OpenImages box file (--openimages-boxes)")):
        if not Path(path).is_file():  # before any long read, so the error comes at once
            raise FileNotFoundError(f"{what} {path} does not exist")


def read_pool(coco_annotations: Path, openimages_boxes: Path, openimages_classes: Path, cmap,
              group_weight: int) -> Pool:
    """Read both sides. COCO (the caps of criterion 2) is parsed in another process while this one
    reads the OpenImages CSV: JSON parsing holds the GIL, and the two reads take about as long."""
    coco_ids = cmap.coco_ids()
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        coco_job = pool.submit(coco_caps, Path(coco_annotations), coco_ids, group_weight)

        # OpenImages: validated rows, image index and COCO class index per row.
        norm, oi_rejects = read_openimages_boxes(openimages_boxes, openimages_classes)
        enc = pc.dictionary_encode(norm.column("image_id")).combine_chunks()
        image_ids = enc.dictionary
        img = enc.indices.to_numpy(zero_copy_only=False)
        mids = sorted(cmap.mid_to_coco)
        mid_cls = np.array([coco_ids.index(cmap.mid_to_coco[m]) for m in mids], dtype=np.int32)
        mid_idx = pc.fill_null(pc.index_in(norm.column("label"), value_set=pa.array(mids)), -1).to_numpy(zero_copy_only=False)
        row_cls = np.where(mid_idx >= 0, mid_cls[np.maximum(mid_idx, 0)], -1).astype(np.int32)
        row_w = np.where(norm.column("is_group").to_numpy(zero_copy_only=False), group_weight, 1)
        counts = SparseCounts.from_rows(img, row_cls, row_w, len(image_ids), len(coco_ids))
        caps, coco_stats = coco_job.result()
    order_key = np.empty(len(image_ids), dtype=np.int64)
    order_key[pc.sort_indices(image_ids).to_numpy()] = np.arange(len(image_ids))
    return Pool(norm, oi_rejects, image_ids, img, mids, counts, caps, coco_stats, order_key)


def check_criteria(counts: SparseCounts, chosen: np.ndarray, used: np.ndarray, caps: np.ndarray) -> dict:
    """The paper's two criteria and maximality, checked on the result; a failure is a bug."""
    left_out = np.setdiff1d(counts.eligible(), chosen)
    criteria = {
        "every_image_has_a_coco_class": bool(np.all(np.diff(counts.ptr)[chosen] > 0)),
        "no_coco_class_over_its_coco_count": bool(np.all(used <= caps)),
        "maximal": bool(np.all(violations_if_added(counts, used, caps)[left_out])),
    }
    if not all(criteria.values()):  # a bug, never a data problem
        raise AssertionError(f"OpenImage-MINI selection breaks its criteria: {criteria}")
    return criteria


def write_pixel_tables(sel_rows: pa.Table, images: Path, openimages_boxes: Path, source: str,
                       chosen_ids: list, mids: list[str], cmap, out: Path) -> ReadResult:
    """images.parquet and boxes.parquet of the selection (boxes keep their MID as `label` and carry
    the mapped COCO id as `category_id`, else -1); returns the tables with the file rejects."""
    res = attach_images(sel_rows, images, source=source, boxes_csv=str(openimages_boxes), image_ids=chosen_ids)
    cat = pc.fill_null(pc.index_in(res.boxes.column("label"), value_set=pa.array(mids)), -1).to_numpy(zero_copy_only=False)
    coco_of_mid = np.array([cmap.mid_to_coco[m] for m in mids] + [-1], dtype=np.int32)
    boxes = res.boxes.set_column(res.boxes.schema.get_field_index("category_id"), "category_id",
                                 pa.array(coco_of_mid[cat], pa.int32()))
    contracts.write_table(res.images, out / "images.parquet", contracts.IMAGES)
    contracts.write_table(boxes, out / "boxes.parquet", contracts.BOXES)
    return ReadResult(res.images, boxes, res.rejects)


def class_count_table(sel_labels, cmap, classes: dict, caps: np.ndarray, used: np.ndarray) -> pa.Table:
    """Per-class counts: COCO classes (summed over their MIDs), then every other MID of the sample."""
    coco_ids = cmap.coco_ids()
    mid_counts = {r["values"]: r["counts"] for r in pc.value_counts(sel_labels).to_pylist()}
    other = sorted(m for m in mid_counts if m not in cmap.mid_to_coco)
    return pa.table({
        "label": [cmap.coco_names[c] for c in coco_ids] + other,
        "name": [cmap.coco_names[c] for c in coco_ids] + [classes[m] for m in other],
        "coco_id": pa.array(coco_ids + [-1] * len(other), pa.int32()),
        "coco_count": pa.array(caps.tolist() + [0] * len(other), pa.int64()),
        "sample_count": pa.array(used.tolist() + [mid_counts[m] for m in other], pa.int64()),
    })


def sample_stats(pool: Pool, sel_rows: pa.Table, chosen: np.ndarray, used: np.ndarray, criteria: dict,
                 rejects: pa.Table, res: ReadResult | None, cfg: SampleConfig, mapping: Path) -> dict:
    """stats.json: the Table 2 columns for COCO and the sample, the pool, the criteria checks, the
    rejected rows and the settings (with the mapping's checksum)."""
    stats = {
        "coco": pool.coco_stats,
        "openimage_mini": table_stats(pa.table({"key": sel_rows.column("image_id"),
                                                "label": sel_rows.column("label")}), len(chosen)),
        "openimages_pool": {
            "num_images": int(len(pool.image_ids)),
            "num_rows": int(pool.rows.num_rows + pool.rejects.num_rows),
            "eligible_images": int(len(pool.counts.eligible())),
        },
        "criteria": criteria,
        "coco_classes_at_their_cap": int(np.sum((used == pool.caps) & (pool.caps > 0))),
        "rejected_rows": reject_counts(rejects),
        "pixel_tables": res is not None,
        "settings": {**as_dict(cfg), "mapping": Path(mapping).name,
                     "mapping_sha256": hashlib.sha256(Path(mapping).read_bytes()).hexdigest()},
    }
    if res is not None:
        stats["openimage_mini"]["images_with_file"] = res.images.num_rows
    return stats


def run(
    coco_annotations: Path,
    openimages_boxes: Path,
    openimages_classes: Path,
    out: Path,
    cfg: SampleConfig,
    mapping: Path = COCO_OPENIMAGES_CSV,
    openimages_images: Path | None = None,
) -> dict:
    """The whole stage; returns the statistics written to `out/stats.json`, plus the timing under
    `"run"` (logged, never written: DVC hashes `out`, and the report stage depends on stats.json)."""
    t0 = time.perf_counter()
    _require_files(coco_annotations, openimages_boxes)
    classes = read_openimages_classes(openimages_classes)
    cmap = read_class_mapping(mapping, classes)
    pool = read_pool(coco_annotations, openimages_boxes, openimages_classes, cmap, cfg.group_weight)
    t_read = time.perf_counter() - t0

    chosen = select(pool.counts, pool.caps, pool.order_key, cfg.seed)
    used = pool.counts.totals(chosen, len(cmap.coco_ids()))
    criteria = check_criteria(pool.counts, chosen, used, pool.caps)

    chosen_ids = pool.image_ids.take(pa.array(chosen)).to_pylist()
    is_chosen = np.zeros(len(pool.image_ids), dtype=bool)
    is_chosen[chosen] = True
    sel_rows = pool.rows.filter(pa.array(is_chosen[pool.row_image]))
    source = openimages_source(Path(openimages_boxes))

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "image_ids.txt", "".join(f"{source.removeprefix('openimages_')}/{i}\n" for i in chosen_ids))
    rejects, res = pool.rejects, None
    if openimages_images is not None:
        res = write_pixel_tables(sel_rows, openimages_images, openimages_boxes, source, chosen_ids, pool.mids,
                                 cmap, out)
        rejects = pa.concat_tables([pool.rejects, res.rejects])
    contracts.write_table(rejects, out / "rejects.parquet", contracts.REJECTS)

    class_counts = class_count_table(sel_rows.column("label"), cmap, classes, pool.caps, used)
    with atomic_path(out / "class_counts.parquet") as tmp:
        pq.write_table(class_counts, tmp)
    plot_distribution(class_counts, out / "class_distribution.png")

    stats = sample_stats(pool, sel_rows, chosen, used, criteria, rejects, res, cfg, mapping)
    write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    seconds = {"read": round(t_read, 3), "total": round(time.perf_counter() - t0, 3)}
    log.info("sample run (not in stats.json): %s", json.dumps({"seconds": seconds}))
    return {**stats, "run": {"seconds": seconds}}


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipeline.sample", __doc__)
    p.add_argument("--coco-annotations", required=True, type=Path, help="COCO instances_train2017.json")
    p.add_argument("--openimages-boxes", required=True, type=Path, help="oidv6-train-annotations-bbox.csv")
    p.add_argument("--openimages-classes", required=True, type=Path, help="class-descriptions-boxable.csv")
    p.add_argument("--openimages-images", type=Path, help="folder of <ImageID>.jpg (omit before downloading)")
    p.add_argument("--out", required=True, type=Path, help="output folder (tables, stats.json, image_ids.txt, plot)")
    p.add_argument("--mapping", type=Path, default=COCO_OPENIMAGES_CSV, help="COCO <-> OpenImages class table")
    p.add_argument("--seed", type=int, help="overrides sample.seed (the order of the greedy pass)")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'sample' section from")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    cfg = override(load_section(SampleConfig, "sample", args.params), seed=args.seed)
    stats = run(args.coco_annotations, args.openimages_boxes, args.openimages_classes, args.out, cfg,
                mapping=args.mapping, openimages_images=args.openimages_images)
    for name in ("openimage_mini", "coco"):
        s = stats[name]
        log.info("%s: %d images, %.2f objects and %.2f categories per image, %d categories", name,
                 s["num_images"], s["objects_per_image"], s["categories_per_image"], s["num_categories"])
    if not stats["pixel_tables"]:
        log.warning("download the images listed in %s, then rerun with --openimages-images",
                    args.out / "image_ids.txt")
    log.info("wrote %s: %d images of %d eligible; criteria %s; %d rejected rows", args.out,
             stats["openimage_mini"]["num_images"], stats["openimages_pool"]["eligible_images"],
             stats["criteria"], sum(stats["rejected_rows"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
