"""WebDataset shards with a parquet proposal table beside each, written by a Ray job.

    python -m pipeline.shards --images data/openimage_mini/images.parquet --proposals data/proposals \
        --out data/shards [--samples-per-shard 256] [--ray-address ADDR] [--num-workers N] [--params params.yaml]

Layout of `--out`:

    train-000000.tar                     samples {__key__, jpg, json}: the JPEG bytes
    train-000000.proposals.parquet       the proposals (PROPOSALS contract) of exactly that shard's keys
    train-000000.stamp.json              what the shard was built from (hash) and its index entry
    ...
    index.json                           shards, sample and box counts, sha256 of every file, failures
    plan.sha256                          the plan (settings, keys per shard) the shards belong to

Only what decodes fully at the images table's size is packed. Each image is read once and checked
with the decoding policy every stage shares (`pipeline.images`): a JPEG (header size, PIL's pixel
limit, then a draft decode at 1/8 scale, which still reads every entropy-coded byte) is packed as
its bytes unchanged, EXIF included (no stage applies EXIF orientation); anything else (PNG, ...)
is decoded by `pipeline.images.to_rgb` (16-bit scaled, alpha dropped, CMYK/grayscale/palette
converted) and re-encoded once as JPEG (quality `jpeg_quality`). The images the proposals stage
failed (its `failures.csv`) are not packed. Every image left out is listed in `index.json`
`failures` as {key, path, reason, detail}, reason one of `FAILURE_REASONS`; the job goes on.
`json` holds the sample's images-table row (`key`, `source`, `image_id`, `width`, `height`).
Images are assigned to shards by a seeded permutation, so neighbouring images of the source list
end up in different shards. Pixel frame: the stored one (EXIF orientation is not applied), the same
frame as the images table and the proposals.

Each shard is one Ray task; its three files are written under temporary names and renamed when
complete, the stamp last, so a killed run never leaves a shard that looks finished. The stamp holds
a hash of everything the shard is built from: its images-table rows, the sha256 of each image's
bytes, its proposal rows, the proposals stage's failures, the settings, the decoding policy and
Pillow's version; and the shard's index entry (counts, checksums, failures). A rerun reuses a shard
only if its stamp matches the inputs as they are now and its files match their checksums (this
reads every image once to hash it), and takes its entry, failures included, from the stamp; a rerun
with a different plan starts over. `index.json` holds nothing that varies between runs of the same
inputs (no timing; a reused shard's entry equals a fresh one), so identical inputs give
byte-identical outputs; the run's timing goes to the log.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline import contracts
from pipeline import images as image_io
from pipeline.files import atomic_path, write_text
from pipeline.params import as_dict, load_section, override

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
log = logging.getLogger(__name__)

SHARD_PATTERN = "train-{:06d}.tar"
PROPOSALS_SUFFIX = ".proposals.parquet"
STAMP_SUFFIX = ".stamp.json"
FAILURE_REASONS = image_io.FAILURE_REASONS + (
    "proposals_failed",     # listed in the proposals stage's failures.csv (its reason in `detail`)
)
ROW_FIELDS = ("key", "source", "image_id", "path", "width", "height")


@dataclass(frozen=True)
class ShardsConfig:
    """The `shards` section of params.yaml."""

    samples_per_shard: int = 256
    seed: int = 0
    jpeg_quality: int = 95        # only for sources that are not JPEG


def proposals_name(shard_name: str) -> str:
    """'train-000003.tar' -> 'train-000003.proposals.parquet'."""
    return shard_name.removesuffix(".tar") + PROPOSALS_SUFFIX


def plan_shards(keys: list[str], samples_per_shard: int, seed: int) -> list[list[str]]:
    """Keys shuffled by `seed` and cut into shards of `samples_per_shard` (the last may be smaller)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    order = np.random.default_rng(seed).permutation(len(keys))
    shuffled = [keys[i] for i in order]
    return [shuffled[i:i + samples_per_shard] for i in range(0, len(shuffled), samples_per_shard)]


def stamp_name(shard_name: str) -> str:
    """'train-000003.tar' -> 'train-000003.stamp.json'."""
    return shard_name.removesuffix(".tar") + STAMP_SUFFIX


