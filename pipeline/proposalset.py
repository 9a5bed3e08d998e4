"""The proposals stage's output: the one definition of what `pipeline.proposals` writes and
`pipeline.shards`, the browser and the tests read (as `pipeline.shardset` is for the shards).

A proposals output is a folder (or object-store prefix, see `pipeline.storage`) holding:

    part-00000.parquet     the proposals (PROPOSALS contract) of `images_per_part` images, in the
                           images table's order; written last, so a part is finished once it exists
    part-00000.json        its sidecar: {"fingerprint": the run's, "images": one record per image
                           (key, path taken, box count, failure reason, decode notes, sha256)}
    ...
    summary.json           counts over every part (SUMMARY_NAME)
    failures.csv           key, path, reason, detail per failed image (FAILURES_NAME, FAILURES_SCHEMA)

Every `*.parquet` there is a proposal table. `read_parts` and `read_failures` are what a consumer
reads; `finished_parts` and `parts_with_new_bytes` decide what of a previous run's output a rerun
may reuse.
"""
from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline import contracts, storage

log = logging.getLogger(__name__)

PART_GLOB = "part-*.parquet"
FAILURES_NAME = "failures.csv"
SUMMARY_NAME = "summary.json"
FAILURES_SCHEMA = pa.schema([("key", pa.string()), ("path", pa.string()),
                             ("reason", pa.string()), ("detail", pa.string())])
_OUR_TMP = re.compile(r"^\.(part-\d{5}\.(parquet|json)|summary\.json|failures\.csv)\.tmp-[0-9a-f]{8}$")
_OUR_OUTPUT = re.compile(r"^part-\d{5}\.(parquet|json)$")


def part_name(index: int) -> str:
    """3 -> 'part-00003' (the parquet and its sidecar add '.parquet' and '.json')."""
    return f"part-{index:05d}"


def read_parts(folder: str | Path) -> pa.Table:
    """All proposal parts (`part-*.parquet`) of a proposals stage output (a path or URL)."""
    parts = storage.glob(storage.join(folder, PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"no proposal parts ({PART_GLOB}) in {folder}; run pipeline.proposals first")
    return pa.concat_tables([storage.read_table(p, contracts.PROPOSALS) for p in parts])


def read_failures(folder: str | Path) -> dict[str, str]:
    """key -> reason of the images the proposals stage failed (its `failures.csv`; none if absent)."""
    loc = storage.join(folder, FAILURES_NAME)
    if not storage.isfile(loc):
        log.warning("%s has no %s: no image is known to have failed the proposals stage", folder, FAILURES_NAME)
        return {}
    cols = FAILURES_SCHEMA.names
    t = pacsv.read_csv(io.BytesIO(storage.read_bytes(loc)), convert_options=pacsv.ConvertOptions(
        column_types={c: pa.string() for c in cols}, include_columns=cols, strings_can_be_null=False))
    return dict(zip(t.column("key").to_pylist(), t.column("reason").to_pylist()))


def read_records(folder: str | Path, index: int) -> list[dict]:
    """The per-image records of part `index`'s sidecar, in the images table's order."""
    return json.loads(storage.read_text(storage.join(folder, f"{part_name(index)}.json")))["images"]


def finished_parts(out: str | Path, n_parts: int, fp: str) -> set[int]:
    """Parts of `out` (path or URL) a previous run finished with the same fingerprint. Temporary
    files a killed run left behind are removed; if any part comes from a different run (other
    settings or images table), every output of the stage in `out` is removed (logged: the stage
    starts clean) and nothing is reused."""
    for f in storage.stale_temporaries(out):
        if _OUR_TMP.match(storage.name(f)):
            storage.remove(f)
    done, foreign = set(), []
    for f in storage.glob(storage.join(out, PART_GLOB)):
        m = re.fullmatch(r"part-(\d{5})\.parquet", storage.name(f))
        side = f.removesuffix(".parquet") + ".json"
        theirs = json.loads(storage.read_text(side)).get("fingerprint") if storage.isfile(side) else None
        if m is None or int(m.group(1)) >= n_parts or theirs != fp:
            foreign.append((storage.name(f), theirs))
        else:
            done.add(int(m.group(1)))
    if foreign:
        log.warning("%s holds %d part(s) of a different run (%s: fingerprint %s; this run %s: other settings, "
                    "images table or code): starting clean, the stage's outputs there are removed",
                    out, len(foreign), foreign[0][0], foreign[0][1], fp)
        _remove_outputs(out)
        done = set()
    return done


def _remove_outputs(out: str | Path) -> None:
    """Every output of the stage in `out`, and nothing else there."""
    for f in storage.glob(storage.join(out, PART_GLOB)):       # every table read_parts would read,
        side = f.removesuffix(".parquet") + ".json"             # whatever its name, and its sidecar
        for loc in (f, side) if storage.isfile(side) else (f,):
            storage.remove(loc)
    for f in storage.glob(storage.join(out, "part-*.json")):    # sidecars left without their table
        if _OUR_OUTPUT.match(storage.name(f)):
            storage.remove(f)
    for name in (SUMMARY_NAME, FAILURES_NAME):
        if storage.isfile(storage.join(out, name)):
            storage.remove(storage.join(out, name))


def parts_with_new_bytes(out: str | Path, done: set[int], locations: list[str], per_part: int) -> set[int]:
    """The finished parts of `done` holding an image whose bytes are not those searched (the
    sha256 its sidecar recorded: a file fixed, replaced or gone under the same key and path; the
    fingerprint covers keys, paths and sizes, not bytes). `locations`: where each image of the
    table is read, in table order. Their parquet and sidecar are removed, so the run proposes them
    again; the rest stay reused. Reads every image of `done` once (`storage.digests`, several at a
    time; on object storage one GET per image); a store that cannot be reached raises."""
    parts = sorted(done)
    locs = [loc for p in parts for loc in locations[p * per_part:(p + 1) * per_part]]
    now = iter(storage.digests(locs))
    changed: dict[int, str] = {}
    for p in parts:
        records = read_records(out, p)
        part_now = [next(now) for _ in locations[p * per_part:(p + 1) * per_part]]
        for rec, digest in zip(records, part_now):
            if rec.get("sha256") != digest:
                changed.setdefault(p, rec["key"])
    if changed:
        log.info("%d finished part(s) hold images whose bytes changed (e.g. %s in %s): proposing them again",
                 len(changed), next(iter(changed.values())), part_name(next(iter(changed))))
        for p in changed:
            storage.remove(storage.join(out, f"{part_name(p)}.parquet"))     # the parquet first: a part
            storage.remove(storage.join(out, f"{part_name(p)}.json"))        # is finished while it exists
    return set(changed)
