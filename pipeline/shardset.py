"""The shard set: the one definition of what `pipeline.shards` writes and the training stream,
the benchmarks and the browser read.

A shard set is a folder (or object-store prefix, see `pipeline.storage`) holding:

    train-000000.tar                   WebDataset tar: per sample `<key>.jpg` (JPEG bytes) then
                                       `<key>.json` (META_FIELDS of its images-table row)
    train-000000.proposals.parquet     the sidecar: the shard's proposals (PROPOSALS contract), in
                                       the tar's sample order, then rank
    train-000000.stamp.json            what the shard was built from (the producer's rerun check)
    ...
    plan.sha256                        the plan (settings, keys per shard) the shards belong to
    index.json                         INDEX_FIELDS; one ENTRY_FIELDS entry per shard. Written
                                       last: a set without it is not finished.

Keys hold no '.', so a tar member's name splits into (key, extension) at its first '.'.
`read_index` reads and checks `index.json`, `shards` lists the shards (and their sidecars) a
reader uses, `samples` iterates a tar, `read_sidecar` reads a sidecar under the contract, and
`validate` checks a whole set.
"""
from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from pipeline import contracts, storage

SHARD_PREFIX = "train-"                      # every file of a shard starts with it (tar, sidecar, stamp)
SHARD_PATTERN = SHARD_PREFIX + "{:06d}.tar"
SHARD_GLOB = SHARD_PREFIX + "*.tar"
PROPOSALS_SUFFIX = ".proposals.parquet"
STAMP_SUFFIX = ".stamp.json"
INDEX_NAME = "index.json"
PLAN_NAME = "plan.sha256"
MEMBERS = ("jpg", "json")                 # tar member extensions of a sample, in tar order
IMAGE_MEMBER, META_MEMBER = MEMBERS
META_FIELDS = ("key", "source", "image_id", "width", "height")   # the `json` member
INDEX_FIELDS = ("shards", "total_samples", "total_boxes", "failures", "failure_reasons", "settings",
                "images_table")
ENTRY_FIELDS = ("name", "samples", "boxes", "reencoded", "sha256", "proposals", "proposals_sha256", "failures")
REBUILD = "rebuild the shards with `dvc repro shards` (python -m pipeline.shards)"


class ShardDataError(RuntimeError):
    """A shard set that cannot be used: a missing or unreadable index, shard or sidecar, or a
    reader that read nothing usable for too long. The message names the files and what to do."""


def shard_name(index: int) -> str:
    """3 -> 'train-000003.tar'."""
    return SHARD_PATTERN.format(index)


def proposals_name(shard: str) -> str:
    """'train-000003.tar' -> 'train-000003.proposals.parquet'."""
    return shard.removesuffix(".tar") + PROPOSALS_SUFFIX


def stamp_name(shard: str) -> str:
    """'train-000003.tar' -> 'train-000003.stamp.json'."""
    return shard.removesuffix(".tar") + STAMP_SUFFIX


def sidecar_of(shard: str | Path) -> str:
    """The sidecar location of a shard location (path or URL)."""
    return proposals_name(str(shard))


def member_names(key: str) -> tuple[str, ...]:
    """The tar members of sample `key`, in order: ('<key>.jpg', '<key>.json')."""
    return tuple(f"{key}.{ext}" for ext in MEMBERS)


def sidecars(folder: str | Path) -> list[str]:
    """Every sidecar (proposal table) of a shard set, sorted: what a browser or checker reads."""
    return storage.glob(storage.join(folder, SHARD_GLOB.removesuffix(".tar") + PROPOSALS_SUFFIX))