def shard_bytes(data: bytes, width: int, height: int, quality: int) -> tuple[bytes, bool]:
    """What the shard stores for an image's file bytes: (JPEG bytes, re-encoded?). The file itself
    if it is a JPEG that decodes fully at width x height; anything else decoded by the shared policy
    and re-encoded. Raises pipeline.images.ImageFailure."""
    with image_io.open_image(data) as im:
        image_io.check_size(im, width, height)
        if im.format in ("JPEG", "MPO"):     # MPO: a camera JPEG with extra frames; all stages read frame 0
            try:
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
            except Exception as e:  # noqa: BLE001 - a broken file can raise almost anything
                raise image_io.classify(e) from None
            return data, False
        rgb = image_io.to_rgb(im)
    return image_io.encode_jpeg(rgb, quality), True


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0              # deterministic bytes: no wall-clock time in the archive
    info.mode = 0o444
    info.uname = info.gname = "d3ssl"
    tar.addfile(info, io.BytesIO(data))


def inputs_stamp(name: str, rows: list[dict], proposals: pa.Table, failed: dict[str, str],
                 digests: dict[str, str], jpeg_quality: int) -> str:
    """Hash of everything shard `name` is built from: its rows (in shard order), each image's bytes
    (`digests`: key -> sha256, "missing" when unreadable; none for images the proposals stage
    failed, which are not read), its proposal rows (in shard order, then rank), the proposals
    stage's failures, the setting, the decoding policy and Pillow (the re-encoded bytes depend on it)."""
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


def file_digest(path: str) -> str:
    try:
        return image_io.sha256_bytes(Path(path).read_bytes())
    except OSError:
        return "missing"


def write_shard(name: str, rows: list[dict], proposals: pa.Table, out: Path, jpeg_quality: int,
                failed: dict[str, str] | None = None) -> dict:
    """Write one shard (tar, proposal table, then its stamp) atomically; return its index entry.

    `rows` are images-table rows in shard order; `proposals` holds their proposals in that order;
    `failed`: key -> reason of the images the proposals stage failed (not packed)."""
    failed = failed or {}
    failures, written, digests = [], [], {}
    tar_path, prop_path = out / name, out / proposals_name(name)
    reencoded = 0
    with atomic_path(tar_path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for r in rows:
                key = r["key"]
                if key in failed:
                    failures.append({"key": key, "path": r["path"], "reason": "proposals_failed",
                                     "detail": f"the proposals stage failed it: {failed[key]}"})
                    continue
                try:
                    data = image_io.read_bytes(r["path"])
                except image_io.ImageFailure as f:
                    digests[key] = "missing"
                    failures.append({"key": key, "path": r["path"], "reason": f.reason, "detail": f.detail})
                    continue
                digests[key] = image_io.sha256_bytes(data)
                try:
                    data, re = shard_bytes(data, r["width"], r["height"], jpeg_quality)
                except image_io.ImageFailure as f:
                    failures.append({"key": key, "path": r["path"], "reason": f.reason, "detail": f.detail})
                    continue
                reencoded += re
                meta = {k: r[k] for k in ("key", "source", "image_id", "width", "height")}
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                written.append(key)
    # `proposals` comes in shard order, then rank (split_proposals): the table reads like the tar.
    mine = proposals.filter(pc.is_in(proposals.column("key"), value_set=pa.array(written, pa.string())))
    contracts.write_table(mine, prop_path, contracts.PROPOSALS)
    entry = {
        "name": name, "samples": len(written), "boxes": mine.num_rows, "reencoded": reencoded,
        "sha256": sha256_of(tar_path), "proposals": prop_path.name, "proposals_sha256": sha256_of(prop_path),
        "failures": failures,
    }
    stamp = inputs_stamp(name, rows, proposals, failed, digests, jpeg_quality)
    write_text(out / stamp_name(name), json.dumps({"inputs": stamp, "entry": entry}, indent=1) + "\n")
    return entry


def finished_entry(name: str, rows: list[dict], proposals: pa.Table, failed: dict[str, str], out: Path,
                   jpeg_quality: int) -> dict | None:
    """The index entry of a shard a previous run completed from the same inputs (as its stamp
    recorded it, failures included), or None: a file missing, a checksum off, or any input changed
    (rows, image bytes, proposals, the proposals stage's failures, settings, decoding policy)."""
    tar_path, prop_path, stamp_path = out / name, out / proposals_name(name), out / stamp_name(name)
    if not (tar_path.is_file() and prop_path.is_file() and stamp_path.is_file()):
        return None
    try:
        stamp = json.loads(stamp_path.read_text())
        entry = stamp["entry"]
    except (ValueError, KeyError, TypeError):
        return None
    digests = {r["key"]: file_digest(r["path"]) for r in rows if r["key"] not in failed}
    if stamp.get("inputs") != inputs_stamp(name, rows, proposals, failed, digests, jpeg_quality):
        return None
    if sha256_of(tar_path) != entry.get("sha256") or sha256_of(prop_path) != entry.get("proposals_sha256"):
        return None
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


def read_proposal_parts(folder: Path) -> pa.Table:
    """All proposal parts (`part-*.parquet`) of a proposals stage output."""
    parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no proposal parts (part-*.parquet) in {folder}; run pipeline.proposals first")
    return contracts.read_tables(parts, contracts.PROPOSALS)


def read_proposal_failures(folder: Path) -> dict[str, str]:
    """key -> reason of the images the proposals stage failed (its `failures.csv`; none if absent)."""
    path = Path(folder) / "failures.csv"
    if not path.is_file():
        log.warning("%s has no failures.csv: no image is known to have failed the proposals stage", folder)
        return {}
    cols = ["key", "path", "reason", "detail"]
    t = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={c: pa.string() for c in cols}, include_columns=cols, strings_can_be_null=False))
    return dict(zip(t.column("key").to_pylist(), t.column("reason").to_pylist()))


