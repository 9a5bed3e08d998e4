"""Readers: COCO instances JSON and OpenImages box CSVs into the images / boxes tables.

    python -m pipeline.readers coco --annotations coco/annotations/instances_train2017.json \
        --images coco/train2017 --out data/tables/coco_train2017
    python -m pipeline.readers openimages --boxes openimages/oidv6-train-annotations-bbox.csv \
        --classes openimages/class-descriptions-boxable.csv --images openimages/train \
        --out data/tables/openimages_train
    python -m pipeline.readers rebase --images data/openimage_mini/images.parquet \
        --prefix data/synth/openimages/train --to s3://bucket/openimages/train \
        --out s3://bucket/openimage_mini/images.parquet

`rebase` points an images table at the copy of its images in object storage (or another folder):
every `path` under `--prefix` gets `--to` instead, the rest of the table unchanged. A row outside
the prefix is an error naming its key and path; the first rebased location is checked to exist.

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

This module holds what both sources share (`ReaderError`, `ReadResult`, the reject reasons and
table, `image_size`) and the CLI; the readers themselves are `pipeline.coco` and
`pipeline.openimages`, whose public names are importable from here too (resolved on first use,
since both modules import this one).
"""
from __future__ import annotations

import importlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import cli, contracts
from pipeline.files import write_text

if TYPE_CHECKING:  # the names re-exported lazily by __getattr__ below
    from pipeline.coco import (  # noqa: F401
        COCO_ANNOTATION_FIELDS, COCO_EDGE_TOLERANCE, COCO_IMAGE_FIELDS, CocoTables, coco_key, coco_source,
        coco_tables, load_coco, read_coco,
    )
    from pipeline.openimages import (  # noqa: F401
        NORMALIZED_SCHEMA, OPENIMAGES_HEADER, OPENIMAGES_USED, attach_images, openimages_key,
        openimages_source, read_openimages, read_openimages_boxes,
    )

log = logging.getLogger(__name__)

# Public names of the per-source modules, importable from here: name -> module.
_REEXPORTS = {
    **dict.fromkeys((
        "COCO_ANNOTATION_FIELDS", "COCO_EDGE_TOLERANCE", "COCO_IMAGE_FIELDS", "CocoTables", "coco_key",
        "coco_source", "coco_tables", "load_coco", "read_coco",
    ), "pipeline.coco"),
    **dict.fromkeys((
        "NORMALIZED_SCHEMA", "OPENIMAGES_HEADER", "OPENIMAGES_USED", "attach_images", "openimages_key",
        "openimages_source", "read_openimages", "read_openimages_boxes",
    ), "pipeline.openimages"),
}


def __getattr__(name: str):
    """`from pipeline.readers import read_coco` etc.: the name from its source module. Lazy because
    `pipeline.coco` and `pipeline.openimages` import this module (a top-level import would be a cycle)."""
    module = _REEXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_REEXPORTS))


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


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, or None if the file is missing or not an image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (FileNotFoundError, OSError, ValueError, Image.DecompressionBombError):
        return None


def rebase(images: pa.Table, prefix: str, to: str) -> pa.Table:
    """`images` with each `path` under `prefix` (a folder or URL prefix) moved under `to`. Raises
    ReaderError naming the first row whose path is not under `prefix`."""
    prefix, to = str(prefix).rstrip("/"), str(to).rstrip("/")
    paths = images.column("path").to_pylist()
    moved = []
    for i, (key, path) in enumerate(zip(images.column("key").to_pylist(), paths)):
        if path != prefix and not path.startswith(prefix + "/"):
            raise ReaderError(f"row {i} (key {key}): its path {path} is not under --prefix {prefix}; give "
                              "the folder (or URL prefix) every row's path starts with")
        moved.append(to + path[len(prefix):])
    return images.set_column(images.schema.get_field_index("path"), "path", pa.array(moved, pa.string()))


def _rebase_cli(args) -> None:
    from pipeline import storage

    table = rebase(storage.read_table(args.images, contracts.IMAGES), args.prefix, args.to)
    if table.num_rows and not args.no_check and not storage.exists(table.column("path")[0].as_py()):
        raise ReaderError(f"{table.column('path')[0].as_py()} (row 0 after rebasing) does not exist; copy the "
                          f"images there first, or check --to (pass --no-check to write the table anyway)")
    storage.write_table(table, args.out, contracts.IMAGES)
    log.info("wrote %s: %d images under %s", args.out, table.num_rows, args.to)


# ----------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipeline.readers", __doc__)
    sub = p.add_subparsers(dest="format", required=True)
    c = sub.add_parser("coco", help="COCO instances JSON -> tables")
    c.add_argument("--annotations", required=True, type=Path, help="instances_<split>2017.json")
    c.add_argument("--images", required=True, type=Path, help="folder holding the file_names")
    c.add_argument("--out", required=True, type=Path, help="folder for the tables and summary.json")
    o = sub.add_parser("openimages", help="OpenImages box CSV -> tables")
    o.add_argument("--boxes", required=True, type=Path, help="oidv6-<split>-annotations-bbox.csv")
    o.add_argument("--classes", required=True, type=Path, help="class-descriptions-boxable.csv")
    o.add_argument("--images", required=True, type=Path, help="folder holding <ImageID>.jpg")
    o.add_argument("--out", required=True, type=Path, help="folder for the tables and summary.json")
    r = sub.add_parser("rebase", help="an images table with its paths moved to another folder or URL prefix")
    r.add_argument("--images", required=True, help="images table (path or URL)")
    r.add_argument("--prefix", required=True, help="what every row's path starts with now")
    r.add_argument("--to", required=True, help="what it starts with in the output (e.g. s3://bucket/train)")
    r.add_argument("--out", required=True, help="the rebased images table (path or URL)")
    r.add_argument("--no-check", action="store_true", help="do not check that the first rebased path exists")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    from pipeline import storage

    try:
        _run_cli(args)
    except (ReaderError, FileNotFoundError, storage.StorageError) as e:     # bad input: one line naming it
        log.error("%s", e)
        return 1
    return 0


def _run_cli(args) -> None:
    if args.format == "rebase":
        _rebase_cli(args)
        return
    from pipeline.coco import read_coco
    from pipeline.openimages import read_openimages

    if args.format == "coco":
        res = read_coco(args.annotations, args.images)
    else:
        res = read_openimages(args.boxes, args.classes, args.images)
    res.write(args.out)
    summary = res.summary()
    log.info("wrote %s: %d images, %d boxes, %d rejected %s", args.out, summary["images"], summary["boxes"],
             summary["rejected"], {k: v for k, v in summary["rejected_by_reason"].items() if v})


if __name__ == "__main__":
    sys.exit(main())
