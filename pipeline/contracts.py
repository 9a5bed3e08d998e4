"""The artifact contracts: parquet schemas of the images, boxes, proposals and rejects tables.

Every stage reads and writes these tables through `read_table` / `write_table`, so a table that
breaks its contract is caught where it is made, with the file and the column named.

- images:    key, source, image_id, path, width, height
             `key` is stable, unique and is also the WebDataset `__key__` (so it holds no '.').
- boxes:     key, label, category_id, x1, y1, x2, y2, is_group
             `label` is the COCO category name or the OpenImages MID; `category_id` the COCO id or -1;
             coordinates are float32 pixels of the original image, x2 > x1 and y2 > y1.
             `is_group` (COCO `iscrowd`, OpenImages `IsGroupOf`): both data sets mark boxes that
             cover several instances, and the sampler and O-KNN must treat them apart.
- proposals: key, x1, y1, x2, y2, rank   (rank: the proposal's place, from 0, in the proposals
             stage's seeded order after filtering)
- rejects:   source_file, row, image_id, label, reason
             one row per input row a reader dropped, with the reason; `row` is the 1-based line of a
             CSV (header = line 1) or the 0-based index into a JSON list.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.files import atomic_path

KEY_PATTERN = r"^[A-Za-z0-9_\-]+$"

IMAGES_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])

BOXES_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("label", pa.string()),
    ("category_id", pa.int32()),
    ("x1", pa.float32()),
    ("y1", pa.float32()),
    ("x2", pa.float32()),
    ("y2", pa.float32()),
    ("is_group", pa.bool_()),
])

PROPOSALS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("x1", pa.float32()),
    ("y1", pa.float32()),
    ("x2", pa.float32()),
    ("y2", pa.float32()),
    ("rank", pa.int32()),
])

REJECTS_SCHEMA = pa.schema([
    ("source_file", pa.string()),
    ("row", pa.int64()),
    ("image_id", pa.string()),
    ("label", pa.string()),
    ("reason", pa.string()),
])

# Reasons a reader may give for dropping a row; the rejects table uses exactly these words.
REJECT_REASONS = (
    "nan_box",          # a coordinate is missing or NaN
    "inverted_box",     # min > max (OpenImages) or a negative width/height (COCO)
    "zero_area_box",    # min == max in x or y
    "out_of_range_box", # outside [0, 1] (OpenImages) or outside the image (COCO)
    "unknown_label",    # MID not in the class list, or COCO category id not in `categories`
    "missing_image",    # no image entry or no image file
)


class ContractError(ValueError):
    """A table that does not follow its contract."""


def _problems_keys(t: pa.Table, unique: bool) -> list[str]:
    out = []
    keys = t.column("key")
    if keys.null_count:
        out.append(f"{keys.null_count} null key(s)")
    bad = pc.invert(pc.fill_null(pc.match_substring_regex(keys, KEY_PATTERN), False))
    n_bad = pc.sum(bad).as_py() or 0
    if n_bad:
        first = keys.filter(bad)[0].as_py()
        out.append(f"{n_bad} key(s) not matching {KEY_PATTERN} (letters, digits, '_', '-'), e.g. {first!r}")
    if unique and pc.count_distinct(keys).as_py() != len(keys):
        out.append("duplicate keys")
    return out


def _problems_xyxy(t: pa.Table) -> list[str]:
    out = []
    for c in ("x1", "y1", "x2", "y2"):
        col = t.column(c)
        n = col.null_count + (pc.sum(pc.invert(pc.is_finite(col))).as_py() or 0)
        if n:
            out.append(f"{n} non-finite value(s) in {c}")
    if out:
        return out
    for lo, hi in (("x1", "x2"), ("y1", "y2")):
        n = pc.sum(pc.greater_equal(t.column(lo), t.column(hi))).as_py() or 0
        if n:
            out.append(f"{n} row(s) with {lo} >= {hi}")
    for c in ("x1", "y1"):
        n = pc.sum(pc.less(t.column(c), 0)).as_py() or 0
        if n:
            out.append(f"{n} row(s) with negative {c}")
    return out


def _check_images(t: pa.Table) -> list[str]:
    out = _problems_keys(t, unique=True)
    for c in ("width", "height"):
        col = t.column(c)
        if col.null_count or (pc.sum(pc.less_equal(col, 0)).as_py() or 0):
            out.append(f"non-positive or null {c}")
    if t.column("path").null_count:
        out.append("null path")
    return out


def _check_boxes(t: pa.Table) -> list[str]:
    out = _problems_keys(t, unique=False) + _problems_xyxy(t)
    if t.column("label").null_count:
        out.append("null label")
    return out


def _check_proposals(t: pa.Table) -> list[str]:
    out = _problems_keys(t, unique=False) + _problems_xyxy(t)
    rank = t.column("rank")
    if rank.null_count or (pc.sum(pc.less(rank, 0)).as_py() or 0):
        out.append("null or negative rank")
    return out


def _check_rejects(t: pa.Table) -> list[str]:
    reasons = t.column("reason")
    bad = pc.invert(pc.is_in(reasons, value_set=pa.array(REJECT_REASONS)))
    n = pc.sum(bad).as_py() or 0
    return [f"{n} unknown reason(s), valid: {list(REJECT_REASONS)}"] if n else []


@dataclass(frozen=True)
class Contract:
    name: str
    schema: pa.Schema
    check: Callable[[pa.Table], list[str]]


IMAGES = Contract("images", IMAGES_SCHEMA, _check_images)
BOXES = Contract("boxes", BOXES_SCHEMA, _check_boxes)
PROPOSALS = Contract("proposals", PROPOSALS_SCHEMA, _check_proposals)
REJECTS = Contract("rejects", REJECTS_SCHEMA, _check_rejects)


def conform(table: pa.Table, contract: Contract, where: str = "table") -> pa.Table:
    """Return `table` with exactly the contract's columns, order and types, or raise ContractError.

    Columns are cast where the cast is safe (e.g. int64 -> int32 without overflow, float64 ->
    float32); a missing or extra column and any value-level problem is an error naming `where`.
    """
    names = set(table.column_names)
    expected = contract.schema.names
    missing = [n for n in expected if n not in names]
    extra = sorted(names - set(expected))
    if missing or extra:
        raise ContractError(
            f"{where}: not a {contract.name} table: "
            + (f"missing column(s) {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected column(s) {extra}" if extra else "")
            + f". Expected exactly {expected}."
        )
    columns = []
    for field in contract.schema:
        col = table.column(field.name)
        if col.type != field.type:
            try:
                col = col.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ContractError(
                    f"{where}: column '{field.name}' has type {col.type}, expected {field.type} ({e})"
                ) from None
        columns.append(col)
    out = pa.Table.from_arrays(columns, schema=contract.schema)
    problems = contract.check(out) if len(out) else []
    if problems:
        raise ContractError(f"{where}: {contract.name} table breaks its contract: " + "; ".join(problems))
    return out


def empty(contract: Contract) -> pa.Table:
    return contract.schema.empty_table()


def write_table(table: pa.Table, path: str | Path, contract: Contract) -> Path:
    """Validate and atomically write `table` as parquet (zstd), tagged with the contract's name."""
    path = Path(path)
    table = conform(table, contract, where=str(path))
    table = table.replace_schema_metadata({b"d3ssl.contract": contract.name.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_table(path: str | Path, contract: Contract) -> pa.Table:
    """Read a parquet file written under `contract`, naming the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{contract.name} table {path} does not exist")
    return from_parquet(pq.read_table(path), contract, str(path))


def from_parquet(table: pa.Table, contract: Contract, where: str) -> pa.Table:
    """A table as read from a parquet file (at `where`: a path or URL), checked against `contract`:
    the contract tag it was written under, then the columns and types."""
    tag = (table.schema.metadata or {}).get(b"d3ssl.contract", b"").decode()
    if tag and tag != contract.name:
        raise ContractError(f"{where}: holds a {tag} table, expected a {contract.name} table")
    return conform(table.replace_schema_metadata(None), contract, where=where)


def read_tables(paths: Iterable[str | Path], contract: Contract) -> pa.Table:
    tables = [read_table(p, contract) for p in paths]
    return pa.concat_tables(tables) if tables else empty(contract)


def check_boxes_in_images(boxes: pa.Table, images: pa.Table, where: str = "boxes", tol: float = 1e-3) -> None:
    """Raise ContractError if a box's key is not in `images` or the box leaves its image."""
    joined = boxes.select(["key", "x2", "y2"]).join(
        images.select(["key", "width", "height"]), keys="key", join_type="left outer"
    )
    orphan = joined.column("width").null_count
    if orphan:
        raise ContractError(f"{where}: {orphan} box(es) whose key is not in the images table")
    over_x = pc.greater(joined.column("x2"), pc.add(pc.cast(joined.column("width"), pa.float32()), tol))
    over_y = pc.greater(joined.column("y2"), pc.add(pc.cast(joined.column("height"), pa.float32()), tol))
    n = pc.sum(pc.or_(over_x, over_y)).as_py() or 0
    if n:
        raise ContractError(f"{where}: {n} box(es) extend past the right or bottom edge of their image")
