"""The pre-training run's checkpoint: what it holds, when it is written, and whether a rerun
continues it.

A checkpoint (RUN_DIR/checkpoint.pt, written atomically by rank 0 after every rank has averaged
its BN statistics and handed over its RNG states) holds the method's state (student, teacher,
predictor, queue), the optimiser, the run position (step, epoch, batch in the epoch), the RNG
states of every rank (torch, CUDA, numpy, python, the region-augmentation generator), the last
steps' health records, the settings and the run's stamp. It loads with
`torch.load(..., weights_only=True)`.

The stamp says what a checkpoint was trained from: a hash of the stamped settings (`pretrain`
with `loader`, `methods.<name>`, the method and world size; not the UNSTAMPED ones, which do not
change what is trained; and the versions of torch, torchvision and Pillow, `versions.<library>`,
since an upgrade changes the kernels and the image decoding that produced the weights), the content
hash of the shards' index.json and the code version (`pipeline.closure.code_version` of
`train.pretrain`: its import closure's syntax trees, so an edit to a comment or docstring is no
change). RUN_DIR/stamp.json shows it beside the checkpoint; it is written when the stamp it holds
differs (once per run, not at every checkpoint). `load_checkpoint` reads a checkpoint (an unreadable
or old-format one starts clean, or is an error under --resume), `plan_resume` compares its stamp
with the run's, `agree_on_resume` makes every rank take the same decision.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import shardset, storage
from pipeline.closure import code_version
from pipeline.files import atomic_path, write_text
from pipeline.params import as_dict
from train import dist

log = logging.getLogger(__name__)

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


def seed_host_rngs(seed: int) -> None:
    """Seed Python's and NumPy's global generators. Training draws nothing from them (the
    augmentations use `aug`, the stream its own seeds), but a checkpoint stores their states for
    the resume: left seeded from the OS they made two runs of the same settings write different
    checkpoint bytes, so `dvc.lock` changed after every clean `dvc repro`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)


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


def weights_checksum(module: torch.nn.Module) -> int:
    """A 63-bit digest of a module's parameters and buffers (bitwise: any difference shows)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


@dataclass
class RunPosition:
    """Where a run is: steps done, the epoch, and the batches of this rank consumed in it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0          # batches of this rank already consumed in `epoch`


def checkpoint(path: Path, method, optimizer, pos: RunPosition, aug: torch.Generator, meta: dict) -> None:
    """Called on every rank: BN statistics are averaged over ranks, the RNG states of every rank
    gathered, then rank 0 saves (with the stamp beside it, RUN_DIR/stamp.json)."""
    dist.average_buffers(method.student)
    dist.average_buffers(method.teacher)
    rngs = dist.all_gather_object(rng_state(aug))
    if dist.rank() == 0:
        save_checkpoint(path, method, optimizer, pos, rngs, meta)


def save_checkpoint(path: Path, method, optimizer, pos: RunPosition, rngs: list[dict], meta: dict) -> None:
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
        write_stamp(path.parent / STAMP_FILE, meta["stamp"])


def write_stamp(path: Path, stamp: dict) -> bool:
    """Write `stamp` to `path` unless the file already holds it (a run's checkpoints share one
    stamp: it is written once per run). Returns whether it wrote."""
    text = json.dumps(stamp, indent=2) + "\n"
    if path.is_file() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


# ------------------------------------------------------------------------------ stamp, resume

STAMP_FILE = "stamp.json"
# Settings that do not change what is trained (where to stop, how often to save, how to launch):
# left out of the stamp, so a run can be continued with another max_steps or checkpoint interval.
UNSTAMPED = {"max_steps", "checkpoint_every", "checkpoint_minutes", "snapshot_steps", "nproc_per_node",
             "loader.start_method", "loader.max_shard_failures", "loader.max_sample_failures"}