def run(images_path: Path, proposals_dir: Path, out: Path, cfg: ShardsConfig,
        ray_address: str | None = None, num_workers: int | None = None, progress: bool = True) -> dict:
    """The whole stage; returns the index written to `out/index.json`."""
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    images = contracts.read_table(images_path, contracts.IMAGES)
    proposals = read_proposal_parts(proposals_dir)
    rows = {r["key"]: r for r in images.to_pylist()}
    plan = plan_shards(list(rows), cfg.samples_per_shard, cfg.seed)
    names = [SHARD_PATTERN.format(i) for i in range(len(plan))]

    # A previous run's shards are reused only if they come from the same plan.
    plan_doc = json.dumps({"settings": as_dict(cfg), "shards": plan}, sort_keys=True)
    plan_hash = hashlib.sha256(plan_doc.encode()).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.sha256"
    if plan_file.is_file() and plan_file.read_text().strip() != plan_hash:
        for p in list(out.glob("train-*")) + [out / "index.json"]:
            p.unlink(missing_ok=True)
    write_text(plan_file, plan_hash + "\n")
    for stale in out.glob(".train-*.tmp-*"):  # temporaries of a killed run
        stale.unlink()

    failed = read_proposal_failures(proposals_dir)
    failed_of = {name: {k: failed[k] for k in keys if k in failed} for name, keys in zip(names, plan)}
    per_shard = dict(zip(names, split_proposals(proposals, plan)))
    entries: dict[str, dict] = {}
    todo = []
    for name, keys in zip(names, plan):
        done = finished_entry(name, [rows[k] for k in keys], per_shard[name], failed_of[name], out, cfg.jpeg_quality)
        if done is not None:
            entries[name] = done
        else:
            todo.append((name, keys))

    if todo:
        address = ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=num_workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            task = ray.remote(max_retries=3, retry_exceptions=False, num_cpus=1)(write_shard)
            pending = {task.remote(name, [rows[k] for k in keys], per_shard[name], out.resolve(), cfg.jpeg_quality,
                                   failed_of[name]): name
                       for name, keys in todo}
            with tqdm(total=len(pending), desc="shards", unit="shard", disable=not progress) as bar:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    entry = ray.get(ready[0])
                    entries[pending.pop(ready[0])] = entry
                    bar.update()
        finally:
            ray.shutdown()

    shards = [entries[n] for n in names]
    index = {
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_boxes": sum(s["boxes"] for s in shards),
        "failures": [f for s in shards for f in s["failures"]],
        "failure_reasons": dict(sorted(collections.Counter(f["reason"] for s in shards for f in s["failures"]).items())),
        "settings": as_dict(cfg),
        "images_table": str(images_path),
    }
    write_text(out / "index.json", json.dumps(index, indent=2) + "\n")
    # What varies between runs of the same inputs stays out of index.json (DVC hashes the folder,
    # and a changed hash reruns every pre-training run): logged instead.
    log.info("shards run (not in index.json): %s", json.dumps(
        {"written": len(todo), "reused": len(names) - len(todo), "seconds": round(time.perf_counter() - t0, 3)}))
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, type=Path, help="images table (parquet)")
    p.add_argument("--proposals", required=True, type=Path, help="folder of proposal parts")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-workers", type=int, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'shards' section from")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = override(load_section(ShardsConfig, "shards", args.params), samples_per_shard=args.samples_per_shard)
    index = run(args.images, args.proposals, args.out, cfg, args.ray_address, args.num_workers)
    print(f"{len(index['shards'])} shards, {index['total_samples']} samples, {index['total_boxes']} proposals, "
          f"{len(index['failures'])} failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
