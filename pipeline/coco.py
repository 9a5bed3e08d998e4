"""COCO reading: an instances JSON (through pycocotools) into the images / boxes / rejects tables.

`load_coco` parses and checks the file, `coco_tables` applies the box rule every COCO consumer
shares (training tables, evaluation targets) and `read_coco` does both. The reject bookkeeping
(`ReadResult`, reasons) is `pipeline.readers`'.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import contracts
from pipeline.readers import REASON_NAMES, ReaderError, ReadResult, _require_file, reason_codes, rejects_table

COCO_IMAGE_FIELDS = ("id", "file_name", "width", "height")
COCO_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox")
# COCO boxes are floats from polygon extents; allow this much overshoot (pixels) before rejecting,
# and clip what is allowed.
COCO_EDGE_TOLERANCE = 1.0


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
    `missing_image`). The box rule is `coco_tables`'; crowd annotations (`iscrowd=1`) are kept
    with `is_group=True`.
    """
    annotations = Path(annotations)
    return coco_tables(load_coco(annotations), annotations, images_dir, source=source,
                       check_files=check_files).result


@dataclass
class CocoTables:
    """`coco_tables`' answer: the tables, and for each row of `result.boxes` the index of its
    annotation in the JSON's `annotations` list (for what the tables leave out: masks)."""

    result: ReadResult
    annotation_rows: np.ndarray


def coco_tables(coco, annotations: Path, images_dir: str | Path | None, *, source: str | None = None,
                check_files: bool = True) -> CocoTables:
    """The images/boxes/rejects tables of a loaded COCO object (`load_coco`), in steps.

    The box rule (every COCO consumer's, through this function): an annotation is rejected,
    with its reason, when its bbox is not 4 finite numbers (`nan_box`), has a negative width or
    height (`inverted_box`), a zero one (`zero_area_box`), reaches more than
    COCO_EDGE_TOLERANCE pixels outside its image (`out_of_range_box`), names a category absent
    from `categories` (`unknown_label`) or an image that is not listed or has no file
    (`missing_image`). A kept box is clipped to its image, and rejected as `out_of_range_box`
    when the clipping leaves no area. Boxes of any positive size are kept, however small;
    crowd annotations are kept with `is_group=True` (whether to use them is the consumer's call).
    """
    data = coco.dataset
    source = source or coco_source(annotations)
    images_dir = Path(images_dir) if images_dir is not None else None
    ims = _coco_images(data["images"], annotations, source, images_dir, check_files)
    anns = _coco_annotations(data["annotations"], annotations)
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    row_im, found = _image_rows(ims, anns.image_ids)
    wh = np.full((len(found), 2), np.nan)
    wh[found] = np.stack([ims.width[row_im[found]], ims.height[row_im[found]]], axis=1)
    code = _coco_reject_codes(anns, cats, wh, found)
    gi, xyxy = _clip_good_boxes(anns.bbox, wh, code)
    cat_list = sorted(cats)
    cat_names = np.array([cats[c] for c in cat_list], dtype=object)
    boxes = pa.table({
        "key": pa.array(ims.keys[row_im[gi]], pa.string()),
        "label": pa.array(cat_names[np.searchsorted(cat_list, anns.cat_ids[gi])], pa.string()),
        "category_id": pa.array(anns.cat_ids[gi], pa.int32()),
        **{c: pa.array(xyxy[:, j], pa.float32()) for j, c in enumerate(("x1", "y1", "x2", "y2"))},
        "is_group": pa.array(anns.crowd[gi], pa.bool_()),
    }, schema=contracts.BOXES_SCHEMA)
    result = ReadResult(
        contracts.conform(ims.table, contracts.IMAGES, str(annotations)),
        contracts.conform(boxes, contracts.BOXES, str(annotations)),
        _coco_rejects(annotations, ims, anns, cats, code),
        extra={"source": source, "annotations": str(annotations)},
    )
    return CocoTables(result, gi)


@dataclass
class _CocoImages:
    """The `images` list as arrays (one entry per listed image) and the images table."""

    ids: np.ndarray
    width: np.ndarray
    height: np.ndarray
    keys: np.ndarray
    present: np.ndarray       # the file exists (always true without check_files)
    table: pa.Table           # the present images


def _coco_images(ims: list[dict], annotations: Path, source: str, images_dir: Path | None,
                 check_files: bool) -> _CocoImages:
    """Every listed image (whose file exists, with `check_files`); ids must be unique."""
    _require_fields(ims, COCO_IMAGE_FIELDS, annotations, "images")
    ids = np.fromiter((im["id"] for im in ims), np.int64, len(ims))
    _require_unique_ids(ids, annotations)
    paths = [str(images_dir / im["file_name"]) if images_dir is not None else im["file_name"] for im in ims]
    present = np.ones(len(ims), dtype=bool)
    if check_files and images_dir is not None:
        present = np.fromiter((os.path.isfile(p) for p in paths), bool, len(ims))
    keep = np.flatnonzero(present)
    width = np.fromiter((im["width"] for im in ims), np.int64, len(ims))
    height = np.fromiter((im["height"] for im in ims), np.int64, len(ims))
    keys = np.array([coco_key(source, i) for i in ids], dtype=object)
    table = pa.table({
        "key": pa.array(keys[keep], pa.string()),
        "source": pa.array([source] * len(keep), pa.string()),
        "image_id": pa.array(ids[keep].astype(str), pa.string()),
        "path": pa.array([paths[i] for i in keep], pa.string()),
        "width": pa.array(width[keep], pa.int32()),
        "height": pa.array(height[keep], pa.int32()),
    }, schema=contracts.IMAGES_SCHEMA)
    return _CocoImages(ids, width, height, keys, present, table)