def read_index(folder: str | Path) -> dict:
    """`index.json` of a shard set, checked for what every reader needs (`shards` and
    `total_samples`; each entry's `name` and `samples`); a missing or unreadable index, or one
    without those fields, is a ShardDataError naming it. (`validate` checks a whole set.)"""
    loc = storage.join(folder, INDEX_NAME)
    try:
        index = json.loads(storage.read_text(loc))
    except FileNotFoundError as e:
        raise ShardDataError(f"no shard index {loc}: {REBUILD}") from e
    except Exception as e:  # noqa: BLE001 - unreadable, not JSON, storage unreachable
        raise ShardDataError(f"cannot read the shard index {loc}: {type(e).__name__}: {e}; {REBUILD}") from e
    try:
        missing = [f for f in ("shards", "total_samples") if f not in index]
        missing += [f"shards[{i}].{f}" for i, s in enumerate(index["shards"]) for f in ("name", "samples")
                    if f not in s]
    except (TypeError, KeyError) as e:
        raise ShardDataError(f"cannot read the shard index {loc}: {type(e).__name__}: {e}; {REBUILD}") from e
    if missing:
        raise ShardDataError(f"cannot read the shard index {loc}: KeyError: missing {', '.join(missing)}; {REBUILD}")
    return index


def shards(folder: str | Path, index: dict | None = None, check: bool = True) -> tuple[list[str], int]:
    """(locations of the shards holding samples, total samples) of a shard set. With `check`, a
    listed shard or sidecar that is not there is a ShardDataError naming it."""
    index = read_index(folder) if index is None else index
    found = [storage.join(folder, s["name"]) for s in index["shards"] if s["samples"] > 0]
    if check:
        missing = [p for loc in found for p in (loc, sidecar_of(loc)) if not storage.isfile(p)]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ShardDataError(f"{storage.join(folder, INDEX_NAME)} lists files that are not there: "
                                 f"{', '.join(missing[:5])}{more}; {REBUILD}")
    return found, int(index["total_samples"])


def samples(fileobj) -> Iterator[dict[str, bytes | str]]:
    """The samples of a tar stream, in order: {"__key__": key, ext: bytes, ...}. Raises what
    tarfile raises on a truncated or corrupt tar (after yielding the samples before it)."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        current: dict = {}
        for member in tar:
            if not member.isreg():
                continue
            key, _, ext = member.name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current.setdefault("__key__", key)
            current[ext] = tar.extractfile(member).read()
        if current:
            yield current


def read_sidecar(loc: str | Path) -> pa.Table:
    """A shard's proposal table, validated against the PROPOSALS contract (file named in errors)."""
    return storage.read_table(loc, contracts.PROPOSALS)


def validate(folder: str | Path, checksums: bool = False, index: dict | None = None,
             read_tars: bool = True) -> dict:
    """Check a whole shard set: the index (read from `folder`, or the one about to be written),
    every listed shard and sidecar present, every sidecar a PROPOSALS table with the entry's box
    count; with `read_tars`, the tar's sample count and only keys of its samples in the sidecar;
    with `checksums`, the files' sha256 against the index. Returns the index; raises ShardDataError."""
    index = read_index(folder) if index is None else index
    shards(folder, index)
    for entry in index["shards"]:
        loc = storage.join(folder, entry["name"])
        side = sidecar_of(loc)
        if entry["samples"] == 0 and not storage.isfile(loc):
            continue
        try:
            table = read_sidecar(side)
            keys = None
            if read_tars:
                with storage.open(loc, "rb") as f:
                    keys = {s["__key__"] for s in samples(f)}
        except Exception as e:  # noqa: BLE001 - contract, storage or tar error: name the file
            raise ShardDataError(f"shard {loc} or its sidecar {side}: {type(e).__name__}: {e}; {REBUILD}") from e
        problems = []
        if keys is not None and len(keys) != entry["samples"]:
            problems.append(f"{len(keys)} samples in the tar, index.json says {entry['samples']}")
        if "boxes" in entry and table.num_rows != entry["boxes"]:
            problems.append(f"{table.num_rows} proposals in {side}, index.json says {entry['boxes']}")
        strangers = set(table.column("key").to_pylist()) - keys if keys is not None else set()
        if strangers:
            problems.append(f"{side} holds keys not in the shard: {sorted(strangers)[:3]}")
        if checksums and entry.get("sha256") not in (None, storage.sha256(loc)):
            problems.append(f"{loc} does not match its sha256 in index.json")
        if checksums and entry.get("proposals_sha256") not in (None, storage.sha256(side)):
            problems.append(f"{side} does not match its sha256 in index.json")
        if problems:
            raise ShardDataError(f"shard set {folder}: {'; '.join(problems)}; {REBUILD}")
    return index
