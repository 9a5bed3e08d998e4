"""Readers: COCO instances JSON and OpenImages box CSVs into the images / boxes tables.

    python -m pipeline.readers coco --annotations coco/annotations/instances_train2017.json \
        --images coco/train2017 --out data/tables/coco_train2017
    python -m pipeline.readers openimages --boxes openimages/oidv6-train-annotations-bbox.csv \
        --classes openimages/class-descriptions-boxable.csv --images openimages/train \
        --out data/tables/openimages_train

The same code reads the embedded data and the real files (COCO 2017: 860k boxes; OpenImages V6
train: 14.6 million rows over 1.74 million images).

Bad input:
- a missing file or a missing column/key is an error that names it and says what is expected;
- a bad row (NaN, inverted, zero-area or out-of-range box, unknown label, missing image) is
  dropped, counted by reason and listed in the rejects table; every valid row is kept.

OpenImages is read in two steps because its boxes are normalised to [0, 1] and pixel coordinates
need each image's size: `read_openimages_boxes` validates the CSV (no image needed, so the sampler
can pick images before they are downloaded) and `attach_images` resolves the sizes of the images
that are wanted from their file headers.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline import contracts
from pipeline.categories import read_openimages_classes
from pipeline.files import write_text

OPENIMAGES_HEADER = (
    "ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
    "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside",
)
OPENIMAGES_USED = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")
COCO_IMAGE_FIELDS = ("id", "file_name", "width", "height")
COCO_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox")
# COCO boxes are floats from polygon extents; allow this much overshoot (pixels) before rejecting,
# and clip what is allowed.
COCO_EDGE_TOLERANCE = 1.0

# Normalised OpenImages boxes: the validated CSV rows, before image sizes are known.
NORMALIZED_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("label", pa.string()),
    ("xmin", pa.float32()),
    ("ymin", pa.float32()),
    ("xmax", pa.float32()),
    ("ymax", pa.float32()),
    ("is_group", pa.bool_()),
    ("row", pa.int64()),
])


class ReaderError(ValueError):
    """An input file that cannot be read as the format it claims to be."""


@dataclass
class ReadResult:
    """What a reader returns: the contract tables and the rejected rows."""

    images: pa.Table
    boxes: pa.Table
    rejects: pa.Table
    extra: dict = field(default_factory=dict)

    def reject_counts(self) -> dict[str, int]:
        return reject_counts(self.rejects)

    def summary(self) -> dict:
        return {
            "images": self.images.num_rows,
            "boxes": self.boxes.num_rows,
            "rejected": self.rejects.num_rows,
            "rejected_by_reason": self.reject_counts(),
            **self.extra,
        }

    def write(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        contracts.write_table(self.images, out / "images.parquet", contracts.IMAGES)
        contracts.write_table(self.boxes, out / "boxes.parquet", contracts.BOXES)
        contracts.write_table(self.rejects, out / "rejects.parquet", contracts.REJECTS)
        write_text(out / "summary.json", json.dumps(self.summary(), indent=2) + "\n")


def reject_counts(rejects: pa.Table) -> dict[str, int]:
    counts = {r: 0 for r in contracts.REJECT_REASONS}
    if rejects.num_rows:
        for row in pc.value_counts(rejects.column("reason")).to_pylist():
            counts[row["values"]] = row["counts"]
    return counts


REASON_NAMES = np.array((None,) + contracts.REJECT_REASONS, dtype=object)


def reason_codes(masks: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Per row, 1 + the index of the first reason (in REJECT_REASONS order) whose mask is true;
    0 for a good row. `REASON_NAMES[code]` gives the reason. Vectorised: no loop over rows."""
    code = np.zeros(n, dtype=np.int8)
    for j, name in reversed(list(enumerate(contracts.REJECT_REASONS, start=1))):
        m = masks.get(name)
        if m is not None:
            code[m] = j
    return code


