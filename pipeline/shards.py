"""WebDataset shards with a parquet proposal table beside each, written by a Ray job.

    python -m pipeline.shards --images data/openimage_mini/images.parquet --proposals data/proposals \
        --out data/shards [--samples-per-shard 256] [--ray-address ADDR] [--num-workers N] [--params params.yaml]

Every location may be a local path or an object-store URL (`s3://bucket/prefix`, see
`pipeline.storage`); so may the images table's `path` column. Layout of `--out` (the shard set,
defined in `pipeline.shardset`):

    train-000000.tar                     samples {__key__, jpg, json}: the JPEG bytes
    train-000000.proposals.parquet       the proposals (PROPOSALS contract) of exactly that shard's keys
    train-000000.stamp.json              what the shard was built from (hash) and its index entry
    ...
    index.json                           shards, sample and box counts, sha256 of every file, failures
    plan.sha256                          the plan (settings, keys per shard, code version) the shards belong to

Only what decodes fully at the images table's size is packed. Each image is read once and checked
with the decoding policy every stage shares (`pipeline.images`): a JPEG (header size, PIL's pixel
limit, then a draft decode at 1/8 scale, which still reads every entropy-coded byte) is packed as
its bytes unchanged up to its end-of-image marker, EXIF included (no stage applies EXIF
orientation; bytes appended after the marker are not image data and are not stored); anything else (PNG, ...)
is decoded by `pipeline.images.to_rgb` (16-bit scaled, alpha dropped, CMYK/grayscale/palette
converted) and re-encoded once as JPEG (quality `jpeg_quality`). The images the proposals stage
failed (its `failures.csv`) are not packed. Every image left out is listed in `index.json`
`failures` as {key, path, reason, detail}, reason one of `FAILURE_REASONS`; the job goes on.
`json` holds the sample's images-table row (`key`, `source`, `image_id`, `width`, `height`).
Images are assigned to shards by a seeded permutation, so neighbouring images of the source list
end up in different shards. Pixel frame: the stored one (EXIF orientation is not applied), the same
frame as the images table and the proposals.

Each shard is one Ray task (`pipeline.shard_jobs`, which also handles a worker that dies; Ray is
started or joined by `pipeline.raycluster`). Workers read each image at its `path` made absolute
against the command's working folder (a `ray start` node's workers run in the folder it was started
in), so on a cluster the images must be URLs or on a file system shared at the same path; what the
stage writes names the path as the images table gives it. A shard's three files are written under temporary names
(keys on object storage) and renamed when complete, the stamp last.
A run that writes any shard first removes `index.json` and writes it again only after every shard
is written and the whole set validated (`shardset.validate`), so a killed run never leaves a shard,
or a set, that looks finished. What a rerun reuses is decided by `pipeline.shard_reuse`. The stamp holds
a hash of everything the shard is built from: its images-table rows, the sha256 of each image's
bytes, its proposal rows, the proposals stage's failures, the settings, the decoding policy and
Pillow's version; and the shard's index entry (counts, checksums, failures). A rerun reuses a shard
only if its stamp matches the inputs as they are now and its files match their checksums (this
reads every image once to hash it), and takes its entry, failures included, from the stamp; a rerun
with a different plan (keys, settings, or the code version of this stage: any edit of its modules but
a comment or docstring) starts over. `index.json` holds nothing that varies between runs of the same
inputs (no timing; a reused shard's entry equals a fresh one), so identical inputs give
byte-identical outputs; the run's timing goes to the log.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import cli, contracts, proposalset, raycluster, shardset, storage
from pipeline import images as image_io
from pipeline.closure import code_version
from pipeline.params import as_dict, load_section, override
from pipeline.shard_reuse import finished_entries, inputs_stamp, location, start_over_unless_same_plan
from pipeline.shardset import proposals_name, stamp_name

log = logging.getLogger(__name__)

FAILURE_REASONS = image_io.FAILURE_REASONS + (
    "proposals_failed",     # listed in the proposals stage's failures.csv (its reason in `detail`)
    "proposals_missing",    # neither proposed nor failed: the proposals output is of another images table
    "worker_crashed",       # checked alone, it killed its worker on every try (segfault, out of memory)
)


@dataclass(frozen=True)
class ShardsConfig:
    """The `shards` section of params.yaml."""

    samples_per_shard: int = 256
    seed: int = 0
    jpeg_quality: int = 95        # only for sources that are not JPEG
    max_retries: int = 3          # retries of a shard whose worker died, before its images are checked alone (speed only)


def plan_shards(keys: list[str], samples_per_shard: int, seed: int) -> list[list[str]]:
    """Keys shuffled by `seed` and cut into shards of `samples_per_shard` (the last may be smaller)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    order = np.random.default_rng(seed).permutation(len(keys))
    shuffled = [keys[i] for i in order]
    return [shuffled[i:i + samples_per_shard] for i in range(0, len(shuffled), samples_per_shard)]


