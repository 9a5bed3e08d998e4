"""One rank's pre-training run (`train.pretrain` sets it up and reports): the schedule, the
method on its device, and the loop with its checkpoints.

`Trainer.resume` continues a checkpoint or starts clean (`train.checkpoint`), `Trainer.fit` streams
epochs of batches from the run position and takes one optimiser step per batch, checkpointing
every `checkpoint_every` steps, when `CheckpointClock` says so, at each epoch end and at the stop;
`Trainer.summary` reports steps, health and a checksum of each rank's student.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.params import as_dict
from train import dist
from train.checkpoint import (
    CheckpointClock, ResumeError, RunPosition, agree_on_resume, checkpoint, load_checkpoint, plan_resume,
    seed_host_rngs, set_rng_state, weights_checksum,
)
from train.export import write_export
from train.methods import MethodConfig, build, prepare
from train.optim import learning_rate, make_optimizer
from train.runlog import HEALTH_WINDOW, StepLog, health
from train.stream import batches_per_worker, make_loader

if TYPE_CHECKING:                       # train.pretrain imports this module
    from train.pretrain import PretrainConfig

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 2     # the next epoch's loader starts this many batches before the current epoch ends


def cpu_bf16(setting: str | bool) -> bool:
    """Whether pre-training on the CPU runs under bf16 autocast (`pretrain.bf16_cpu`): true or false
    as set; `auto` where oneDNN has a bf16 path on this CPU (AVX512 or newer:
    `torch.ops.mkldnn._is_mkldnn_bf16_supported`). Without one (AVX2 only) every bf16 convolution is
    emulated: on a 2-core AVX2 AMD EPYC a ResNet-18 forward and backward ran 24x slower than in
    float32 and a d3ssl step of the embedded settings 36x (`benchmarks/results/cpu_bf16.json`), which
    made a 168-step run take hours. bf16 changes the
    trained weights as another seed does, so the choice is logged and in the run summary."""
    if setting != "auto":
        return bool(setting)
    return onednn_bf16()


def onednn_bf16() -> bool:
    """True where oneDNN runs bf16 natively or with AVX512 (not emulated on AVX2)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True)
class Schedule:
    """The run's length and learning-rate schedule, from the stream's size and the world size."""

    steps_per_epoch: int
    total_steps: int
    stop: int               # the step the run stops at (max_steps, else the whole schedule)
    peak_lr: float          # base_lr scaled by the global batch (per 256 images)
    warmup: int             # warm-up steps

    @classmethod
    def of(cls, cfg: PretrainConfig, total_samples: int, world: int) -> Schedule:
        steps_per_epoch = max(cfg.loader.workers, 1) * batches_per_worker(cfg.loader, total_samples, world)
        total = cfg.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, cfg.max_steps or total, cfg.base_lr * cfg.loader.batch_size * world / 256,
                   int(round(cfg.warmup_epochs * steps_per_epoch)))