def rejects_table(source_file: str, rows, image_ids, labels, reasons) -> pa.Table:
    n = len(reasons)
    return pa.table({
        "source_file": pa.array([source_file] * n, pa.string()),
        "row": pa.array(rows, pa.int64()),
        "image_id": pa.array(image_ids, pa.string()),
        "label": pa.array(labels, pa.string()),
        "reason": pa.array(reasons, pa.string()),
    }, schema=contracts.REJECTS_SCHEMA)


def _require_file(path: Path, what: str, fix: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; {fix}")


# ----------------------------------------------------------------------------------------- COCO


def coco_source(annotations: Path) -> str:
    """'instances_train2017.json' -> 'coco_train2017'."""
    stem = annotations.stem
    stem = stem[len("instances_"):] if stem.startswith("instances_") else stem
    return "coco_" + re.sub(r"[^A-Za-z0-9]+", "_", stem)


def coco_key(source: str, image_id: int) -> str:
    return f"{source}_{int(image_id):012d}"


def read_coco(
    annotations: str | Path,
    images_dir: str | Path | None,
    *,
    source: str | None = None,
    check_files: bool = True,
) -> ReadResult:
    """Read a COCO instances JSON (through pycocotools) into images/boxes tables.

    `images_dir` is the folder holding the `file_name`s (e.g. `coco/train2017`); with
    `check_files`, images whose file is missing are dropped with their boxes (reason
    `missing_image`). Crowd annotations (`iscrowd=1`) are kept with `is_group=True`.
    """
    annotations = Path(annotations)
    _require_file(annotations, "COCO annotation file", "pass the path of instances_<split>2017.json")
    coco = _load_coco(annotations)
    data = coco.dataset
    source = source or coco_source(annotations)
    images_dir = Path(images_dir) if images_dir is not None else None

    # Images: every listed image (whose file exists, with `check_files`).
    ims = data["images"]
    _require_fields(ims, COCO_IMAGE_FIELDS, annotations, "images")
    ids = np.fromiter((im["id"] for im in ims), np.int64, len(ims))
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        where = np.flatnonzero(ids == dup[0]).tolist()
        raise ReaderError(
            f"{annotations}: duplicate image id(s) {dup[:10].tolist()}{' ...' if len(dup) > 10 else ''} "
            f"in 'images' (id {int(dup[0])} at images{where}); each image must be listed once"
        )
    paths = [str(images_dir / im["file_name"]) if images_dir is not None else im["file_name"] for im in ims]
    present = np.ones(len(ims), dtype=bool)
    if check_files and images_dir is not None:
        present = np.fromiter((os.path.isfile(p) for p in paths), bool, len(ims))
    keep_im = np.flatnonzero(present)
    width = np.fromiter((im["width"] for im in ims), np.int64, len(ims))
    height = np.fromiter((im["height"] for im in ims), np.int64, len(ims))
    keys = np.array([coco_key(source, i) for i in ids], dtype=object)
    images = pa.table({
        "key": pa.array(keys[keep_im], pa.string()),
        "source": pa.array([source] * len(keep_im), pa.string()),
        "image_id": pa.array(ids[keep_im].astype(str), pa.string()),
        "path": pa.array([paths[i] for i in keep_im], pa.string()),
        "width": pa.array(width[keep_im], pa.int32()),
        "height": pa.array(height[keep_im], pa.int32()),
    }, schema=contracts.IMAGES_SCHEMA)

    # Annotations, as arrays: one pass per field, no per-row Python work beyond extraction.
    anns = data["annotations"]
    _require_fields(anns, COCO_ANNOTATION_FIELDS, annotations, "annotations")
    n = len(anns)
    image_ids = np.fromiter((a["image_id"] for a in anns), np.int64, n)
    cat_ids = np.fromiter((a["category_id"] for a in anns), np.int64, n)
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, n)
    bbox = _bbox_array(anns)
    # Each annotation's image among the present ones (sorted search instead of a dict lookup).
    order = np.argsort(ids[keep_im], kind="stable")
    sorted_ids = ids[keep_im][order]
    pos = np.clip(np.searchsorted(sorted_ids, image_ids), 0, max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[pos] == image_ids) if len(sorted_ids) else np.zeros(n, bool)
    row_im = np.where(found, keep_im[order][pos] if len(sorted_ids) else 0, -1)
    wh = np.full((n, 2), np.nan)
    wh[found] = np.stack([width[row_im[found]], height[row_im[found]]], axis=1)
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    x, y, w, h = bbox.T
    with np.errstate(invalid="ignore"):
        masks = {
            "nan_box": ~np.isfinite(bbox).all(axis=1),
            "inverted_box": (w < 0) | (h < 0),
            "zero_area_box": (w == 0) | (h == 0),
            "out_of_range_box": found & (
                (x < -COCO_EDGE_TOLERANCE) | (y < -COCO_EDGE_TOLERANCE)
                | (x + w > wh[:, 0] + COCO_EDGE_TOLERANCE) | (y + h > wh[:, 1] + COCO_EDGE_TOLERANCE)
            ),
            "unknown_label": ~np.isin(cat_ids, np.fromiter(cats, np.int64, len(cats))),
            "missing_image": ~found,
        }
    code = reason_codes(masks, n)
    gi = np.flatnonzero(code == 0)
    x1 = np.clip(x[gi], 0, wh[gi, 0])
    y1 = np.clip(y[gi], 0, wh[gi, 1])
    x2 = np.clip(x[gi] + w[gi], 0, wh[gi, 0])
    y2 = np.clip(y[gi] + h[gi], 0, wh[gi, 1])
    # Clipping can collapse a box that lay (within the tolerance) outside the image.
    keep = (x2 > x1) & (y2 > y1)
    code[gi[~keep]] = 1 + contracts.REJECT_REASONS.index("out_of_range_box")
    gi, x1, y1, x2, y2 = gi[keep], x1[keep], y1[keep], x2[keep], y2[keep]
    cat_list = sorted(cats)
    cat_names = np.array([cats[c] for c in cat_list], dtype=object)
    boxes = pa.table({
        "key": pa.array(keys[row_im[gi]], pa.string()),
        "label": pa.array(cat_names[np.searchsorted(cat_list, cat_ids[gi])], pa.string()),
        "category_id": pa.array(cat_ids[gi], pa.int32()),
        "x1": pa.array(x1, pa.float32()),
        "y1": pa.array(y1, pa.float32()),
        "x2": pa.array(x2, pa.float32()),
        "y2": pa.array(y2, pa.float32()),
        "is_group": pa.array(crowd[gi], pa.bool_()),
    }, schema=contracts.BOXES_SCHEMA)

    bad = np.flatnonzero(code)
    miss_im = np.flatnonzero(~present)
    rejects = pa.concat_tables([
        rejects_table(f"{annotations}:images", miss_im.tolist(), ids[miss_im].astype(str).tolist(),
                      [None] * len(miss_im), ["missing_image"] * len(miss_im)),
        rejects_table(f"{annotations}:annotations", bad.tolist(), image_ids[bad].astype(str).tolist(),
                      [cats.get(int(c), str(int(c))) for c in cat_ids[bad]], REASON_NAMES[code[bad]].tolist()),
    ])
    return ReadResult(
        contracts.conform(images, contracts.IMAGES, str(annotations)),
        contracts.conform(boxes, contracts.BOXES, str(annotations)),
        rejects,
        extra={"source": source, "annotations": str(annotations)},
    )