def jpeg_end(data: bytes) -> int:
    """Offset just past the end-of-image marker (FF D9) of the JPEG that `data` starts with, found
    by walking its segments and entropy-coded scans (an EXIF thumbnail's marker, inside its APP1
    segment, is skipped with the segment); len(data) where the walk finds no end marker."""
    n, i = len(data), 2                                  # after SOI (FF D8)
    while i + 1 < n:
        if data[i] != 0xFF:
            return n                                     # not at a marker: keep everything
        m = data[i + 1]
        if m == 0xFF:                                    # fill byte before a marker
            i += 1
        elif m == 0xD9:
            return i + 2
        elif 0xD0 <= m <= 0xD7 or m == 0x01:             # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
            if m == 0xDA:                                # a scan: entropy-coded data up to the next
                while True:                              # marker (FF 00 is a stuffed byte, FF D0-D7 a restart)
                    i = data.find(b"\xff", i)
                    if i < 0 or i + 1 >= n:
                        return n
                    if data[i + 1] != 0 and not 0xD0 <= data[i + 1] <= 0xD7:
                        break
                    i += 2
    return n


def shard_bytes(data: bytes, width: int, height: int, quality: int) -> tuple[bytes, bool]:
    """What the shard stores for an image's file bytes: (JPEG bytes, re-encoded?). The file itself
    if it is a JPEG that decodes fully at width x height, up to its end-of-image marker (what follows
    it, appended text or a phone's motion-photo video, is no part of the image and is not stored);
    anything else decoded by the shared policy and re-encoded. Raises pipeline.images.ImageFailure."""
    with image_io.open_image(data) as im:
        image_io.check_size(im, width, height)
        jpeg = im.format in ("JPEG", "MPO")     # MPO: a camera JPEG with extra frames; all stages read frame 0
        if not jpeg:
            return image_io.encode_jpeg(image_io.to_rgb(im), quality), True
    stored = data[:jpeg_end(data)]
    with image_io.open_image(stored) as im:     # what is checked is what is stored
        image_io.check_size(im, width, height)
        try:
            im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
        except Exception as e:  # noqa: BLE001 - a broken file can raise almost anything
            raise image_io.classify(e) from None
    return stored, False


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0              # deterministic bytes: no wall-clock time in the archive
    info.mode = 0o444
    info.uname = info.gname = "d3ssl"
    tar.addfile(info, io.BytesIO(data))


NOT_PROPOSED = "not_proposed"    # `failed` value of an image the proposals output does not hold
NOT_PROPOSED_NO_RECORD = "not_proposed_no_failures_csv"   # ... and whose failures.csv is missing


def _proposals_failure(reason: str) -> dict:
    if reason == NOT_PROPOSED:
        return {"reason": "proposals_missing", "detail": "the proposals stage output holds no row for it "
                "and lists no failure: rerun the proposals stage on this images table"}
    if reason == NOT_PROPOSED_NO_RECORD:
        return {"reason": "proposals_missing", "detail": "the proposals stage output holds no row for it and has "
                "no failures.csv to say whether it failed: rerun the proposals stage on this images table"}
    return {"reason": "proposals_failed", "detail": f"the proposals stage failed it: {reason}"}


def not_proposed(keys: list[str], proposals: pa.Table, failed: dict[str, str],
                 failures_listed: bool = True) -> dict[str, str]:
    """key -> NOT_PROPOSED for the images of `keys` that have no proposal row and are not among the
    proposals stage's failures (every image it handled has at least its whole-image box): a
    proposals output of another (older, partial) images table. They are not packed.
    NOT_PROPOSED_NO_RECORD instead when the output has no failures.csv (`failures_listed` False)."""
    have = set(pc.unique(proposals.column("key")).to_pylist())
    why = NOT_PROPOSED if failures_listed else NOT_PROPOSED_NO_RECORD
    return {k: why for k in keys if k not in have and k not in failed}


def _as_given(detail: str, row: dict) -> str:
    """`detail` naming the file as the images table does, not as the worker opened it (an absolute
    path depends on the folder the stage ran in, and index.json must not)."""
    return detail.replace(location(row), row["path"]) if location(row) != row["path"] else detail