# The stamped settings an explicit --resume may continue across (with a warning). Every other
# stamped setting is part of what the checkpoint was trained with, and a change is refused:
#  - the model and its state (arch, roi_size, bn_splits, methods.<name>.*: queue_size, proj_dim,
#    ...) and the optimiser (optimizer, weight_decay, sgd_momentum): load_state_dict would fail,
#    or load the state into a different network or update rule;
#  - the schedule (epochs, warmup_epochs, base_lr): the cosine learning rate and the teacher
#    momentum are functions of the step and of total_steps = epochs x steps per epoch, so a
#    resumed run with another value follows a curve the checkpoint never was on (extend a run
#    with a new run folder; stop it early with max_steps, which is not stamped);
#  - the stream (seed, loader.*: batch, workers, views, shuffle buffer): the run position (epoch,
#    batch in the epoch) would point into another sequence of images;
#  - the libraries (versions.*): other kernels and decoders under the same weights.
# `deterministic` only picks torch's deterministic kernels for the same computation: it changes
# no state, shape, stream or schedule (a resumed run is then no longer bitwise an undisturbed one).
RESUME_MAY_CHANGE = frozenset({"deterministic"})
# The libraries whose versions the stamp holds (`library_versions`).
VERSIONED_LIBRARIES = ("torch", "torchvision", "Pillow")
VERSIONS_PREFIX = "versions."
# What every checkpoint `save_checkpoint` writes holds; one without them is of an older format.
CHECKPOINT_KEYS = ("model", "optimizer", "step", "epoch", "batch", "rng", "method", "world_size")


class ResumeError(RuntimeError):
    """A resume that cannot continue the run (no checkpoint, an unreadable one, or a changed setting)."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def library_versions() -> dict[str, str]:
    """`{"versions.torch": ..., "versions.torchvision": ..., "versions.Pillow": ...}`: stamped,
    because a checkpoint continued under other kernels (torch), transforms (torchvision) or JPEG
    decoding (Pillow) is no longer the run its stamp describes."""
    import PIL
    import torchvision

    found = {"torch": torch.__version__, "torchvision": torchvision.__version__, "Pillow": PIL.__version__}
    return {f"{VERSIONS_PREFIX}{name}": str(found[name]) for name in VERSIONED_LIBRARIES}


def run_settings(method_name: str, cfg: dict, mcfg: dict, world: int) -> dict:
    """The stamped settings, flat ("loader.batch_size"): method, world size, `pretrain` with `loader`
    (as dicts, less UNSTAMPED) and `methods.<name>`."""
    flat = {"method": method_name, "world_size": world}
    flat.update({k: v for k, v in _flatten(cfg).items() if k not in UNSTAMPED})
    flat.update(_flatten(mcfg, f"methods.{method_name}."))
    return flat


def make_stamp(shards: str | Path, method_name: str, cfg, mcfg, world: int) -> dict:
    """What a checkpoint was trained from: the stamped settings with the library versions (and
    their hash), the content hash of the shards' index.json and the code version."""
    settings = {**run_settings(method_name, as_dict(cfg), as_dict(mcfg), world), **library_versions()}
    return {"params": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
            "shards": storage.sha256(storage.join(shards, shardset.INDEX_NAME)),
            "code": code_version("train.pretrain"), "settings": settings}


