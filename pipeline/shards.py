"""WebDataset shards with a parquet proposal table beside each, written by a Ray job.

    python -m pipeline.shards --images data/openimage_mini/images.parquet --proposals data/proposals \
        --out data/shards [--samples-per-shard 256] [--ray-address ADDR] [--num-workers N] [--params params.yaml]

Layout of `--out`:

    train-000000.tar                     samples {__key__, jpg, json}: the original JPEG bytes
    train-000000.proposals.parquet       the proposals (PROPOSALS contract) of exactly that shard's keys
    ...
    index.json                           shards, sample and box counts, sha256 of every file

`jpg` holds the source file's bytes unchanged when the source is a JPEG; anything else (PNG, ...)
is decoded and re-encoded once (RGB, quality `jpeg_quality`). `json` holds the sample's images-table
row (`key`, `source`, `image_id`, `width`, `height`). Images are assigned to shards by a seeded
permutation, so neighbouring images of the source list end up in different shards. Pixel frame:
the stored one (EXIF orientation is not applied), the same frame as the images table and the
proposals.

Each shard is one Ray task; its two files are written under temporary names and renamed when
complete, so a killed run never leaves a shard that looks finished. A rerun with the same inputs
and settings skips the shards whose two files exist (their checksums are recomputed for the index);
a rerun with a different plan starts over. Unreadable source images are skipped and listed in the
index with their reason; the job goes on. `index.json` holds nothing that varies between runs of
the same inputs (no timing; a reused shard's entry is rebuilt to equal a fresh one), so identical
inputs give byte-identical outputs; the run's timing goes to the log.
"""
from __future__ import annotations

import argparse
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

from pipeline import contracts
from pipeline.files import atomic_path, write_text
from pipeline.params import as_dict, load_section, override

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
log = logging.getLogger(__name__)

SHARD_PATTERN = "train-{:06d}.tar"
PROPOSALS_SUFFIX = ".proposals.parquet"
JPEG_MAGIC = b"\xff\xd8\xff"


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


def jpeg_bytes(path: str, quality: int) -> tuple[bytes, bool]:
    """The image as JPEG bytes: the file itself if it is a JPEG, else re-encoded. (bytes, re-encoded?)"""
    data = Path(path).read_bytes()
    if data[:3] == JPEG_MAGIC:
        return data, False
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            flat = Image.new("RGB", im.size, (0, 0, 0))
            flat.paste(im, mask=im.getchannel("A"))
            im = flat
        else:
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), True


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


def write_shard(name: str, rows: list[dict], proposals: pa.Table, out: Path, jpeg_quality: int) -> dict:
    """Write one shard (tar + proposal table) atomically; return its index entry.

    `rows` are images-table rows in shard order; `proposals` holds their proposals in that order.
    """
    failures, written = [], []
    tar_path, prop_path = out / name, out / proposals_name(name)
    reencoded = 0
    with atomic_path(tar_path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for r in rows:
                try:
                    data, re = jpeg_bytes(r["path"], jpeg_quality)
                except (OSError, ValueError) as e:
                    failures.append({"key": r["key"], "path": r["path"], "reason": f"{type(e).__name__}: {e}"})
                    continue
                reencoded += re
                meta = {k: r[k] for k in ("key", "source", "image_id", "width", "height")}
                _add(tar, f"{r['key']}.jpg", data)
                _add(tar, f"{r['key']}.json", json.dumps(meta, sort_keys=True).encode())
                written.append(r["key"])
    # `proposals` comes in shard order, then rank (split_proposals): the table reads like the tar.
    mine = proposals.filter(pc.is_in(proposals.column("key"), value_set=pa.array(written, pa.string())))
    contracts.write_table(mine, prop_path, contracts.PROPOSALS)
    return {
        "name": name, "samples": len(written), "boxes": mine.num_rows, "reencoded": reencoded,
        "sha256": sha256_of(tar_path), "proposals": prop_path.name, "proposals_sha256": sha256_of(prop_path),
        "failures": failures,
    }


def finished_entry(name: str, rows: list[dict], out: Path, jpeg_quality: int) -> dict | None:
    """The index entry of a shard a previous run completed (the entry `write_shard` returned,
    rebuilt from the files, so a resumed run's index equals an undisturbed run's), or None.

    `rows` are the shard's planned images-table rows. A planned image missing from the tar must
    still fail to read (its failure is read again, with the same reason); one that reads now, or a
    sample whose source is gone, makes the shard unfinished."""
    tar_path, prop_path = out / name, out / proposals_name(name)
    if not (tar_path.is_file() and prop_path.is_file()):
        return None
    with tarfile.open(tar_path) as tar:
        written = {m.name.removesuffix(".jpg") for m in tar.getmembers() if m.name.endswith(".jpg")}
    failures, reencoded = [], 0
    for r in rows:
        if r["key"] in written:
            try:
                with open(r["path"], "rb") as f:
                    reencoded += f.read(3) != JPEG_MAGIC       # jpeg_bytes re-encodes exactly these
            except OSError:
                return None
            continue
        try:
            jpeg_bytes(r["path"], jpeg_quality)
        except (OSError, ValueError) as e:
            failures.append({"key": r["key"], "path": r["path"], "reason": f"{type(e).__name__}: {e}"})
            continue
        return None
    return {
        "name": name, "samples": len(written), "boxes": contracts.read_table(prop_path, contracts.PROPOSALS).num_rows,
        "reencoded": reencoded, "sha256": sha256_of(tar_path), "proposals": prop_path.name,
        "proposals_sha256": sha256_of(prop_path), "failures": failures,
    }


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

    entries: dict[str, dict] = {}
    todo = []
    for name, keys in zip(names, plan):
        done = finished_entry(name, [rows[k] for k in keys], out, cfg.jpeg_quality)
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
            per_shard = dict(zip(names, split_proposals(proposals, plan)))
            pending = {task.remote(name, [rows[k] for k in keys], per_shard[name], out.resolve(), cfg.jpeg_quality): name
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
        "failures": [f for s in shards for f in (s["failures"] or [])],
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
