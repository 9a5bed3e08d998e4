"""What of a previous `pipeline.shards` run a rerun may reuse: the stamps and the plan.

DVC keeps the shard folder between runs (`persist: true`), so the stage itself decides:
- `start_over_unless_same_plan`: shards of another plan (other keys per shard, other settings,
  another code version of the stage: any edit of its modules but a comment or docstring) are all
  removed, and so are shard files the plan does not name and a killed run's temporaries.
- `finished_entries`: a shard of the same plan is reused only if its stamp (`inputs_stamp`: a hash
  of everything it is built from, image bytes included) matches the inputs as they are now and
  its files match the checksums of its index entry. This reads every image of those shards once,
  `storage.DIGEST_THREADS` at a time; a store that cannot be reached raises (it is no change).
"""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa

from pipeline import images as image_io
from pipeline import shardset, storage
from pipeline.shardset import proposals_name, stamp_name

log = logging.getLogger(__name__)

ROW_FIELDS = ("key", "source", "image_id", "path", "width", "height")   # of an images-table row, in the stamp


def inputs_stamp(name: str, rows: list[dict], proposals: pa.Table, failed: dict[str, str],
                 digests: dict[str, str], jpeg_quality: int) -> str:
    """Hash of everything shard `name` is built from: its rows (in shard order; the path as the
    images table gives it), each image's bytes (`digests`: key -> `storage.digest`, "" when
    unreadable; none for images the proposals stage failed, which are not read), its proposal rows
    (in shard order, then rank), the proposals stage's failures, the setting, the decoding policy
    and Pillow (the re-encoded bytes depend on it)."""
    import PIL

    doc = {
        "name": name, "jpeg_quality": jpeg_quality, "decode": image_io.POLICY, "pillow": PIL.__version__,
        "rows": [[r[k] for k in ROW_FIELDS] + [failed.get(r["key"], ""), digests.get(r["key"], "")] for r in rows],
    }
    h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
    h.update(json.dumps(proposals.column("key").to_pylist()).encode())
    for col in ("x1", "y1", "x2", "y2", "rank"):
        h.update(np.ascontiguousarray(proposals.column(col).to_numpy()).tobytes())
    return h.hexdigest()


def location(row: dict) -> str:
    """Where a worker reads the image of an images-table `row`: `row["location"]` when the driver
    set it (`storage.worker_location` of the path), else the path itself."""
    return row.get("location", row["path"])


def _read_stamp(out: str, name: str) -> dict | None:
    """The stamp of shard `name` if its tar, sidecar and stamp all exist and the stamp parses."""
    files = (storage.join(out, name), storage.join(out, proposals_name(name)), storage.join(out, stamp_name(name)))
    if not all(storage.isfile(p) for p in files):
        return None
    try:
        stamp = json.loads(storage.read_text(files[2]))
        return stamp if isinstance(stamp.get("entry"), dict) else None
    except (ValueError, AttributeError):
        return None


def finished_entries(shards: list[tuple[str, list[dict], pa.Table, dict[str, str]]], out: str,
                     jpeg_quality: int) -> dict[str, dict]:
    """name -> index entry (as its stamp recorded it, failures included) of each shard of `shards`
    [(name, rows, proposals, failed)] that a previous run completed from the same inputs; a shard
    with a file missing, a checksum off, or any input changed (rows, image bytes, proposals, the
    proposals stage's failures, settings, decoding policy) is left out."""
    stamps = {name: s for name, *_ in shards if (s := _read_stamp(out, name)) is not None}
    wanted = [(name, rows, failed) for name, rows, _, failed in shards if name in stamps]
    locs = [location(r) for _, rows, failed in wanted for r in rows if r["key"] not in failed]
    locs += [storage.join(out, f) for name, *_ in wanted for f in (name, proposals_name(name))]
    digest = dict(zip(locs, storage.digests(locs)))
    reused = {}
    for name, rows, proposals, failed in shards:
        if name not in stamps:
            continue
        stamp, entry = stamps[name], stamps[name]["entry"]
        now = {r["key"]: digest[location(r)] for r in rows if r["key"] not in failed}
        if (stamp.get("inputs") == inputs_stamp(name, rows, proposals, failed, now, jpeg_quality)
                and digest[storage.join(out, name)] == entry.get("sha256")
                and digest[storage.join(out, proposals_name(name))] == entry.get("proposals_sha256")):
            reused[name] = entry
    return reused


def start_over_unless_same_plan(out: str, plan_hash: str, names: list[str]) -> None:
    """A previous run's shards are reused only if they come from the same plan (keys, settings and
    the code version of this stage, `pipeline.closure.code_version`: a docstring or comment edit is
    no change); shard files the plan does not name (`names`), from a run without a plan file or
    with more shards, and temporaries of a killed run are removed."""
    storage.makedirs(out)
    plan_loc = storage.join(out, shardset.PLAN_NAME)
    shard_files = storage.glob(storage.join(out, shardset.SHARD_PREFIX + "*"))
    if storage.isfile(plan_loc) and storage.read_text(plan_loc).strip() != plan_hash:
        log.warning("%s holds shards of another plan (other keys, shards settings or code): starting clean, "
                    "its shards and index are removed", out)
        stale = shard_files + [storage.join(out, shardset.INDEX_NAME)]
    else:
        ours = {f for n in names for f in (n, proposals_name(n), stamp_name(n))}
        stale = [f for f in shard_files if storage.name(f) not in ours]
        if stale:
            log.warning("%s holds %d shard file(s) this plan does not name (e.g. %s): removed",
                        out, len(stale), storage.name(stale[0]))
    for p in stale:
        if storage.exists(p):
            storage.remove(p)
    storage.write_text(plan_loc, plan_hash + "\n")
    for tmp in storage.stale_temporaries(out, shardset.SHARD_PREFIX):
        storage.remove(tmp)