def _pack(tar: tarfile.TarFile, rows: list[dict], failed: dict[str, str], jpeg_quality: int,
          digests: dict[str, str], crashed: dict[str, str]) -> tuple[list[str], list[dict], int]:
    """Pack the images of `rows` into `tar` (members `shardset.member_names`); returns the keys
    written, the failures, and how many were re-encoded. Fills `digests` (key -> sha256 of the file)."""
    written, failures, reencoded = [], [], 0
    for r in rows:
        key = r["key"]
        if key in failed:
            failures.append({"key": key, "path": r["path"], **_proposals_failure(failed[key])})
            continue
        if key in crashed:      # hashed, not decoded: the stamp then matches a rerun's (which keeps the record)
            digests[key] = storage.digest(location(r))
            failures.append({"key": key, "path": r["path"], "reason": "worker_crashed", "detail": crashed[key]})
            continue
        try:
            data = image_io.read_bytes(location(r))
        except image_io.ImageFailure as f:
            digests[key] = storage.digest(location(r))
            failures.append({"key": key, "path": r["path"], "reason": f.reason, "detail": _as_given(f.detail, r)})
            continue
        digests[key] = image_io.sha256_bytes(data)
        try:
            data, re = shard_bytes(data, r["width"], r["height"], jpeg_quality)
        except image_io.ImageFailure as f:
            failures.append({"key": key, "path": r["path"], "reason": f.reason, "detail": f.detail})
            continue
        reencoded += re
        meta = {k: r[k] for k in shardset.META_FIELDS}
        image_member, meta_member = shardset.member_names(key)
        _add(tar, image_member, data)
        _add(tar, meta_member, json.dumps(meta, sort_keys=True).encode())
        written.append(key)
    return written, failures, reencoded


def write_shard(name: str, rows: list[dict], proposals: pa.Table, out: str | Path, jpeg_quality: int,
                failed: dict[str, str] | None = None, crashed: dict[str, str] | None = None) -> dict:
    """Write one shard (tar, sidecar, then its stamp) atomically into `out` (path or URL); return
    its index entry.

    `rows` are images-table rows in shard order (read at `shard_reuse.location`); `proposals` holds
    their proposals in that order;
    `failed`: key -> reason of the images the proposals stage failed (not packed); `crashed`: key ->
    error of the images that killed their worker when checked alone (not packed, not decoded;
    their bytes are hashed for the stamp)."""
    failed, crashed = failed or {}, crashed or {}
    digests: dict[str, str] = {}
    tar_loc, prop_loc = storage.join(out, name), storage.join(out, proposals_name(name))
    with storage.atomic_write(tar_loc) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            written, failures, reencoded = _pack(tar, rows, failed, jpeg_quality, digests, crashed)
        tar_sha = storage.sha256(tmp)
    # `proposals` comes in shard order, then rank (split_proposals): the table reads like the tar.
    mine = proposals.filter(pc.is_in(proposals.column("key"), value_set=pa.array(written, pa.string())))
    storage.write_table(mine, prop_loc, contracts.PROPOSALS)
    entry = dict(zip(shardset.ENTRY_FIELDS, (
        name, len(written), mine.num_rows, reencoded, tar_sha, proposals_name(name), storage.sha256(prop_loc),
        failures)))
    stamp = inputs_stamp(name, rows, proposals, failed, digests, jpeg_quality)
    stamp_doc = json.dumps({"inputs": stamp, "entry": entry}, indent=1) + "\n"
    storage.write_text(storage.join(out, stamp_name(name)), stamp_doc)
    return entry


def split_proposals(proposals: pa.Table, plan: list[list[str]]) -> list[pa.Table]:
    """The proposals of each planned shard, in shard order then rank (one sort, then slices)."""
    keys = pa.array([k for keys in plan for k in keys], pa.string())
    pos = pc.index_in(proposals.column("key"), value_set=keys)
    t = proposals.append_column("_pos", pos).filter(pc.is_valid(pos))
    t = t.sort_by([("_pos", "ascending"), ("rank", "ascending")])
    starts = np.cumsum([0] + [len(k) for k in plan])
    bounds = np.searchsorted(t.column("_pos").to_numpy(), starts)
    t = t.drop(["_pos"])
    return [t.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(plan))]


