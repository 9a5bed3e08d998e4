"""Class lists: the 80 COCO categories and the 601 OpenImages boxable classes.

Both are read from `data_manifests/` (versioned, human-readable tables) or from the user's own
files. OpenImages classes are always keyed by MID, never by display name: display names differ
between releases (V4 "Organ" is V6 "Organ (Musical Instrument)"), MIDs do not.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

MANIFESTS = Path(__file__).resolve().parents[1] / "data_manifests"
COCO_CATEGORIES_CSV = MANIFESTS / "coco_categories.csv"
OPENIMAGES_CLASSES_CSV = MANIFESTS / "openimages" / "class-descriptions-boxable.csv"


@dataclass(frozen=True)
class CocoCategory:
    id: int
    name: str
    supercategory: str


def coco_categories(path: str | Path = COCO_CATEGORIES_CSV) -> list[CocoCategory]:
    """The 80 COCO 2017 categories with their real (non-contiguous) ids, in id order."""
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cats = [CocoCategory(int(r["id"]), r["name"], r["supercategory"]) for r in rows]
    if len(cats) != 80 or len({c.id for c in cats}) != 80:
        raise ValueError(f"{path}: expected 80 distinct COCO categories, found {len(cats)}")
    return cats


def read_openimages_classes(path: str | Path = OPENIMAGES_CLASSES_CSV) -> dict[str, str]:
    """MID -> display name from an OpenImages `class-descriptions-boxable.csv`.

    The official file has no header (rows `MID,DisplayName`); a header row starting with
    `LabelName` or `MID` is accepted and skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"OpenImages class list {path} does not exist; pass the path of "
            "class-descriptions-boxable.csv (a copy ships in data_manifests/openimages/)"
        )
    classes: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if line_no == 1 and row[0] in ("LabelName", "MID"):
                continue
            if len(row) < 2 or not row[0].startswith("/m/"):
                raise ValueError(
                    f"{path}, line {line_no}: expected 'MID,DisplayName' with a MID like /m/01g317, got {row!r}"
                )
            classes[row[0]] = row[1]
    if not classes:
        raise ValueError(f"{path}: no classes found")
    return classes