def stamp_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes --resume refuses, changes it continues across with a warning) from stamp `old` to
    `new`, in words. Refused: any stamped setting outside RESUME_MAY_CHANGE, other shards.
    Continued across: RESUME_MAY_CHANGE, the code version (a fix to the sources is what a resume
    after a crash often follows; the settings above pin what the state means)."""
    refused, other = [], []
    a, b = old.get("settings", {}), new["settings"]
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            was = f"was {a[k]!r}" if k in a else "was not stamped"
            now = f"is now {b[k]!r}" if k in b else "is now not set"
            # a checkpoint from before the library versions were stamped: unknown, not changed
            unknown = k not in a and k.startswith(VERSIONS_PREFIX)
            (other if k in RESUME_MAY_CHANGE or unknown else refused).append(f"{k} {was}, {now}")
    if old.get("shards") != new["shards"]:       # unknown for a checkpoint written before stamps
        (refused if old.get("shards") else other).append(
            "the shards' index.json differs" if old.get("shards") else "the shards are unknown")
    if old.get("code") != new["code"]:
        other.append("the code version (the sources train.pretrain imports) differs" if old.get("code") else "the code version is unknown")
    return refused, other


def legacy_stamp(state: dict) -> dict:
    """The settings part of the stamp of a checkpoint written before stamps were."""
    return {"settings": run_settings(state["method"], state.get("config", {}), state.get("method_config", {}),
                                     state["world_size"])}


def load_checkpoint(ckpt: Path, device: torch.device, mode: str) -> dict | None:
    """The checkpoint at `ckpt`, or None where there is none to continue. A file that does not load
    (truncated, corrupt, not a checkpoint) or lacks CHECKPOINT_KEYS (an older format) cannot be
    continued: in "require" mode (--resume) that is a ResumeError naming the file; otherwise a
    warning, and the run starts clean (overwriting it at its first checkpoint), as after a stamp
    mismatch: DVC reruns the stage without flags and must not stop on a file it cannot use."""
    if not ckpt.is_file():
        return None
    try:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not a checkpoint's dict")
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        if missing:
            raise ValueError(f"it lacks {missing} (an older format, or not a pre-training checkpoint)")
    except Exception as e:     # noqa: BLE001  (torch.load raises RuntimeError, UnpicklingError, EOFError, ...)
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
        if mode == "require":
            raise ResumeError(f"--resume: cannot read the checkpoint {ckpt} ({why}); delete or move it away and "
                              "run without --resume to start clean, or restore a readable checkpoint") from e
        if mode != "never":
            log.warning("cannot read the checkpoint %s (%s); starting clean (it is overwritten at the first "
                        "checkpoint)", ckpt, why)
        return None
    return state


def plan_resume(ckpt: Path, state: dict | None, stamp: dict, mode: str, stop: int) -> bool:
    """Whether to continue from the checkpoint `state` (None: there is none). `mode`: "auto" resumes
    a checkpoint of the same stamp and starts clean otherwise, saying why; "require" (--resume)
    resumes or raises ResumeError (no checkpoint, or a changed stamped setting outside
    RESUME_MAY_CHANGE, or other shards; the changes it allows, and the code version, are warned
    about); "never" starts clean."""
    if mode == "never" or state is None:
        if state is None and mode == "require":
            raise ResumeError(f"--resume: there is no checkpoint {ckpt} to resume; run without --resume to "
                              "start (a checkpoint of the same run is resumed automatically)")
        if state is not None:
            log.info("not resuming %s (step %d): asked to start clean", ckpt, state["step"])
        return False
    old = state.get("stamp") or legacy_stamp(state)
    refused, other = stamp_changes(old, stamp)
    if mode == "require":
        if state["method"] != stamp["settings"]["method"] or state["world_size"] != stamp["settings"]["world_size"]:
            raise ResumeError(f"{ckpt} is a {state['method']} run on {state['world_size']} processes; cannot "
                              f"resume it as {stamp['settings']['method']} on {stamp['settings']['world_size']}")
        if refused:
            raise ResumeError(
                f"cannot resume {ckpt}: {'; '.join(refused)}. That changes what the checkpoint was trained with "
                "(the model, the optimiser, the stream or the schedule, the libraries); restore the setting(s) "
                "to continue this run, or start a new run folder (--out) for the new settings (--resume may "
                f"change only {sorted(RESUME_MAY_CHANGE)} and the unstamped {sorted(UNSTAMPED)})")
        if state["step"] > stop:
            raise ResumeError(f"cannot resume {ckpt}: it is at step {state['step']}, past pretrain.max_steps {stop}")
        if other:
            log.warning("resuming %s although %s", ckpt, "; ".join(other))
        return True
    if refused or other:
        log.info("not resuming %s (step %d): its stamp differs (%s); starting clean", ckpt, state["step"],
                 "; ".join(refused + other))
        return False
    if state["step"] > stop:
        log.info("not resuming %s: it is at step %d, past pretrain.max_steps %d; starting clean",
                 ckpt, state["step"], stop)
        return False
    return True


def agree_on_resume(resume: bool, pos: RunPosition, stamp: dict, error: Exception | None, dev: torch.device) -> None:
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


# Steps between two wall-clock checks of a multi-process run: each check is a broadcast, a sync of
# every rank, so it is not done at every step. One process checks its clock at every step (free).
CLOCK_CHECK_STEPS = 20


class CheckpointClock:
    """Whether `pretrain.checkpoint_minutes` of wall time have passed since the last checkpoint.

    Rank 0's clock decides for every rank (a broadcast), so all ranks save at the same step; with
    more than one process the clock is asked only at steps that are multiples of `every`, a rule
    of the step alone that every rank follows alike. A checkpoint at another step restarts it
    (`reset`). The time of a checkpoint changes nothing that is trained on one process."""

    def __init__(self, minutes: float, world: int, device: torch.device, every: int = CLOCK_CHECK_STEPS):
        self.seconds, self.world, self.device, self.every = 60 * minutes, world, device, every
        self.last = time.monotonic()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if not self.seconds or (self.world > 1 and step % self.every):
            return False
        late = time.monotonic() - self.last >= self.seconds
        if self.world == 1:
            return late
        return bool(dist.broadcast(torch.tensor([int(late)], device=self.device)).item())