def run(images_path: str | Path, proposals_dir: str | Path, out: str | Path, cfg: ShardsConfig,
        ray_address: str | None = None, num_workers: int | None = None, progress: bool = True) -> dict:
    """The whole stage; returns the index written to `out/index.json` (locations: paths or URLs)."""
    t0 = time.perf_counter()
    images = storage.read_table(images_path, contracts.IMAGES)
    proposals = proposalset.read_parts(proposals_dir)
    # Workers read `location`: a relative path made absolute here (a worker's working folder, on a
    # `ray start` node the folder it was started in, is not the driver's); outputs name `path`.
    rows = {r["key"]: {**r, "location": storage.worker_location(r["path"])} for r in images.to_pylist()}
    plan = plan_shards(list(rows), cfg.samples_per_shard, cfg.seed)
    names = [shardset.shard_name(i) for i in range(len(plan))]
    plan_doc = json.dumps({"settings": output_settings(cfg), "shards": plan, "code": code_version("pipeline.shards")},
                          sort_keys=True)
    # Tasks write to an absolute location: a worker's working folder is not the driver's.
    out = str(out) if storage.is_url(out) else str(storage.local_path(out).resolve())
    start_over_unless_same_plan(out, hashlib.sha256(plan_doc.encode()).hexdigest(), names)

    failed = proposalset.read_failures(proposals_dir)
    listed = storage.isfile(storage.join(proposals_dir, proposalset.FAILURES_NAME))
    missing = not_proposed(list(rows), proposals, failed, listed)
    if missing:
        log.warning("%d image(s) of %s have no proposals in %s and are not among its failures (e.g. %s): "
                    "they are left out as proposals_missing; rerun the proposals stage on this images table",
                    len(missing), images_path, proposals_dir, next(iter(missing)))
        failed = {**failed, **missing}
    per_shard = dict(zip(names, split_proposals(proposals, plan)))
    shards = [(name, [rows[k] for k in keys], per_shard[name], {k: failed[k] for k in keys if k in failed})
              for name, keys in zip(names, plan)]
    entries = finished_entries(shards, out, cfg.jpeg_quality)
    todo = [s for s in shards if s[0] not in entries]
    nodes: dict[str, int] = {}
    index_loc = storage.join(out, shardset.INDEX_NAME)
    if todo:
        # While shards change, the set is unfinished: no index (a reader must not take a mix of old
        # and new shards, or a killed rerun's set, for a finished one).
        if storage.exists(index_loc):
            storage.remove(index_loc)
        from pipeline import shard_jobs   # the Ray side; it imports this module

        written, nodes = shard_jobs.run_tasks(todo, out, cfg, ray_address, num_workers, progress)
        entries.update(written)
    index = write_index(out, [entries[n] for n in names], cfg, images_path)
    # What varies between runs of the same inputs stays out of index.json (DVC hashes the folder,
    # and a changed hash reruns every pre-training run): logged instead.
    log.info("shards run (not in index.json): %s", json.dumps(
        {"written": len(todo), "reused": len(names) - len(todo), "tasks_per_node": nodes,
         "ray_address": raycluster.address_of(ray_address) or "local",
         "seconds": round(time.perf_counter() - t0, 3)}))
    return index


def output_settings(cfg: ShardsConfig) -> dict:
    """The settings the shards depend on: all but `max_retries` (speed only). It is kept out of
    `index.json` and the plan, so changing it reruns the stage (DVC tracks the whole section) with a
    byte-identical output, and nothing downstream."""
    return {k: v for k, v in as_dict(cfg).items() if k != "max_retries"}


def write_index(out: str | Path, shards: list[dict], cfg: ShardsConfig, images_path: str | Path) -> dict:
    """Check the set the entries `shards` describe (every listed file there, tables sound) and
    write its `index.json`, the file that marks a set finished; returns the index."""
    index = make_index(shards, cfg, images_path)
    shardset.validate(out, index=index, read_tars=False)
    storage.write_text(storage.join(out, shardset.INDEX_NAME), json.dumps(index, indent=2) + "\n")
    return index


def make_index(shards: list[dict], cfg: ShardsConfig, images_path: str | Path) -> dict:
    """The content of index.json (`shardset.INDEX_FIELDS`) from the shards' entries, in order."""
    index = {
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_boxes": sum(s["boxes"] for s in shards),
        "failures": [f for s in shards for f in s["failures"]],
        "failure_reasons": dict(sorted(collections.Counter(
            f["reason"] for s in shards for f in s["failures"]).items())),
        "settings": output_settings(cfg),
        "images_table": str(images_path),
    }
    assert tuple(index) == shardset.INDEX_FIELDS
    return index


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipeline.shards", __doc__)
    p.add_argument("--images", required=True, help="images table (parquet): a path or URL (s3://...)")
    p.add_argument("--proposals", required=True, help="folder or URL prefix of the proposal parts")
    p.add_argument("--out", required=True, help="shard set folder or URL prefix (s3://bucket/shards)")
    p.add_argument("--samples-per-shard", type=int,
                   help="samples per shard (default: params.yaml shards.samples_per_shard)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-workers", type=int, help="CPUs of the local Ray (default: all usable)")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'shards' section from")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    cfg = override(load_section(ShardsConfig, "shards", args.params), samples_per_shard=args.samples_per_shard)
    try:
        index = run(args.images, args.proposals, args.out, cfg, args.ray_address, args.num_workers)
    except (storage.StorageError, FileNotFoundError, ConnectionError) as e:   # a Ray task's cause too; a bad --ray-address
        log.error("%s", getattr(e, "cause", None) or e)
        return 1
    log.info("wrote %d shards to %s: %d samples, %d proposals, %d failures", len(index["shards"]), args.out,
             index["total_samples"], index["total_boxes"], len(index["failures"]))
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not __main__'s: Ray ships `__main__`'s functions by value.
    from pipeline.shards import main as _main

    sys.exit(_main())
