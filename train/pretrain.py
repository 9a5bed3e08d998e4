"""Streaming pre-training stage: one method, DDP over any number of processes.

    python -m train.pretrain --shards data/shards --out runs/d3ssl --method d3ssl [--params params.yaml] [--resume|--fresh]
    python -m train.launch --params params.yaml ...          # the stage: torchrun above pretrain.nproc_per_node 1
    torchrun --nproc_per_node=4 -m train.pretrain --shards data/shards --out runs/d3ssl --method d3ssl
    torchrun --nnodes=2 --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 --nproc_per_node=8 \
        -m train.pretrain ...

Reads the shards' `index.json`, streams batches (`train.stream`, resampled: equal batches per rank),
and trains the method (`train.methods`). Besides the loss terms, every step logs the health of the
run: the chance level ln(queue + 1) of each InfoNCE term (`*_chance`, `loss_chance`), the
positive's rank-1 accuracy among the negatives (`top1`; in-batch retrieval for soco) and the spread
of the normalised keys (`key_std`: 1 spread over the sphere, 0 collapsed); d3ssl also logs
`shift_px`, the mean |t| of the de-positioning shift in pixels of the x2 view. At the end,
`summary.json` holds `health` over the last steps, and a run that ends at chance or collapsed is
warned about (log and report). DDP: gloo on CPU, NCCL on CUDA; on CUDA also bf16 autocast and
channels_last, and SyncBN in the student of methods without shuffle-BN (soco). Logged with dvclive under RUN_DIR/dvclive on rank 0 (loss
terms, learning rate, teacher momentum, images/s, queue fill) with a progress bar.

Snapshots: after each step of `snapshot_steps`, the student backbone is exported (as train.export
does) to RUN_DIR/snapshots/step<N>/, for learning curves (eval.curve).

Checkpoints (RUN_DIR/checkpoint.pt) are written atomically every `checkpoint_every` steps, at each
epoch end, at the last step, and at least every `checkpoint_minutes` of wall time (rank 0's clock
decides and broadcasts, so every rank saves at the same step). They hold everything needed to
continue exactly: the method's state (student, teacher, predictor, queue), optimiser, step, stream
position (epoch and batch in it), the RNG states of every rank (torch, CUDA, numpy, python, the
region-augmentation generator), the last steps' health records, the settings and the run's stamp.
They load with `torch.load(..., weights_only=True)`. On the CPU with `deterministic: true` a resumed
run is bitwise an uninterrupted one.

Stamp and resume: the stamp (also in RUN_DIR/stamp.json, beside the checkpoint) is a hash of the
stamped settings (`pretrain` with `loader`, `methods.<name>`, the method and world size; not
`max_steps`, `checkpoint_every`, `checkpoint_minutes`, `snapshot_steps`, `nproc_per_node`,
`loader.start_method`, which do not change what is trained), the content hash of the shards'
`index.json` and the code version (the sources of this module's import closure in train/ and
pipeline/). Without flags a run resumes a checkpoint with its own stamp and logs `resumed from
step N`; any other checkpoint is ignored, with a log line naming what differs, and overwritten
at the first save (`dvc.yaml` keeps the checkpoint with `persist: true`, so a `dvc repro` after a
crash continues the run). `--resume` requires a checkpoint: none, or one whose settings change
the stream or the schedule (`STREAM_SETTINGS`: method, world size, seed, epochs, batch size,
loader workers, ...; or other shards), is an error naming the setting; other changes (code,
learning rate) are warned about and resumed across. `--fresh` starts clean.

Multi-process and multi-node resume: every rank reads RUN_DIR/checkpoint.pt itself, so the run
folder must be on storage that every rank (every node) sees, e.g. a shared file system. The ranks
gather (resume, step, epoch, batch, stamp) and stop together, naming the rows, if they disagree;
after loading, rank 0's weights, queue and optimiser state are broadcast to all.

Settings: the `pretrain` section (shared by every method, so they train on the same schedule),
`loader` (batches, views) and `methods.<name>` of params.yaml.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

from pipeline.files import atomic_path, write_text
from pipeline.params import ParamsError, as_dict, from_dict, override
from train import dist
from train.export import write_export
from train.methods import DEFAULTS, METHODS, MethodConfig, build, prepare
from train.optim import learning_rate, make_optimizer
from train.stream import LoaderConfig, batches_per_worker, make_loader, read_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """The `pretrain` section of params.yaml."""

    arch: str = "resnet50"
    roi_size: int = 14                      # RoIAlign output on C4 (MoCo/SoCo C4: 14; res5 halves it)
    epochs: int = 800                       # paper: 800 epochs on COCO / OpenImage-MINI
    optimizer: Literal["sgd", "lars"] = "sgd"
    base_lr: float = 0.03                   # per 256 images (MoCo v2)
    weight_decay: float = 1e-4              # MoCo v2
    sgd_momentum: float = 0.9
    warmup_epochs: float = 0.0
    checkpoint_every: int = 500             # steps
    checkpoint_minutes: float = 10.0        # also a checkpoint at least this often in wall time (0: off)
    nproc_per_node: int = 1                 # processes per node; the stage runs torchrun above 1 (train.launch)
    seed: int = 0
    deterministic: bool = False             # torch deterministic algorithms (bitwise resume on CPU)
    bf16_cpu: bool = False                  # bf16 autocast on the CPU too (always on CUDA); ~1.4x on AVX512-BF16
    max_steps: int = 0                      # stop after this many steps (0: the whole schedule)
    bn_splits: int = 1                      # batch-norm groups per process (MoCo's SplitBatchNorm; shuffle-BN)
    snapshot_steps: tuple[int, ...] = ()    # also export the student backbone after these steps (learning curves)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ParamsError(f"pretrain.nproc_per_node is {self.nproc_per_node}; it must be at least 1")
        if self.bn_splits < 1 or self.loader.batch_size < 2 * self.bn_splits:
            raise ParamsError(f"pretrain.bn_splits is {self.bn_splits} with loader.batch_size {self.loader.batch_size}: "
                              "batch norm needs at least 2 images per group; lower bn_splits or raise batch_size")


def method_config(name: str, params: Path | None) -> MethodConfig:
    """`methods.<name>` of params.yaml, or the method's defaults without a params file."""
    if params is None:
        return DEFAULTS[name]
    doc = yaml.safe_load(Path(params).read_text()) or {}
    methods = doc.get("methods", {})
    if name not in methods:
        raise ParamsError(f"{params}: no block methods.{name} (present: {sorted(methods)})")
    return from_dict(MethodConfig, methods[name], f"{params}:methods.{name}")


