"""OpenImages reading: the box CSV and class list into the images / boxes / rejects tables.

Read in two steps because OpenImages boxes are normalised to [0, 1] and pixel coordinates need
each image's size: `read_openimages_boxes` validates the CSV (no image needed, so the sampler can
pick images before they are downloaded) and `attach_images` resolves the sizes of the images that
are wanted from their file headers; `read_openimages` does both. The reject bookkeeping
(`ReadResult`, reasons) is `pipeline.readers`'.
"""
from __future__ import annotations

import csv
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline import contracts
from pipeline.categories import read_openimages_classes
from pipeline.readers import (
    REASON_NAMES, ReaderError, ReadResult, _require_file, image_size, reason_codes, rejects_table,
)

OPENIMAGES_HEADER = (
    "ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
    "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside",
)
OPENIMAGES_USED = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")

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
    xmin, xmax, ymin, ymax = (np.asarray(t.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
                              for c in ("XMin", "XMax", "YMin", "YMax"))
    code = _openimages_reject_codes(t, classes, xmin, xmax, ymin, ymax)
    good = code == 0
    line = np.arange(2, t.num_rows + 2, dtype=np.int64)
    all_good = bool(good.all())  # the usual case: no filtering, no copies

    def keep(col):
        return col if all_good else col.filter(pa.array(good))

    def keep_np(a):
        return a if all_good else a[good]

    norm = pa.table({
        "image_id": keep(t.column("ImageID")),
        "label": keep(t.column("LabelName")),
        "xmin": pa.array(keep_np(xmin), pa.float32()),
        "ymin": pa.array(keep_np(ymin), pa.float32()),
        "xmax": pa.array(keep_np(xmax), pa.float32()),
        "ymax": pa.array(keep_np(ymax), pa.float32()),
        "is_group": keep(_group_flags(t.column("IsGroupOf"))),
        "row": pa.array(keep_np(line), pa.int64()),
    }, schema=NORMALIZED_SCHEMA)
    bad = ~good
    rejects = pa.table({
        "source_file": pa.array(np.full(int(bad.sum()), str(boxes_csv), dtype=object), pa.string()),
        "row": pa.array(line[bad], pa.int64()),
        "image_id": t.column("ImageID").filter(pa.array(bad)),
        "label": t.column("LabelName").filter(pa.array(bad)),
        "reason": pa.array(REASON_NAMES[code[bad]], pa.string()),
    }, schema=contracts.REJECTS_SCHEMA)
    return norm, rejects


def _openimages_reject_codes(t: pa.Table, classes, xmin: np.ndarray, xmax: np.ndarray, ymin: np.ndarray,
                             ymax: np.ndarray) -> np.ndarray:
    """`reason_codes` of every CSV row (see `read_openimages_boxes`)."""
    image_id, label = t.column("ImageID"), t.column("LabelName")
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
    return reason_codes(masks, t.num_rows)


def _group_flags(group: pa.ChunkedArray) -> pa.ChunkedArray:
    """IsGroupOf as booleans: 1 is a group box; 0, empty or anything else is not."""
    return pc.fill_null(pc.equal(group, 1) if pa.types.is_integer(group.type)
                        else pc.equal(pc.utf8_trim_whitespace(group), "1"), False)

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
    images = _images_table(ids, images_dir, source, threads)
    size_t = images.select(["image_id", "key", "width", "height"])
    joined = norm.join(size_t, keys="image_id", join_type="left outer")
    has_img = pc.is_valid(joined.column("width"))
    # The join does not keep row order: sort by image, then CSV line, so the output is deterministic.
    boxes = _pixel_boxes(joined.filter(has_img).sort_by([("key", "ascending"), ("row", "ascending")]))
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


def _images_table(ids: list[str], images_dir: Path, source: str, threads: int) -> pa.Table:
    """The images table of the `ids` whose `images_dir/<ImageID>.jpg` has a readable header, in
    `ids` order; sizes read `threads` at a time."""
    paths = [images_dir / f"{i}.jpg" for i in ids]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        sizes = list(pool.map(image_size, paths))
    found = [(i, p, s) for i, p, s in zip(ids, paths, sizes) if s is not None]
    return pa.table({
        "key": pa.array([openimages_key(source, i) for i, _, _ in found], pa.string()),
        "source": pa.array([source] * len(found), pa.string()),
        "image_id": pa.array([i for i, _, _ in found], pa.string()),
        "path": pa.array([str(p) for _, p, _ in found], pa.string()),
        "width": pa.array([s[0] for _, _, s in found], pa.int32()),
        "height": pa.array([s[1] for _, _, s in found], pa.int32()),
    }, schema=contracts.IMAGES_SCHEMA)


def _pixel_boxes(ok: pa.Table) -> pa.Table:
    """Boxes table rows from normalised rows joined with their image's key, width and height."""
    w = pc.cast(ok.column("width"), pa.float32())
    h = pc.cast(ok.column("height"), pa.float32())
    return pa.table({
        "key": ok.column("key"),
        "label": ok.column("label"),
        "category_id": pa.array(np.full(ok.num_rows, -1, np.int32)),
        "x1": pc.multiply(ok.column("xmin"), w),
        "y1": pc.multiply(ok.column("ymin"), h),
        "x2": pc.multiply(ok.column("xmax"), w),
        "y2": pc.multiply(ok.column("ymax"), h),
        "is_group": ok.column("is_group"),
    })


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
