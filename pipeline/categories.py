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


COCO_OPENIMAGES_CSV = MANIFESTS / "coco_openimages_classes.csv"
MAPPING_COLUMNS = ("coco_id", "coco_name", "mid", "openimages_name")


@dataclass(frozen=True)
class ClassMapping:
    """COCO category <-> OpenImages MIDs. A COCO class may have several MIDs; a MID one COCO class."""

    mid_to_coco: dict[str, int]          # MID -> COCO category id
    coco_names: dict[int, str]           # COCO id -> name, for every COCO category

    def coco_ids(self) -> list[int]:
        return sorted(self.coco_names)


def read_class_mapping(
    path: str | Path = COCO_OPENIMAGES_CSV,
    openimages_classes: dict[str, str] | None = None,
) -> ClassMapping:
    """Read and check a COCO <-> OpenImages mapping table (columns MAPPING_COLUMNS).

    Joined on MIDs, never on display names: every MID must exist in `openimages_classes` (default:
    the V6 boxable list in data_manifests/), every COCO id must be a COCO category, and a MID may
    map to one COCO class only. Errors name the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class mapping {path} does not exist; the default is {COCO_OPENIMAGES_CSV}")
    classes = openimages_classes if openimages_classes is not None else read_openimages_classes()
    coco = {c.id: c.name for c in coco_categories()}
    mid_to_coco: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MAPPING_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(MAPPING_COLUMNS)}")
        for line, r in enumerate(reader, start=2):
            cid, mid = int(r["coco_id"]), r["mid"]
            if cid not in coco:
                raise ValueError(f"{path}, line {line}: {cid} is not a COCO category id")
            if mid not in classes:
                raise ValueError(f"{path}, line {line}: MID {mid} ({r['openimages_name']}) is not in the "
                                 "OpenImages class list; fix the MID (names are not used for joining)")
            if mid in mid_to_coco and mid_to_coco[mid] != cid:
                raise ValueError(f"{path}, line {line}: MID {mid} maps to two COCO classes "
                                 f"({coco[mid_to_coco[mid]]} and {coco[cid]})")
            mid_to_coco[mid] = cid
    return ClassMapping(mid_to_coco, coco)