def load_config(params: Path | None) -> PretrainConfig:
    """`pretrain` with the `loader` section of the same file nested in."""
    if params is None:
        return PretrainConfig()
    doc = yaml.safe_load(Path(params).read_text()) or {}
    if not isinstance(doc, dict):
        raise ParamsError(f"{params}: expected a mapping of sections at the top level")
    section = doc.get("pretrain")
    if section is not None and not isinstance(section, dict):
        raise ParamsError(f"{params}:pretrain: expected a mapping of PretrainConfig settings (key: value lines), "
                          f"got {type(section).__name__} {section!r}")
    section = dict(section or {})
    if "loader" in doc:
        section["loader"] = doc["loader"]
    return from_dict(PretrainConfig, section, f"{params}:pretrain")


# ---------------------------------------------------------------------------------- RNG states


def rng_state(aug: torch.Generator) -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
        "augment": aug.get_state(),
    }


def set_rng_state(state: dict, aug: torch.Generator) -> None:
    """Restore `rng_state`'s states; they come back as CPU tensors whatever `map_location` the
    checkpoint was loaded with (the RNG setters accept only CPU ByteTensors)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].cpu().numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    aug.set_state(state["augment"].cpu())


# ---------------------------------------------------------------------------------------- loop


def weights_checksum(module: torch.nn.Module) -> int:
    """A 63-bit digest of a module's parameters and buffers (bitwise: any difference shows)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0          # batches of this rank already consumed in `epoch`


