"""The streaming input pipeline: WebDataset shards + proposal tables -> batches of views.

    shards, total = shardset.shards("data/shards")     # pipeline.shardset; or "s3://bucket/shards"
    loader = make_loader(shards, LoaderConfig(), seed=0, epoch=e, total_samples=total)

The shard set's layout (tar members, sidecar names, `index.json`) is `pipeline.shardset`'s; shards
are local paths or object-store URLs, read through `pipeline.storage` (credentials and endpoint
from the environment, e.g. `AWS_ENDPOINT_URL`), so several machines can stream one shard set.
    for batch in loader: ...

One function, `make_stream`, builds the whole chain; each stage says what the stream holds after
it. Splitting is explicit: in the exact mode shards are dealt to ranks and then to loader workers
(as webdataset's `split_by_node` and `split_by_worker` do, with the rank read in the training
process: a forkserver worker inherits the server's environment, not the trainer's); in the
resampled mode (the default for training) every (rank, worker) draws shards with replacement
from its own seeded generator and stops after a fixed number of batches, so every rank gets the
same number of batches per epoch, which DDP needs.

Determinism: every random draw comes from a generator seeded with integers (seed, epoch, rank,
worker[, sample index]); the same seed, rank and worker give the same batches. `start_batch`
resumes an epoch in the middle (resampled mode): each worker runs through the samples of the
batches that were already consumed without batching them, and the workers are rotated so that the
DataLoader's round-robin continues where it stopped. The skip counts samples that made it into a
batch, not raw tar members: the skipped samples are decoded (and their views made) as before the
interruption, so a sample that failed to decode then fails now and the resumed epoch lands on the
same sample as an undisturbed one. (This costs at most one epoch's share of loader work per resume;
the checkpoint holds only the epoch and batch, not each worker's raw position.)

Workers start with `forkserver` by default (`loader.start_method`): a worker forked from a trainer
that has run OpenCV's thread pool before (selective search in the same process, say) hangs.

Bad data never hangs the stream nor kills it for one image:
- a truncated or corrupt shard is reported (logged) with its name and the position of the sample
  where reading failed, counted (`errors` in every batch: this worker's running count, logged as
  `loader_errors`), and the stream goes on with the next shard; a worker that fails to read
  `loader.max_shard_failures` shards in a row (missing files, say: resampled draws would retry them
  for ever) stops with a `ShardDataError` naming them and the last error;
- a sample that cannot be decoded or cut into views (any exception: truncated JPEG, not an image,
  over PIL's pixel limit, ...) is skipped, counted and logged once per worker with its shard and
  key; `loader.max_sample_failures` failures in a row (a bug, or shards of junk) stop the worker
  with a `ShardDataError`;
- a missing or unreadable `index.json`, shard listed in it or proposal table (one that breaks the
  proposals contract included) is a `ShardDataError` naming the file (rebuild the shards: `dvc
  repro shards`). A sample without proposals in its shard's table uses the whole-image box.

Multi-process training (DDP) needs the resampled mode: in the exact mode ranks holding unequal
shares of the shards (or of their undecodable samples) would run unequal numbers of steps and
DDP would wait for ever at the end of the epoch, so `world > 1` with `resampled: false` is refused
(`ParamsError` naming `loader.resampled`). The exact mode still deals shards to the ranks of a
consumer that does not synchronise per batch (the rank from `RANK`/`WORLD_SIZE`, `world` left at 1).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import webdataset as wds

from pipeline import images as image_io
from pipeline import shardset, storage
from pipeline.params import ParamsError
from pipeline.shardset import REBUILD, ShardDataError
from train import loader_workers
from train.views import ViewConfig, make_views

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    """The `loader` section of params.yaml."""

    params_section = "loader"              # not a field: messages name `loader.x`, not `pretrain.loader.x`

    batch_size: int = 32                   # per rank
    workers: int = 2                       # DataLoader processes per rank
    shuffle_buffer: int = 256              # samples held for shuffling, per worker
    resampled: bool = True                 # draw shards with replacement, fixed epoch length (DDP)
    epoch_samples: int = 0                 # samples per epoch over all ranks (resampled); 0 = all samples once
    # How loader workers start. "fork" copies the training process, and a worker hangs where that
    # process has run OpenCV's thread pool (selective search, say) before; "forkserver" forks
    # them from a clean server process that has this module imported already (0.5 s to the first
    # batch of an epoch against 0.2 s with fork, 2 workers); "spawn" starts fresh interpreters.
    # Scripts that build a loader need an `if __name__ == "__main__":` guard.
    start_method: str = "forkserver"
    max_shard_failures: int = 8            # shards in a row a worker fails to read before it stops with an error
    max_sample_failures: int = 64          # undecodable samples in a row a worker skips before it stops with an error
    views: ViewConfig = field(default_factory=ViewConfig)

    def __post_init__(self) -> None:
        if self.start_method not in ("fork", "forkserver", "spawn"):
            raise ValueError(f"loader.start_method is {self.start_method!r}; use fork, forkserver or spawn")
        for key in ("max_shard_failures", "max_sample_failures"):
            if getattr(self, key) < 1:
                raise ParamsError(f"loader.{key} is {getattr(self, key)}; it must be at least 1")


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers with splitmix64 (stable across processes, unlike hash()
    of strings, and cheap enough to call once per sample)."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for p in parts:
        z = (h ^ (int(p) & mask)) * 0xBF58476D1CE4E5B9 & mask
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
        h = (z ^ (z >> 31)) + 0x9E3779B97F4A7C15 & mask
    return h >> 1


def image_id(key: str) -> int:
    """A 63-bit id of a sample key, the same in every process and on every rank (the queue uses it
    to tell an image's own keys from its negatives: train.losses.Queue)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class _Position:
    """Who this iterator is: the rank, resolved in the training process, and the loader worker,
    resolved inside the worker at iteration time."""

    rank: int
    world: int
    worker: int      # the *virtual* worker (rotated when resuming mid-epoch)
    workers: int
    skip_batches: int


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this training process: torch.distributed if it is initialised, else
    torchrun's RANK and WORLD_SIZE, else (0, 1). Read in the training process, not in a loader
    worker: a forkserver worker inherits the environment of the server, not of the trainer."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _worker_slot(start_batch: int) -> tuple[int, int, int]:
    """(virtual worker, workers, batches to skip) of the calling loader worker; the workers are
    rotated by `start_batch` so the DataLoader's round-robin continues where a resumed epoch
    stopped."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    virtual = (worker + start_batch) % workers
    return virtual, workers, max(0, (start_batch - virtual + workers - 1) // workers)


def _position(rank: int, world: int, start_batch: int) -> _Position:
    return _Position(rank, world, *_worker_slot(start_batch))


class ShardSource(torch.utils.data.IterableDataset):
    """Stream of {"shard"} (a path or URL): resampled per (rank, worker), or each shard once,
    dealt to ranks then workers."""

    def __init__(self, shards: list[str], resampled: bool, seed: int, epoch: int, start_batch: int):
        super().__init__()
        if not shards:
            raise ValueError("no shards given: build them with `python -m pipeline.shards`")
        self.shards, self.resampled, self.seed, self.epoch = list(shards), resampled, seed, epoch
        self.start_batch = start_batch
        self.rank, self.world = process_rank()

    def __iter__(self) -> Iterator[dict]:
        pos = _position(self.rank, self.world, self.start_batch)
        if self.resampled:
            rng = random.Random(_seed(self.seed, self.epoch, pos.rank, pos.worker, 1))
            while True:
                yield {"shard": rng.choice(self.shards), "_pos": pos}
        else:
            order = list(self.shards)
            random.Random(_seed(self.seed, self.epoch, 2)).shuffle(order)   # the same on every rank
            for shard in order[pos.rank::pos.world][pos.worker::pos.workers]:   # ranks, then workers
                yield {"shard": shard, "_pos": pos}


def read_shards(src: Iterator[dict], stats: dict, max_failures: int = 8) -> Iterator[dict]:
    """{"shard"} -> {"__key__", "__url__" (the shard's path or URL), "jpg": bytes, "json": bytes},
    read by `pipeline.shardset.samples`; a broken shard is reported and skipped, and
    `max_failures` broken shards in a row (any error; a shard read to its end resets the count) are
    a ShardDataError naming them."""
    failed: list[str] = []
    for item in src:
        shard, position = item["shard"], 0
        try:
            with storage.open(shard, "rb") as f:
                for sample in shardset.samples(f):
                    sample["__url__"], sample["_pos"] = shard, item["_pos"]
                    yield sample
                    position += 1
        except Exception as e:  # noqa: BLE001 - OSError, tar errors, and what an object store raises mid-read
            stats["errors"] += 1
            failed.append(shard)
            log.warning("corrupt shard %s at sample %d: %s (skipped; %d so far in this worker)",
                        shard, position, e, stats["errors"])
            if len(failed) >= max_failures:
                pos = item["_pos"]
                names = ", ".join(dict.fromkeys(failed))
                raise ShardDataError(
                    f"loader worker {pos.worker} of rank {pos.rank} failed to read {len(failed)} shards in a row "
                    f"(loader.max_shard_failures: {max_failures}): {names}; last error, at sample {position} "
                    f"of {shard}: {type(e).__name__}: {e}. Check that the shards exist and are readable, or "
                    f"{REBUILD}") from e
        else:
            failed.clear()


def join_proposals(src: Iterator[dict]) -> Iterator[dict]:
    """+ "proposals": (n, 4) float32 boxes by rank, from the shard's sidecar (validated against the
    proposals contract: a table that breaks it is a ShardDataError naming it)."""
    cached_shard, table = None, {}
    for sample in src:
        shard = sample["__url__"]
        if shard != cached_shard:
            cached_shard, table = shard, {}
            path = shardset.sidecar_of(shard)
            try:
                t = shardset.read_sidecar(path).sort_by([("key", "ascending"), ("rank", "ascending")])
                keys = t.column("key").to_numpy(zero_copy_only=False)
                xy = np.stack([t.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1).astype(np.float32)
                starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
                for s, e in zip(starts, np.r_[starts[1:], len(keys)]):
                    table[keys[s]] = xy[s:e]
            except Exception as e:      # missing, truncated, not parquet, breaks the contract
                raise ShardDataError(f"cannot read the proposal table {path} of shard {shard}: "
                                     f"{type(e).__name__}: {e}; {REBUILD}") from e
        sample["proposals"] = table.get(sample["__key__"], np.zeros((0, 4), np.float32))
        yield sample


def shuffle(src: Iterator[dict], bufsize: int, seed: int, epoch: int) -> Iterator[dict]:
    """Reservoir shuffle of raw samples, seeded per (seed, epoch, rank, worker)."""
    buf, rng = [], None
    for sample in src:
        if rng is None:
            pos = sample["_pos"]
            rng = random.Random(_seed(seed, epoch, pos.rank, pos.worker, 3))
        buf.append(sample)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


def decode_views(src: Iterator[dict], cfg: LoaderConfig, seed: int, epoch: int, stats: dict) -> Iterator[dict]:
    """Raw sample -> {"key", "x1", "x2", "x2s" (uint8 HxWx3 arrays), "boxes1", "boxes2", "boxes2s", "valid"}.

    A sample whose image cannot be decoded or cut into views (any exception) is skipped, counted in
    `stats["errors"]` and logged once per (shard, key) in this worker; `cfg.max_sample_failures`
    in a row are a ShardDataError.

    The first `skip_batches * batch_size` samples that decode (those consumed before a resume) are
    decoded and dropped: the skip counts what went into batches, so a skipped bad sample moves the
    resumed stream exactly as it moved the interrupted one. The per-sample generator depends on the
    sample's raw index, not on what ran before, so the rest is what an uninterrupted run gives.
    """
    consumed, failures, logged = 0, 0, set()
    for i, sample in enumerate(src):
        pos = sample["_pos"]
        rng = np.random.default_rng(_seed(seed, epoch, pos.rank, pos.worker, 4, i))
        try:
            with image_io.open_image(sample[shardset.IMAGE_MEMBER]) as im:
                v = make_views(im, sample["proposals"], rng, cfg.views)
        except Exception as e:       # truncated, not an image, DecompressionBombError, ...: this sample only
            stats["errors"] += 1
            failures += 1
            where = (sample.get("__url__"), sample.get("__key__"))
            if where not in logged:
                logged.add(where)
                log.warning("undecodable sample %s in shard %s: %s: %s (skipped; %d errors so far in this worker)",
                            where[1], where[0], type(e).__name__, e, stats["errors"])
            if failures >= cfg.max_sample_failures:
                raise ShardDataError(
                    f"loader worker {pos.worker} of rank {pos.rank} could not decode {failures} samples in a row "
                    f"(loader.max_sample_failures: {cfg.max_sample_failures}); the last, {where[1]} in shard "
                    f"{where[0]}: {type(e).__name__}: {e}. Check the shards' images, or {REBUILD}") from e
            continue
        failures = 0
        consumed += 1
        if consumed <= pos.skip_batches * cfg.batch_size:
            continue                  # consumed before the resume
        v["key"] = sample["__key__"]
        yield v


def collate(samples: list[dict], stats: dict) -> dict:
    """Stack a batch into tensors (images uint8 Bx3xHxW). (The backgrounds of PRM and of x3 are
    other samples' x1, drawn on the device: train.backgrounds.background_donors.) Stacked with numpy:
    torch.stack would use the intra-op thread pool, which only contends with the loader workers."""
    batch = {"key": [s["key"] for s in samples],
             "image_id": torch.tensor([image_id(s["key"]) for s in samples], dtype=torch.long)}
    for k in ("x1", "x2", "x2s"):
        batch[k] = np.ascontiguousarray(np.stack([s[k] for s in samples]).transpose(0, 3, 1, 2))
    for k in ("boxes1", "boxes2", "boxes2s", "valid"):
        batch[k] = np.stack([s[k] for s in samples])
    batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    batch["errors"] = torch.tensor(stats["errors"])
    return batch


def check_world(cfg: LoaderConfig, world: int) -> None:
    """Refuse the exact mode for `world` > 1 training processes: ranks would get unequal numbers of
    batches (unequal shards, undecodable samples) and DDP would hang at the end of the epoch."""
    if world > 1 and not cfg.resampled:
        raise ParamsError(
            f"loader.resampled is false with {world} training processes: ranks would run unequal numbers "
            "of steps (shards hold unequal numbers of good samples) and DDP would wait for ever at the "
            "epoch's end; set loader.resampled: true (every rank gets the same number of batches)")


def batches_per_worker(cfg: LoaderConfig, total_samples: int, world: int) -> int:
    """Resampled mode: batches each (rank, worker) yields per epoch."""
    check_world(cfg, world)
    samples = cfg.epoch_samples or total_samples
    return max(1, math.ceil(samples / (world * max(cfg.workers, 1) * cfg.batch_size)))


def make_stream(shards: list[str], cfg: LoaderConfig, *, seed: int, epoch: int = 0, total_samples: int = 0,
                world: int = 1, start_batch: int = 0) -> wds.DataPipeline:
    """The whole input pipeline as one IterableDataset; each yielded item is a batch.

    `total_samples` (the shards' sample count, from index.json) and `world` (the number of
    training processes the stream feeds; above 1 the resampled mode is required) set the resampled
    epoch length; `start_batch` resumes an epoch after that many batches of this rank.
    """
    check_world(cfg, world)
    if start_batch and not cfg.resampled:
        raise ValueError("resuming inside an epoch needs the resampled mode (loader.resampled: true)")
    stats = {"errors": 0}
    stages = [
        ShardSource(shards, cfg.resampled, seed, epoch, start_batch),   # {"shard"}
        partial(read_shards, stats=stats, max_failures=cfg.max_shard_failures),  # raw samples {jpg, json}
        join_proposals,                                                        # + proposals (n, 4)
        partial(shuffle, bufsize=cfg.shuffle_buffer, seed=seed, epoch=epoch),  # shuffled raw samples
        partial(decode_views, cfg=cfg, seed=seed, epoch=epoch, stats=stats),   # views + boxes, one image
        wds.batched(cfg.batch_size, collation_fn=partial(collate, stats=stats), partial=not cfg.resampled),
    ]   # partials, not lambdas: the pipeline is pickled to forkserver and spawn workers
    pipeline = wds.DataPipeline(*stages)
    if cfg.resampled:
        pipeline = _EpochLimit(pipeline, batches_per_worker(cfg, total_samples, world), start_batch)
    return pipeline


class _EpochLimit(torch.utils.data.IterableDataset):
    """Stop each worker after its share of the epoch's batches (minus those consumed before a resume)."""

    def __init__(self, pipeline, batches: int, start_batch: int):
        super().__init__()
        self.pipeline, self.batches, self.start_batch = pipeline, batches, start_batch

    def __iter__(self):
        remaining = self.batches - _worker_slot(self.start_batch)[2]
        if remaining <= 0:
            return
        for i, batch in enumerate(self.pipeline):
            yield batch
            if i + 1 >= remaining:
                break


def make_loader(shards: list[str], cfg: LoaderConfig, *, seed: int, epoch: int = 0, total_samples: int = 0,
                world: int = 1, start_batch: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over `make_stream` (the stream batches; the loader only runs the workers).
    `pin_memory` (set by the trainer on CUDA) makes the host-to-GPU copies asynchronous."""
    stream = make_stream(shards, cfg, seed=seed, epoch=epoch, total_samples=total_samples, world=world,
                         start_batch=start_batch)
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg.workers,
        worker_init_fn=partial(loader_workers.worker_init, trainer_pid=os.getpid()),   # workers exit with this process
        persistent_workers=False, prefetch_factor=2 if cfg.workers else None, pin_memory=pin_memory,
        # the workers' base seed from the stream's own seed, not a draw from the global RNG: the
        # stream seeds itself (`_seed`), and the trainer may start a loader at any step
        generator=torch.Generator().manual_seed(_seed(seed, epoch, 5)),
        multiprocessing_context=loader_workers.context(cfg.start_method) if cfg.workers else None,
    )