def _load_coco(annotations: Path):
    """pycocotools' COCO object for `annotations`, parsed with orjson (about 1.3x faster than json)."""
    import orjson
    from pycocotools.coco import COCO

    try:
        data = orjson.loads(annotations.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ReaderError(f"{annotations}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReaderError(f"{annotations}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ReaderError(
                f"{annotations}: missing top-level key '{key}'; a COCO instances file has "
                "'images', 'annotations' and 'categories'"
            )
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        coco.createIndex()
    return coco


def _require_fields(rows: list[dict], fields: tuple[str, ...], path: Path, what: str) -> None:
    need = set(fields)
    for i, r in enumerate(rows):
        if not need <= r.keys():
            missing = [k for k in fields if k not in r]
            raise ReaderError(f"{path}: {what}[{i}] lacks field(s) {missing} (needs {list(fields)})")


def _bbox_array(anns: list[dict]) -> np.ndarray:
    """(n, 4) float64 boxes; a malformed bbox (not 4 numbers) becomes a row of NaN."""
    try:
        out = np.array([a["bbox"] for a in anns], dtype=np.float64)
        if out.shape == (len(anns), 4):
            return out
    except (TypeError, ValueError):
        pass
    out = np.full((len(anns), 4), np.nan)
    for i, a in enumerate(anns):
        b = a["bbox"]
        if isinstance(b, (list, tuple)) and len(b) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in b):
            out[i] = b
    return out


# ----------------------------------------------------------------------------------- OpenImages


def openimages_source(boxes_csv: Path) -> str:
    """'oidv6-train-annotations-bbox.csv' -> 'openimages_train'."""
    for split in ("train", "validation", "test"):
        if re.search(rf"(^|[-_]){split}([-_]|$)", boxes_csv.stem):
            return f"openimages_{split}"
    return "openimages_" + re.sub(r"[^A-Za-z0-9]+", "_", boxes_csv.stem)


def openimages_key(source: str, image_id: str) -> str:
    return f"{source}_{image_id}"


def _read_header(path: Path) -> list[str]:
    """The column names of a CSV's first line (quoted or not, with or without a BOM)."""
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        first = f.readline()
    return [c.strip() for c in next(csv.reader([first]), [])]


def _bad_line(path: Path) -> str | None:
    """The first line whose field count differs from the header's (an unquoted comma, say), named
    by its line number; None where every row has the header's count. Only run on a failed read."""
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            rows = csv.reader(f)
            header = next(rows, [])
            for row in rows:
                if row and len(row) != len(header):
                    return (f"line {rows.line_num} has {len(row)} fields, the header {len(header)} "
                            "(a comma inside a value must be quoted)")
    except (csv.Error, UnicodeDecodeError):
        pass
    return None


_FLOAT_RE = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


def _read_boxes_csv(path: Path) -> pa.Table:
    """Read the used columns; coordinates that are not numbers become NaN (rejected later)."""
    coords = ("XMin", "XMax", "YMin", "YMax")
    read_opts = pacsv.ReadOptions(block_size=1 << 26)
    base_types = {"ImageID": pa.string(), "LabelName": pa.string()}
    try:
        return pacsv.read_csv(path, read_options=read_opts, convert_options=pacsv.ConvertOptions(
            include_columns=list(OPENIMAGES_USED),
            column_types={**base_types, "IsGroupOf": pa.int8(), **{c: pa.float64() for c in coords}},
        ))
    except pa.ArrowInvalid:
        pass  # some value is not a number: read as text and convert value by value
    base_types["IsGroupOf"] = pa.string()
    try:
        t = pacsv.read_csv(path, read_options=read_opts, convert_options=pacsv.ConvertOptions(
            include_columns=list(OPENIMAGES_USED),
            column_types={**base_types, **{c: pa.string() for c in coords}},
        ))
    except pa.ArrowInvalid as e:
        raise ReaderError(f"{path}: {_bad_line(path) or 'not a readable CSV'} ({e})") from None
    for c in coords:
        col = t.column(c)
        ok = pc.fill_null(pc.match_substring_regex(col, _FLOAT_RE), False)
        num = pc.cast(pc.if_else(ok, col, pa.scalar("nan")), pa.float64())
        t = t.set_column(t.schema.get_field_index(c), c, num)
    return t


def read_openimages_boxes(boxes_csv: str | Path, classes_csv: str | Path) -> tuple[pa.Table, pa.Table]:
    """Validate an OpenImages box CSV; return (normalised boxes, rejects).

    Normalised boxes follow NORMALIZED_SCHEMA (`row` is the CSV line, header = 1). Rows with a
    missing/NaN, inverted (min > max), zero-area (min == max) or out-of-[0, 1] coordinate, or a
    LabelName that is not a MID of `classes_csv`, are rejected.
    """
    boxes_csv, classes_csv = Path(boxes_csv), Path(classes_csv)
    _require_file(boxes_csv, "OpenImages box file", "pass the path of oidv6-<split>-annotations-bbox.csv")
    header = _read_header(boxes_csv)
    missing = [c for c in OPENIMAGES_USED if c not in header]
    if missing:
        raise ReaderError(
            f"{boxes_csv}: missing column(s) {missing}; the OpenImages V6 header is "
            f"{','.join(OPENIMAGES_HEADER)}"
        )
    classes = read_openimages_classes(classes_csv)
    t = _read_boxes_csv(boxes_csv)
    n = t.num_rows
    xmin, xmax, ymin, ymax = (np.asarray(t.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
                              for c in ("XMin", "XMax", "YMin", "YMax"))
    image_id = t.column("ImageID")
    label = t.column("LabelName")
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(xmin) & np.isfinite(xmax) & np.isfinite(ymin) & np.isfinite(ymax)
        masks = {
            "nan_box": ~finite,
            "inverted_box": (xmin > xmax) | (ymin > ymax),
            "zero_area_box": (xmin == xmax) | (ymin == ymax),
            "out_of_range_box": (np.minimum(xmin, ymin) < 0) | (np.maximum(xmax, ymax) > 1),
            "unknown_label": ~pc.fill_null(pc.is_in(label, value_set=pa.array(sorted(classes)), skip_nulls=True),
                                           False).to_numpy(zero_copy_only=False),
            "missing_image": ~pc.fill_null(pc.greater(pc.utf8_length(image_id), 0), False)
                              .to_numpy(zero_copy_only=False),
        }
    code = reason_codes(masks, n)
    good = code == 0
    line = np.arange(2, n + 2, dtype=np.int64)
    group = t.column("IsGroupOf")
    group = pc.fill_null(pc.equal(group, 1) if pa.types.is_integer(group.type)
                         else pc.equal(pc.utf8_trim_whitespace(group), "1"), False)
    all_good = bool(good.all())  # the usual case: no filtering, no copies

    def keep(col, mask):
        return col if all_good else col.filter(pa.array(mask))

    norm = pa.table({
        "image_id": keep(image_id, good),
        "label": keep(label, good),
        "xmin": pa.array(xmin if all_good else xmin[good], pa.float32()),
        "ymin": pa.array(ymin if all_good else ymin[good], pa.float32()),
        "xmax": pa.array(xmax if all_good else xmax[good], pa.float32()),
        "ymax": pa.array(ymax if all_good else ymax[good], pa.float32()),
        "is_group": keep(group, good),
        "row": pa.array(line if all_good else line[good], pa.int64()),
    }, schema=NORMALIZED_SCHEMA)
    bad = ~good
    rejects = pa.table({
        "source_file": pa.array(np.full(int(bad.sum()), str(boxes_csv), dtype=object), pa.string()),
        "row": pa.array(line[bad], pa.int64()),
        "image_id": image_id.filter(pa.array(bad)),
        "label": label.filter(pa.array(bad)),
        "reason": pa.array(REASON_NAMES[code[bad]], pa.string()),
    }, schema=contracts.REJECTS_SCHEMA)
    return norm, rejects


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, or None if the file is missing or not an image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (FileNotFoundError, OSError, ValueError, Image.DecompressionBombError):
        return None


def attach_images(
    norm: pa.Table,
    images_dir: str | Path,
    *,
    source: str,
    boxes_csv: str = "",
    image_ids: list[str] | None = None,
    threads: int = 8,
) -> ReadResult:
    """Turn normalised OpenImages boxes into images/boxes tables in pixels.

    Images are `images_dir/<ImageID>.jpg`; `image_ids` restricts the result to those images (all
    images of `norm` by default). Rows of images whose file is missing or unreadable are rejected
    with reason `missing_image`. Sizes are read from file headers (no decode), `threads` at a time.
    """
    images_dir = Path(images_dir)
    if image_ids is not None:
        norm = norm.filter(pc.is_in(norm.column("image_id"), value_set=pa.array(image_ids, pa.string())))
    ids = pc.unique(norm.column("image_id")).to_pylist() if image_ids is None else list(dict.fromkeys(image_ids))
    ids.sort()
    paths = [images_dir / f"{i}.jpg" for i in ids]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        sizes = list(pool.map(image_size, paths))
    found = [(i, p, s) for i, p, s in zip(ids, paths, sizes) if s is not None]
    images = pa.table({
        "key": pa.array([openimages_key(source, i) for i, _, _ in found], pa.string()),
        "source": pa.array([source] * len(found), pa.string()),
        "image_id": pa.array([i for i, _, _ in found], pa.string()),
        "path": pa.array([str(p) for _, p, _ in found], pa.string()),
        "width": pa.array([s[0] for _, _, s in found], pa.int32()),
        "height": pa.array([s[1] for _, _, s in found], pa.int32()),
    }, schema=contracts.IMAGES_SCHEMA)
    size_t = images.select(["image_id", "key", "width", "height"])
    joined = norm.join(size_t, keys="image_id", join_type="left outer")
    has_img = pc.is_valid(joined.column("width"))
    # The join does not keep row order: sort by image, then CSV line, so the output is deterministic.
    ok = joined.filter(has_img).sort_by([("key", "ascending"), ("row", "ascending")])
    w = pc.cast(ok.column("width"), pa.float32())
    h = pc.cast(ok.column("height"), pa.float32())
    boxes = pa.table({
        "key": ok.column("key"),
        "label": ok.column("label"),
        "category_id": pa.array(np.full(ok.num_rows, -1, np.int32)),
        "x1": pc.multiply(ok.column("xmin"), w),
        "y1": pc.multiply(ok.column("ymin"), h),
        "x2": pc.multiply(ok.column("xmax"), w),
        "y2": pc.multiply(ok.column("ymax"), h),
        "is_group": ok.column("is_group"),
    })
    miss = joined.filter(pc.invert(has_img))
    rejects = rejects_table(
        boxes_csv, miss.column("row").to_pylist(), miss.column("image_id").to_pylist(),
        miss.column("label").to_pylist(), ["missing_image"] * miss.num_rows,
    )
    rejects = rejects.sort_by([("row", "ascending")])
    return ReadResult(
        contracts.conform(images, contracts.IMAGES, str(images_dir)),
        contracts.conform(boxes, contracts.BOXES, boxes_csv or str(images_dir)),
        rejects,
        extra={"source": source},
    )


def read_openimages(
    boxes_csv: str | Path,
    classes_csv: str | Path,
    images_dir: str | Path,
    *,
    source: str | None = None,
) -> ReadResult:
    """Both OpenImages steps: validate the CSV, then resolve every image's size from its file."""
    boxes_csv = Path(boxes_csv)
    source = source or openimages_source(boxes_csv)
    norm, rejects = read_openimages_boxes(boxes_csv, classes_csv)
    res = attach_images(norm, images_dir, source=source, boxes_csv=str(boxes_csv))
    res.rejects = pa.concat_tables([rejects, res.rejects]).sort_by([("row", "ascending")])
    res.extra.update({"boxes_csv": str(boxes_csv), "csv_rows": norm.num_rows + rejects.num_rows})
    return res


# ----------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.readers", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="format", required=True)
    c = sub.add_parser("coco", help="COCO instances JSON -> tables")
    c.add_argument("--annotations", required=True, type=Path)
    c.add_argument("--images", required=True, type=Path, help="folder holding the file_names")
    c.add_argument("--out", required=True, type=Path)
    o = sub.add_parser("openimages", help="OpenImages box CSV -> tables")
    o.add_argument("--boxes", required=True, type=Path)
    o.add_argument("--classes", required=True, type=Path)
    o.add_argument("--images", required=True, type=Path, help="folder holding <ImageID>.jpg")
    o.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    if args.format == "coco":
        res = read_coco(args.annotations, args.images)
    else:
        res = read_openimages(args.boxes, args.classes, args.images)
    res.write(args.out)
    print(json.dumps(res.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