def _require_unique_ids(ids: np.ndarray, annotations: Path) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        where = np.flatnonzero(ids == dup[0]).tolist()
        raise ReaderError(
            f"{annotations}: duplicate image id(s) {dup[:10].tolist()}{' ...' if len(dup) > 10 else ''} "
            f"in 'images' (id {int(dup[0])} at images{where}); each image must be listed once"
        )


@dataclass
class _CocoAnnotations:
    """The `annotations` list as arrays, one row per annotation."""

    image_ids: np.ndarray
    cat_ids: np.ndarray
    crowd: np.ndarray
    bbox: np.ndarray          # (n, 4) x, y, w, h; NaN rows where malformed


def _coco_annotations(anns: list[dict], annotations: Path) -> _CocoAnnotations:
    """One pass per field, no per-row Python work beyond extraction."""
    _require_fields(anns, COCO_ANNOTATION_FIELDS, annotations, "annotations")
    n = len(anns)
    return _CocoAnnotations(
        image_ids=np.fromiter((a["image_id"] for a in anns), np.int64, n),
        cat_ids=np.fromiter((a["category_id"] for a in anns), np.int64, n),
        crowd=np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, n),
        bbox=_bbox_array(anns),
    )


def _image_rows(ims: _CocoImages, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row in the images list, found) of each annotation's image among the present ones, by a
    sorted search instead of a dict lookup; row -1 where not found."""
    keep = np.flatnonzero(ims.present)
    order = np.argsort(ims.ids[keep], kind="stable")
    sorted_ids = ims.ids[keep][order]
    if not len(sorted_ids):
        return np.full(len(image_ids), -1), np.zeros(len(image_ids), bool)
    pos = np.clip(np.searchsorted(sorted_ids, image_ids), 0, len(sorted_ids) - 1)
    found = sorted_ids[pos] == image_ids
    return np.where(found, keep[order][pos], -1), found


def _coco_reject_codes(anns: _CocoAnnotations, cats: dict, wh: np.ndarray, found: np.ndarray) -> np.ndarray:
    """`reason_codes` of every annotation under the box rule (`coco_tables`), before clipping."""
    x, y, w, h = anns.bbox.T
    tol = COCO_EDGE_TOLERANCE
    with np.errstate(invalid="ignore"):
        masks = {
            "nan_box": ~np.isfinite(anns.bbox).all(axis=1),
            "inverted_box": (w < 0) | (h < 0),
            "zero_area_box": (w == 0) | (h == 0),
            "out_of_range_box": found & ((x < -tol) | (y < -tol) | (x + w > wh[:, 0] + tol) | (y + h > wh[:, 1] + tol)),
            "unknown_label": ~np.isin(anns.cat_ids, np.fromiter(cats, np.int64, len(cats))),
            "missing_image": ~found,
        }
    return reason_codes(masks, len(found))


def _clip_good_boxes(bbox: np.ndarray, wh: np.ndarray, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices, x1y1x2y2) of the good annotations, clipped to their image. Clipping can collapse
    a box that lay (within the tolerance) outside the image: its code becomes out_of_range_box
    (`code` is updated in place)."""
    gi = np.flatnonzero(code == 0)
    x, y, w, h = bbox[gi].T
    xyxy = np.stack([np.clip(x, 0, wh[gi, 0]), np.clip(y, 0, wh[gi, 1]),
                     np.clip(x + w, 0, wh[gi, 0]), np.clip(y + h, 0, wh[gi, 1])], axis=1).reshape(-1, 4)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    code[gi[~keep]] = 1 + contracts.REJECT_REASONS.index("out_of_range_box")
    return gi[keep], xyxy[keep]


def _coco_rejects(annotations: Path, ims: _CocoImages, anns: _CocoAnnotations, cats: dict,
                  code: np.ndarray) -> pa.Table:
    """Rejects: the images without a file, then the annotations with a nonzero code."""
    bad = np.flatnonzero(code)
    miss = np.flatnonzero(~ims.present)
    return pa.concat_tables([
        rejects_table(f"{annotations}:images", miss.tolist(), ims.ids[miss].astype(str).tolist(),
                      [None] * len(miss), ["missing_image"] * len(miss)),
        rejects_table(f"{annotations}:annotations", bad.tolist(), anns.image_ids[bad].astype(str).tolist(),
                      [cats.get(int(c), str(int(c))) for c in anns.cat_ids[bad]], REASON_NAMES[code[bad]].tolist()),
    ])


def load_coco(annotations: str | Path):
    """pycocotools' COCO object for `annotations`, parsed with orjson (about 1.3x faster than json);
    a missing file, invalid JSON or a missing top-level key is a ReaderError naming the file."""
    import orjson
    from pycocotools.coco import COCO

    annotations = Path(annotations)
    _require_file(annotations, "COCO annotation file", "pass the path of instances_<split>2017.json")
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