def use_deterministic_algorithms() -> None:
    """torch's deterministic algorithms (`pretrain.deterministic`), with the cuBLAS workspace
    setting they need on CUDA."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def use_sync_batchnorm(method: torch.nn.Module) -> torch.nn.Module:
    """SyncBN in the student (and its predictor, SoCo/BYOL's), as pre-training on CUDA with more
    than one process does for methods without shuffle-BN; the teacher keeps per-process BN (with
    shuffle-BN the student's global statistics would contain every key's shuffled group, and MoCo
    keeps per-GPU BN for the query). Converts in place and returns `method`."""
    method.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.student)
    if getattr(method, "predictor", None) is not None:
        method.predictor = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.predictor)
    return method


def build_method(method_name: str, cfg: PretrainConfig, mcfg: MethodConfig, dev: torch.device, world: int):
    """(method, model): the method on `dev` with identical initial weights on every rank, and the
    module the loop calls (the method, in DDP on more than one process)."""
    torch.manual_seed(cfg.seed)                      # identical initial weights on every rank
    method = build(method_name, cfg.arch, mcfg, roi_size=cfg.roi_size, bn_splits=cfg.bn_splits).to(dev)
    if mcfg.shuffle_bn and world * cfg.bn_splits < 2:
        log.warning("methods.%s.shuffle_bn has no effect with one batch-norm group (one process, "
                    "pretrain.bn_splits: 1): the key shares its query's statistics; set bn_splits >= 2",
                    method_name)
    on_cuda = dev.type == "cuda"
    if on_cuda and world > 1 and not mcfg.shuffle_bn:
        use_sync_batchnorm(method)
    if on_cuda:
        method = method.to(memory_format=torch.channels_last)
    model = method
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[dev.index] if on_cuda else None, broadcast_buffers=False)
    return method, model


class Trainer:
    """One rank's run: the method and optimiser, the position in the stream, the checkpoint and
    the logs. `resume` decides where to start, `fit` runs the loop, `summary` reports."""

    def __init__(self, out: Path, method_name: str, cfg: PretrainConfig, mcfg: MethodConfig, dev: torch.device,
                 sched: Schedule):
        self.out, self.name, self.cfg, self.mcfg, self.dev, self.sched = out, method_name, cfg, mcfg, dev, sched
        self.rank, self.world = dist.rank(), dist.world_size()
        self.on_cuda = dev.type == "cuda"
        self.bf16 = self.on_cuda or cpu_bf16(cfg.bf16_cpu)
        if not self.on_cuda:
            log.info("bf16 autocast on the CPU: %s (pretrain.bf16_cpu: %s; CPU capability %s, oneDNN bf16 path: %s)",
                     "on" if self.bf16 else "off, float32", cfg.bf16_cpu, torch.backends.cpu.get_cpu_capability(),
                     onednn_bf16())
            if self.bf16 and not onednn_bf16():
                log.warning("pretrain.bf16_cpu is true on a CPU without a bf16 path (%s): every step is emulated, "
                            "20-40x slower than float32; set it to auto", torch.backends.cpu.get_cpu_capability())
        self.method, self.model = build_method(method_name, cfg, mcfg, dev, self.world)
        self.optimizer = make_optimizer(self.method.trainable(), cfg.optimizer, sched.peak_lr, cfg.weight_decay,
                                        cfg.sgd_momentum)
        self.aug = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + self.rank)
        seed_host_rngs(cfg.seed * 1_000_003 + self.rank)
        self.ckpt = out / "checkpoint.pt"
        self.pos, self.resumed = RunPosition(), False
        self.recent: deque[dict] = deque(maxlen=HEALTH_WINDOW)
        self.clock = CheckpointClock(cfg.checkpoint_minutes, self.world, dev)
        self.saved_step = -1
        self.meta: dict = {}
        out.mkdir(parents=True, exist_ok=True)
        (out / "snapshots").mkdir(exist_ok=True)

    def resume(self, mode: str, stamp: dict) -> None:
        """Continue the checkpoint or start clean, every rank alike (see `load_checkpoint` and
        `plan_resume`). Each rank loads the state into its method and optimiser before the ranks
        agree, so a checkpoint that does not load is a ResumeError on every rank together, not a
        traceback on one while the others wait in a collective."""
        error, state = None, None
        try:
            # every rank reads the checkpoint itself: the run folder must be on shared storage
            state = load_checkpoint(self.ckpt, self.dev, mode)
            self.resumed = plan_resume(self.ckpt, state, stamp, mode, self.sched.stop)
            if self.resumed:
                self.pos = RunPosition(state["step"], state["epoch"], state["batch"])
                self._load_state(state)
        except ResumeError as e:
            error = e
        agree_on_resume(self.resumed, self.pos, stamp, error, self.dev)
        if self.resumed:
            self._sync_loaded()
        elif self.rank == 0:
            for old in (self.out / "snapshots").iterdir():      # a clean start keeps no snapshot of another run
                if old.is_dir() and old.name.startswith("step"):
                    shutil.rmtree(old)
        self.saved_step = self.pos.step if self.resumed else -1
        self.meta = {"method": self.name, "arch": self.cfg.arch, "world_size": self.world,
                     "config": as_dict(self.cfg), "method_config": as_dict(self.mcfg), "stamp": stamp}

    def _load_state(self, state: dict) -> None:
        """This rank's part of a resume: the method, optimiser and RNG states of `state`. A state
        that does not fit (its stamp matched, yet the shapes or keys differ: a hand-edited or
        foreign checkpoint) is a ResumeError naming the file, not load_state_dict's traceback."""
        try:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]] * self.world
            set_rng_state(rngs[self.rank], self.aug)
        except Exception as e:     # noqa: BLE001  (RuntimeError, ValueError, KeyError, IndexError, ...)
            text = " ".join(str(e).split())         # one line: load_state_dict lists the keys on many
            why = f"{type(e).__name__}: {text[:500] + ' ...' if len(text) > 500 else text}"
            raise ResumeError(f"the checkpoint {self.ckpt} does not load into this run's model and optimiser "
                              f"({why}); move it away, or run with --fresh, to start clean, or resume it with "
                              "the code and settings it was written with") from e
        self.recent.extend(state.get("recent", []))

    def _sync_loaded(self) -> None:
        """After every rank agreed on the resume: rank 0's weights, queue and optimiser state on
        every rank (whatever each rank read), and the log lines."""
        method, optimizer, pos = self.method, self.optimizer, self.pos
        dist.broadcast_([*method.state_dict().values(),
                         *(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))])
        log.info("resumed from step %d (epoch %d, batch %d) of %s", pos.step, pos.epoch, pos.batch, self.ckpt)
        missing = [s for s in self.cfg.snapshot_steps
                   if s <= pos.step and not (self.out / "snapshots" / f"step{s}").is_dir()]
        if missing and self.rank == 0:
            log.warning("snapshots of steps %s are missing and will not be written (the run resumed after them)",
                        missing)

    def save(self) -> None:
        """A checkpoint of the current step (once per step), on every rank together."""
        if self.saved_step != self.pos.step:
            checkpoint(self.ckpt, self.method, self.optimizer, self.pos, self.aug,
                       {**self.meta, "recent": list(self.recent)})
            self.saved_step = self.pos.step
            self.clock.reset()

    def fit(self, shard_paths: list, total_samples: int, progress: bool) -> None:
        """The loop: epochs of the stream from the position on, until the schedule's stop; a
        checkpoint every `checkpoint_every` steps, at the clock, at each epoch end and at the stop.

        Each epoch is a new loader (its workers seed the epoch's stream). The next epoch's loader
        is started `PREFETCH_BATCHES` batches before the current one ends, so its workers' start
        and first batch overlap the last steps instead of stalling the loop; which batches it
        yields does not depend on when it starts."""
        cfg, pos = self.cfg, self.pos
        log_ = StepLog(self, progress)
        self.model.train()

        def loader(epoch: int, start_batch: int):
            return iter(make_loader(shard_paths, cfg.loader, seed=cfg.seed, epoch=epoch, total_samples=total_samples,
                                    world=self.world, start_batch=start_batch, pin_memory=self.on_cuda))

        upcoming = batches = None       # the next epoch's loader, started before this epoch ends
        try:
            while pos.epoch < cfg.epochs and pos.step < self.sched.stop:
                batches = upcoming if upcoming is not None else loader(pos.epoch, pos.batch)
                upcoming = None
                for batch in batches:
                    if upcoming is None and self._next_epoch_due():
                        upcoming = loader(pos.epoch + 1, 0)
                    lr, loss, terms = self.step(batch)
                    log_.step(batch, lr, loss, terms)
                    if pos.step % cfg.checkpoint_every == 0 or self.clock.due(pos.step):
                        self.save()
                    if pos.step in cfg.snapshot_steps and self.rank == 0:
                        write_export(self.method.student.backbone_state_dict(), self.out / "snapshots" / f"step{pos.step}",
                                     {"method": self.name, "arch": cfg.arch, "step": pos.step})
                    if pos.step >= self.sched.stop:
                        break
                else:
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                    self.saved_step = -1                # the epoch end moved the position: save it
                    self.save()
                    continue
                self.save()
                break
        finally:        # an error or a stop inside an epoch: end the loaders' worker processes now
            for it in (batches, upcoming):
                if hasattr(it, "_shutdown_workers"):
                    it._shutdown_workers()
            log_.close()

    def _next_epoch_due(self) -> bool:
        """True within the last `PREFETCH_BATCHES` batches of an epoch that the schedule follows
        with another one."""
        spe, pos = self.sched.steps_per_epoch, self.pos
        return (pos.batch >= spe - PREFETCH_BATCHES and pos.epoch + 1 < self.cfg.epochs
                and (pos.epoch + 1) * spe < self.sched.stop)

    def step(self, batch: dict) -> tuple[float, torch.Tensor, dict]:
        """One optimiser step on `batch`; returns (learning rate, loss, loss terms) and records the
        step's health."""
        pos, sched = self.pos, self.sched
        lr = learning_rate(pos.step, sched.total_steps, sched.warmup, sched.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        b = prepare(batch, self.dev, channels_last=self.on_cuda)
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, terms = self.model(b, self.aug, pos.step / max(1, sched.total_steps))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        pos.step += 1
        pos.batch += 1
        chance = sum(float(v) for k, v in terms.items() if k.endswith("_chance"))
        self.recent.append({"loss": loss.item(), "chance": chance, "top1": float(terms.get("top1", float("nan"))),
                            "key_std": float(terms.get("key_std", float("nan")))})
        return lr, loss, terms

    def summary(self) -> dict:
        """Steps, epochs, health; every rank must hold the same student: a checksum per rank shows it."""
        sums = dist.all_gather(torch.tensor([weights_checksum(self.method.student)], dtype=torch.int64,
                                            device=self.dev))
        return {"method": self.name, "arch": self.cfg.arch, "steps": self.pos.step,
                # complete epochs (the position's epoch lags at an epoch's last step)
                "epochs_done": self.pos.step // self.sched.steps_per_epoch,
                "total_steps": self.sched.total_steps, "world_size": self.world,
                "precision": "bf16" if self.bf16 else "float32",
                "finished": self.pos.step >= self.sched.total_steps,
                "student_checksums": [int(x) for x in sums.tolist()],
                "ranks_identical": bool((sums == sums[0]).all()), "health": health(list(self.recent))}