def checkpoint(path: Path, method, optimizer, pos: Position, aug: torch.Generator, meta: dict) -> None:
    """Called on every rank: BN statistics are averaged over ranks, the RNG states of every rank
    gathered, then rank 0 saves (with the stamp beside it, RUN_DIR/stamp.json)."""
    dist.average_buffers(method.student)
    dist.average_buffers(method.teacher)
    rngs = dist.all_gather_object(rng_state(aug))
    if dist.rank() == 0:
        save_checkpoint(path, method, optimizer, pos, rngs, meta)


def save_checkpoint(path: Path, method, optimizer, pos: Position, rngs: list[dict], meta: dict) -> None:
    state = {
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": pos.step, "epoch": pos.epoch, "batch": pos.batch,
        "rng": rngs,                        # one per rank
        **meta,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    if "stamp" in meta:
        write_text(path.parent / STAMP_FILE, json.dumps(meta["stamp"], indent=2) + "\n")


# ------------------------------------------------------------------------------ stamp, resume

REPO = Path(__file__).resolve().parents[1]
STAMP_FILE = "stamp.json"
# Settings that do not change what is trained (where to stop, how often to save, how to launch):
# left out of the stamp, so a run can be continued with another max_steps or checkpoint interval.
UNSTAMPED = {"max_steps", "checkpoint_every", "checkpoint_minutes", "snapshot_steps", "nproc_per_node",
             "loader.start_method", "loader.max_shard_failures", "loader.max_sample_failures"}
# Settings that change the stream or the schedule: an explicit --resume across a change of one is refused.
STREAM_SETTINGS = ("method", "arch", "world_size", "seed", "epochs", "warmup_epochs", "loader.batch_size",
                   "loader.workers", "loader.shuffle_buffer", "loader.resampled", "loader.epoch_samples")


class ResumeError(RuntimeError):
    """A resume that cannot continue the run (no checkpoint, or a setting that changes the stream)."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_settings(method_name: str, cfg: dict, mcfg: dict, world: int) -> dict:
    """The stamped settings, flat ("loader.batch_size"): method, world size, `pretrain` with `loader`
    (as dicts, less UNSTAMPED) and `methods.<name>`."""
    flat = {"method": method_name, "world_size": world}
    flat.update({k: v for k, v in _flatten(cfg).items() if k not in UNSTAMPED})
    flat.update(_flatten(mcfg, f"methods.{method_name}."))
    return flat


def code_files(start: str = "train/pretrain.py") -> list[str]:
    """The project modules `start` imports, directly or not (its import closure in train/ and
    pipeline/, function-level imports included), as paths relative to the repository."""
    seen, todo = set(), [start]
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        for node in ast.walk(ast.parse((REPO / rel).read_text(), rel)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ("train", "pipeline") and (REPO / (name.replace(".", "/") + ".py")).is_file():
                    todo.append(name.replace(".", "/") + ".py")
    return sorted(seen)


def code_version() -> str:
    """sha256 over the sources of `code_files()`: the code version part of the stamp."""
    h = hashlib.sha256()
    for rel in code_files():
        h.update(rel.encode() + b"\0" + (REPO / rel).read_bytes() + b"\0")
    return h.hexdigest()


def make_stamp(shards: Path, method_name: str, cfg: PretrainConfig, mcfg: MethodConfig, world: int) -> dict:
    """What a checkpoint was trained from: the stamped settings (and their hash), the content hash
    of the shards' index.json and the code version."""
    settings = run_settings(method_name, as_dict(cfg), as_dict(mcfg), world)
    return {"params": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
            "shards": hashlib.sha256((Path(shards) / "index.json").read_bytes()).hexdigest(),
            "code": code_version(), "settings": settings}


def stamp_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes of the stream or schedule, other changes) from stamp `old` to `new`, in words."""
    stream, other = [], []
    a, b = old.get("settings", {}), new["settings"]
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            (stream if k in STREAM_SETTINGS else other).append(f"{k} was {a.get(k)!r}, is now {b.get(k)!r}")
    if old.get("shards") != new["shards"]:       # unknown for a checkpoint written before stamps
        (stream if old.get("shards") else other).append(
            "the shards' index.json differs" if old.get("shards") else "the shards are unknown")
    if old.get("code") != new["code"]:
        other.append("the code version (train/ sources) differs" if old.get("code") else "the code version is unknown")
    return stream, other


def legacy_stamp(state: dict) -> dict:
    """The settings part of the stamp of a checkpoint written before stamps were."""
    return {"settings": run_settings(state["method"], state.get("config", {}), state.get("method_config", {}),
                                     state["world_size"])}


def plan_resume(ckpt: Path, state: dict | None, stamp: dict, mode: str, stop: int) -> bool:
    """Whether to continue from the checkpoint `state` (None: there is none). `mode`: "auto" resumes
    a checkpoint of the same stamp and starts clean otherwise, saying why; "require" (--resume)
    resumes or raises ResumeError (no checkpoint, or a changed setting of the stream or schedule;
    other changes are warned about); "never" starts clean."""
    if mode == "never" or state is None:
        if state is None and mode == "require":
            raise ResumeError(f"--resume: there is no checkpoint {ckpt} to resume; run without --resume to "
                              "start (a checkpoint of the same run is resumed automatically)")
        if state is not None:
            log.info("not resuming %s (step %d): asked to start clean", ckpt, state["step"])
        return False
    old = state.get("stamp") or legacy_stamp(state)
    stream, other = stamp_changes(old, stamp)
    if mode == "require":
        if state["method"] != stamp["settings"]["method"] or state["world_size"] != stamp["settings"]["world_size"]:
            raise ResumeError(f"{ckpt} is a {state['method']} run on {state['world_size']} processes; cannot "
                              f"resume it as {stamp['settings']['method']} on {stamp['settings']['world_size']}")
        if stream:
            raise ResumeError(f"cannot resume {ckpt}: {'; '.join(stream)}. That changes the stream or the "
                              "schedule; restore the setting, or run without --resume to start clean")
        if state["step"] > stop:
            raise ResumeError(f"cannot resume {ckpt}: it is at step {state['step']}, past pretrain.max_steps {stop}")
        if other:
            log.warning("resuming %s although %s", ckpt, "; ".join(other))
        return True
    if stream or other:
        log.info("not resuming %s (step %d): its stamp differs (%s); starting clean", ckpt, state["step"],
                 "; ".join(stream + other))
        return False
    if state["step"] > stop:
        log.info("not resuming %s: it is at step %d, past pretrain.max_steps %d; starting clean",
                 ckpt, state["step"], stop)
        return False
    return True


def agree_on_resume(resume: bool, pos: Position, stamp: dict, error: Exception | None, dev: torch.device) -> None:
    """Every rank must resume the same checkpoint step with the same stamp (the run folder on
    storage all ranks see, the same code and params on every node): gather and compare, and raise
    on every rank alike (no rank is left waiting in a collective)."""
    digest = int.from_bytes(hashlib.sha256((stamp["params"] + stamp["shards"] + stamp["code"]).encode()).digest()[:8],
                            "little") >> 1
    row = torch.tensor([[-1 if error else int(resume), pos.step, pos.epoch, pos.batch, digest]], dtype=torch.int64,
                       device=dev)
    rows = dist.all_gather(row).cpu()
    if error is not None:
        raise error
    if (rows[:, 0] < 0).any():
        raise ResumeError(f"rank(s) {torch.nonzero(rows[:, 0] < 0).flatten().tolist()} could not plan the resume")
    if not (rows == rows[0]).all():
        raise ResumeError("the ranks disagree on the resume (resume, step, epoch, batch, stamp digest per rank: "
                          f"{rows.tolist()}); the run folder must be on storage that every rank sees, with the same "
                          "code, params and shards on every node")


def train(shards: Path, out: Path, method_name: str, cfg: PretrainConfig, mcfg: MethodConfig,
          resume: bool | str = "auto", device: str | None = None, progress: bool = True,
          summary_copy: Path | None = None) -> dict:
    """Pre-train `method_name`; returns the run summary (also written to out/summary.json and, if
    given, to `summary_copy`, where the report reads the run's health).

    `resume`: "auto" (continue a checkpoint of the same stamp, else start clean), "require" or True
    (continue or raise ResumeError), "never" or False (start clean)."""
    mode = {True: "require", False: "never"}.get(resume, resume) if isinstance(resume, bool) else resume
    if mode not in ("auto", "require", "never"):
        raise ValueError(f"resume is {resume!r}; use auto, require or never")
    from tqdm import tqdm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dist.local_rank())
        dev = torch.device("cuda", dist.local_rank())
    dist.init_from_env(dev)
    rank, world = dist.rank(), dist.world_size()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    on_cuda = dev.type == "cuda"

    urls, total = read_index(shards)
    steps_per_epoch = max(cfg.loader.workers, 1) * batches_per_worker(cfg.loader, total, world)
    total_steps = cfg.epochs * steps_per_epoch
    batch_global = cfg.loader.batch_size * world
    peak_lr = cfg.base_lr * batch_global / 256
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    torch.manual_seed(cfg.seed)                      # identical initial weights on every rank
    method = build(method_name, cfg.arch, mcfg, roi_size=cfg.roi_size, bn_splits=cfg.bn_splits).to(dev)
    if mcfg.shuffle_bn and world * cfg.bn_splits < 2:
        log.warning("methods.%s.shuffle_bn has no effect with one batch-norm group (one process, "
                    "pretrain.bn_splits: 1): the key shares its query's statistics; set bn_splits >= 2",
                    method_name)
    if on_cuda and world > 1 and not mcfg.shuffle_bn:
        # SyncBN for the student only without shuffle-BN: its global statistics would contain
        # every key's shuffled group (MoCo keeps per-GPU BN for the query)
        method.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.student)
        if getattr(method, "predictor", None) is not None:      # SoCo/BYOL's predictor is the student's too
            method.predictor = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.predictor)
    if on_cuda:
        method = method.to(memory_format=torch.channels_last)
    model = method
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[dev.index] if on_cuda else None, broadcast_buffers=False)
    optimizer = make_optimizer(method.trainable(), cfg.optimizer, peak_lr, cfg.weight_decay, cfg.sgd_momentum)
    aug = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + rank)

    out.mkdir(parents=True, exist_ok=True)
    (out / "snapshots").mkdir(exist_ok=True)
    ckpt = out / "checkpoint.pt"
    stop = cfg.max_steps or total_steps
    stamp = make_stamp(shards, method_name, cfg, mcfg, world)
    pos, resumed, error, state = Position(), False, None, None
    recent: deque[dict] = deque(maxlen=HEALTH_WINDOW)
    try:
        # every rank reads the checkpoint itself: the run folder must be on shared storage
        state = torch.load(ckpt, map_location=dev, weights_only=True) if ckpt.is_file() else None
        resumed = plan_resume(ckpt, state, stamp, mode, stop)
        if resumed:
            pos = Position(state["step"], state["epoch"], state["batch"])
    except ResumeError as e:
        error = e
    agree_on_resume(resumed, pos, stamp, error, dev)
    if resumed:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]] * world
        set_rng_state(rngs[rank], aug)
        recent.extend(state.get("recent", []))
        # the same weights, queue and optimiser state on every rank, whatever each rank read
        dist.broadcast_([*method.state_dict().values(),
                         *(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))])
        log.info("resumed from step %d (epoch %d, batch %d) of %s", pos.step, pos.epoch, pos.batch, ckpt)
        missing = [s for s in cfg.snapshot_steps if s <= pos.step and not (out / "snapshots" / f"step{s}").is_dir()]
        if missing and rank == 0:
            log.warning("snapshots of steps %s are missing and will not be written (the run resumed after them)",
                        missing)
    elif rank == 0:
        for old in (out / "snapshots").iterdir():      # a clean start keeps no snapshot of another run
            if old.is_dir() and old.name.startswith("step"):
                shutil.rmtree(old)
    del state
    meta = {"method": method_name, "arch": cfg.arch, "world_size": world,
            "config": as_dict(cfg), "method_config": as_dict(mcfg), "stamp": stamp}

    live = open_live(out / "dvclive", resume=resumed and pos.step > 0) if rank == 0 else None
    if live is not None:
        for k, v in {"method": method_name, "arch": cfg.arch, "world_size": world, "steps": total_steps}.items():
            live.log_param(k, v)

    bar = tqdm(total=min(stop, total_steps), initial=pos.step, desc=method_name, unit="step",
               disable=not (progress and rank == 0))
    t_last, seen = time.perf_counter(), 0
    saved = {"step": pos.step if resumed else -1, "time": time.monotonic()}

    def save() -> None:
        """A checkpoint of the current step (once per step), on every rank together."""
        if saved["step"] != pos.step:
            checkpoint(ckpt, method, optimizer, pos, aug, {**meta, "recent": list(recent)})
            saved.update(step=pos.step, time=time.monotonic())

    def time_is_up() -> bool:
        """pretrain.checkpoint_minutes since the last checkpoint: rank 0's clock decides for all ranks."""
        if not cfg.checkpoint_minutes:
            return False
        due = torch.tensor([int(time.monotonic() - saved["time"] >= 60 * cfg.checkpoint_minutes)], device=dev)
        return bool(dist.broadcast(due).item())

    model.train()
    while pos.epoch < cfg.epochs and pos.step < stop:
        loader = make_loader(urls, cfg.loader, seed=cfg.seed, epoch=pos.epoch, total_samples=total,
                             world=world, start_batch=pos.batch, pin_memory=on_cuda)
        for batch in loader:
            lr = learning_rate(pos.step, total_steps, warmup, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            b = prepare(batch, dev, channels_last=on_cuda)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on_cuda or cfg.bf16_cpu):
                loss, terms = model(b, aug, pos.step / max(1, total_steps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pos.step += 1
            pos.batch += 1
            seen += len(batch["key"])
            chance = sum(float(v) for k, v in terms.items() if k.endswith("_chance"))
            recent.append({"loss": loss.item(), "chance": chance, "top1": float(terms.get("top1", float("nan"))),
                           "key_std": float(terms.get("key_std", float("nan")))})
            bar.update()
            if live is not None:
                now = time.perf_counter()
                live.log_metric("train/loss", loss.item())
                if recent[-1]["chance"]:
                    live.log_metric("train/loss_chance", recent[-1]["chance"])
                for k, v in terms.items():
                    live.log_metric(f"train/{k}", float(v))
                live.log_metric("train/lr", lr)
                live.log_metric("train/momentum", method.last_momentum)
                live.log_metric("train/queue_fill", method.queue_fill())
                live.log_metric("train/images_per_s", seen * world / max(now - t_last, 1e-9))
                live.log_metric("train/loader_errors", int(batch["errors"]))
                live.next_step()
                t_last, seen = now, 0
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if pos.step % cfg.checkpoint_every == 0 or time_is_up():
                save()
            if pos.step in cfg.snapshot_steps and rank == 0:
                write_export(method.student.backbone_state_dict(), out / "snapshots" / f"step{pos.step}",
                             {"method": method_name, "arch": cfg.arch, "step": pos.step})
            if pos.step >= stop:
                break
        else:
            pos.epoch, pos.batch = pos.epoch + 1, 0
            saved["step"] = -1                  # the epoch end moved the position: save it
            save()
            continue
        save()
        break
    bar.close()
    # Every rank must hold the same student; gather a checksum of each rank's weights to show it.
    sums = dist.all_gather(torch.tensor([weights_checksum(method.student)], dtype=torch.int64, device=dev))
    summary = {"method": method_name, "arch": cfg.arch, "steps": pos.step,
               "epochs_done": pos.step // steps_per_epoch,     # complete epochs (the position's epoch lags at an epoch's last step)
               "total_steps": total_steps, "world_size": world, "finished": pos.step >= total_steps,
               "student_checksums": [int(x) for x in sums.tolist()],
               "ranks_identical": bool((sums == sums[0]).all()), "health": health(list(recent))}
    if rank == 0:
        for problem in summary["health"]["problems"]:
            log.warning("UNHEALTHY RUN %s: %s", out, problem)
        for path in [out / "summary.json"] + ([summary_copy] if summary_copy else []):
            write_text(path, json.dumps(summary, indent=2) + "\n")
        live.end()
    dist.barrier()
    return summary


HEALTH_WINDOW = 20        # steps averaged for the end-of-run health check
AT_CHANCE = 0.95          # loss / chance level at or above this: the queue method learned nothing
COLLAPSED = 0.1           # key spread (1: spread over the sphere, 0: one point) below this: collapse


def health(recent: list[dict]) -> dict:
    """The end-of-run check over the last steps: loss against its chance level ln(queue + 1) per
    InfoNCE term, the positive's rank-1 accuracy, the key spread; `problems` says what is wrong."""
    if not recent:
        return {"steps": 0, "problems": []}
    mean = {k: float(np.nanmean([r[k] for r in recent])) if not all(np.isnan(r[k]) for r in recent) else None
            for k in ("loss", "chance", "top1", "key_std")}
    out = {"steps": len(recent), **mean, "loss_over_chance": None, "problems": []}
    if mean["chance"]:
        out["loss_over_chance"] = mean["loss"] / mean["chance"]
        if out["loss_over_chance"] >= AT_CHANCE:
            out["problems"].append(f"ends at chance: loss {mean['loss']:.3f} against the chance level "
                                   f"{mean['chance']:.3f} (ln(queue + 1) per InfoNCE term), rank-1 accuracy "
                                   f"{mean['top1']:.3f}")
    if mean["key_std"] is not None and mean["key_std"] < COLLAPSED:
        out["problems"].append(f"collapsed keys: spread {mean['key_std']:.3f} (1 = spread over the sphere, 0 = one point)")
    return out


def open_live(path: Path, resume: bool):
    """A dvclive logger at `path`, also inside a git repository that has no commit yet.

    dvclive 3.49 asks git for the current revision when it starts and raises on a repository with
    no commit (a fresh `git init`, or a copy of the project). The metrics do not need a revision,
    so there it logs without one (no experiment reference), and says so.
    """
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    try:
        return Live(str(path), resume=resume, save_dvc_exp=False, dvcyaml=None)
    except SCMError as e:
        log.warning("dvclive: %s; logging %s without a git revision", e, path)
        from unittest import mock

        with mock.patch("dvclive.live.get_dvc_repo", return_value=None):
            return Live(str(path), resume=resume, save_dvc_exp=False, dvcyaml=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, type=Path, help="folder with index.json and the shards")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoint, dvclive, summary)")
    p.add_argument("--method", default="d3ssl", choices=sorted(METHODS))
    p.add_argument("--params", type=Path, help="params.yaml (sections pretrain, loader, methods)")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/checkpoint.pt, or fail: no checkpoint, or a changed setting of the "
                        "stream or schedule (default: continue it only if its stamp matches, else start clean)")
    p.add_argument("--fresh", action="store_true", help="start clean even if a checkpoint of the same run exists")
    p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, help="overrides pretrain.seed (initial weights, stream, augmentations)")
    p.add_argument("--summary", type=Path, help="also write summary.json (steps, health) here, e.g. for the report")
    args = p.parse_args(argv)
    if args.resume and args.fresh:
        p.error("--resume and --fresh exclude each other")
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    cfg = override(load_config(args.params), seed=args.seed)
    mode = "require" if args.resume else "never" if args.fresh else "auto"
    try:
        train(args.shards, args.out, args.method, cfg, method_config(args.method, args.params), mode, args.device,
              summary_copy=args.summary)
    except ResumeError as e:
        log.error("%s", e)
        dist.destroy()
        return 2
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
