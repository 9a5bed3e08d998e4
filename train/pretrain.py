"""Streaming pre-training stage: one method, DDP over any number of processes.

    python -m train.pretrain --shards data/shards --out runs/d3ssl --method d3ssl [--params params.yaml] [--resume|--fresh]
    python -m train.launch --params params.yaml ...          # the stage: torchrun above pretrain.nproc_per_node 1
    torchrun --nproc_per_node=4 -m train.pretrain --shards data/shards --out runs/d3ssl --method d3ssl
    torchrun --nnodes=2 --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 --nproc_per_node=8 \
        -m train.pretrain ...

Reads the shards' `index.json`, streams batches (`train.stream`, resampled: equal batches per rank),
and trains the method (`train.methods`). Besides the loss terms, every step logs the health of the
run: the chance level ln(M + 1) of each InfoNCE term (`*_chance`, `loss_chance`; M: a query's
negatives, the queue less its own image's keys), the positive's rank-1 accuracy among the
negatives (`top1`; in-batch retrieval for soco) and the spread of the normalised keys (`key_std`:
1 spread over the sphere, 0 collapsed); d3ssl also logs `shift_px`, the mean |t| of the de-positioning shift in pixels of the x2 view. At the end,
`summary.json` holds `health` over the last steps, and a run that ends at chance or collapsed is
warned about (log and report). DDP: gloo on CPU, NCCL on CUDA; on CUDA also bf16 autocast and
channels_last, and SyncBN in the student of methods without shuffle-BN (soco; `use_sync_batchnorm`).
Logged with dvclive under RUN_DIR/dvclive on rank 0 (loss terms, learning rate, teacher momentum,
queue fill; images/s only in the progress bar and the log, since the dvclive folder is a stage
output) with a progress bar (`train.runlog`). This module holds the settings, the set-up and the
CLI; the loop is `train.trainer`, the checkpoint, stamp and resume plan `train.checkpoint`.

Snapshots: after each step of `snapshot_steps`, the student backbone is exported (as train.export
does) to RUN_DIR/snapshots/step<N>/, for learning curves (eval.curve).

Checkpoints (RUN_DIR/checkpoint.pt, `train.checkpoint`) are written atomically every
`checkpoint_every` steps, at each epoch end, at the last step, and at least every
`checkpoint_minutes` of wall time (one process checks its clock every step; more processes check it
every `CLOCK_CHECK_STEPS` steps, where rank 0's clock decides and broadcasts, so every rank saves at
the same step). They hold everything needed to continue exactly: the method's state (student,
teacher, predictor, queue), optimiser, step, stream position (epoch and batch in it), the RNG
states of every rank (torch, CUDA, numpy, python, the region-augmentation generator), the last
steps' health records, the settings and the run's stamp. They load with
`torch.load(..., weights_only=True)`. On the CPU with `deterministic: true` a resumed run is
bitwise an uninterrupted one.

Stamp and resume: the stamp (also in RUN_DIR/stamp.json beside the checkpoint, written when it
changes) is a hash of the stamped settings (`pretrain` with `loader`, `methods.<name>`, the method
and world size; not `max_steps`, `checkpoint_every`, `checkpoint_minutes`, `snapshot_steps`,
`nproc_per_node`, `loader.start_method`, which do not change what is trained), the content hash of
the shards' `index.json` and the code version (the sources of this module's import closure, found
by `pipeline.closure`). Without flags a run resumes a checkpoint with its own stamp and logs
`resumed from step N`; any other checkpoint is ignored, with a log line naming what differs, and
overwritten at the first save (`dvc.yaml` keeps the checkpoint with `persist: true`, so a
`dvc repro` after a crash continues the run). `--resume` requires a checkpoint: none, an unreadable
one, or one whose stamp differs in any stamped setting (the model, optimiser, schedule, stream,
shards, world size, or the torch / torchvision / Pillow versions) but those of
`train.checkpoint.RESUME_MAY_CHANGE` is an error naming the setting; a code change is warned about
and resumed across. `--fresh` starts clean.

Multi-process and multi-node resume: every rank reads RUN_DIR/checkpoint.pt itself, so the run
folder must be on storage that every rank (every node) sees, e.g. a shared file system. The ranks
gather (resume, step, epoch, batch, stamp) and stop together, naming the rows, if they disagree;
after loading, rank 0's weights, queue and optimiser state are broadcast to all.

Settings: the `pretrain` section (shared by every method, so they train on the same schedule),
`loader` (batches, views) and `methods.<name>` of params.yaml. A params file must have the
`pretrain` and `methods.<name>` sections (an error names the file and the section otherwise);
without `--params` the defaults of `PretrainConfig` and the method apply (ResNet-50, 800 epochs:
the paper's schedule).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline import cli, storage
from pipeline.shardset import ShardDataError
from pipeline.files import write_text
from pipeline.params import ParamsError, from_dict, override
from pipeline import shardset
from train import dist
from train.checkpoint import ResumeError, make_stamp
from train.methods import DEFAULTS, METHODS, MethodConfig
from train.stream import LoaderConfig
from train.trainer import Schedule, Trainer, use_deterministic_algorithms

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
    bf16_cpu: Literal["auto"] | bool = "auto"   # bf16 autocast on the CPU too (always on CUDA); auto: where the
                                            # CPU has a bf16 path (train.trainer.cpu_bf16)
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
    """`pretrain` with the `loader` section of the same file nested in. Without a params file, the
    defaults (the paper's ResNet-50 for 800 epochs); a params file without a `pretrain` section is
    an error, not those defaults."""
    if params is None:
        return PretrainConfig()
    doc = yaml.safe_load(Path(params).read_text()) or {}
    if not isinstance(doc, dict):
        raise ParamsError(f"{params}: expected a mapping of sections at the top level")
    if "pretrain" not in doc:
        raise ParamsError(f"{params}: no section pretrain (present: {sorted(doc)}); add one (an empty "
                          "`pretrain: {}` takes the defaults: ResNet-50 for 800 epochs), or run without --params")
    section = doc.get("pretrain")
    if section is not None and not isinstance(section, dict):
        raise ParamsError(f"{params}:pretrain: expected a mapping of PretrainConfig settings (key: value lines), "
                          f"got {type(section).__name__} {section!r}")
    section = dict(section or {})
    if "loader" in doc:
        section["loader"] = doc["loader"]
    return from_dict(PretrainConfig, section, f"{params}:pretrain")



def resume_mode(resume: bool | str) -> str:
    mode = {True: "require", False: "never"}.get(resume, resume) if isinstance(resume, bool) else resume
    if mode not in ("auto", "require", "never"):
        raise ValueError(f"resume is {resume!r}; use auto, require or never")
    return mode


def train(shards: str | Path, out: Path, method_name: str, cfg: PretrainConfig, mcfg: MethodConfig,
          resume: bool | str = "auto", device: str | None = None, progress: bool = True,
          summary_copy: Path | None = None) -> dict:
    """Pre-train `method_name`; returns the run summary (also written to out/summary.json and, if
    given, to `summary_copy`, where the report reads the run's health).

    `resume`: "auto" (continue a checkpoint of the same stamp, else start clean), "require" or True
    (continue or raise ResumeError), "never" or False (start clean)."""
    mode = resume_mode(resume)
    dev = dist.init_device(device or "auto")
    if cfg.deterministic:
        use_deterministic_algorithms()
    shard_paths, total_samples = shardset.shards(shards)
    run = Trainer(out, method_name, cfg, mcfg, dev, Schedule.of(cfg, total_samples, dist.world_size()))
    run.resume(mode, make_stamp(shards, method_name, cfg, mcfg, run.world))
    run.fit(shard_paths, total_samples, progress)
    summary = run.summary()
    if run.rank == 0:
        for problem in summary["health"]["problems"]:
            log.warning("UNHEALTHY RUN %s: %s", out, problem)
        for path in [out / "summary.json"] + ([summary_copy] if summary_copy else []):
            write_text(path, json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m train.pretrain", __doc__)
    p.add_argument("--shards", required=True,
                   help="shard set with index.json: a folder or a URL prefix (s3://bucket/shards)")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoint, dvclive, summary)")
    p.add_argument("--method", default="d3ssl", choices=sorted(METHODS), help="the pre-training method")
    p.add_argument("--params", type=Path, help="params.yaml (sections pretrain, loader, methods); without it the "
                                               "defaults: ResNet-50 for 800 epochs")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/checkpoint.pt, or fail: no checkpoint, an unreadable one, or a "
                        "changed stamped setting (default: continue it only if its stamp matches, else start clean)")
    p.add_argument("--fresh", action="store_true", help="start clean even if a checkpoint of the same run exists")
    p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, help="overrides pretrain.seed (initial weights, stream, augmentations)")
    p.add_argument("--summary", type=Path, help="also write summary.json (steps, health) here, e.g. for the report")
    args = p.parse_args(argv)
    if args.resume and args.fresh:
        p.error("--resume and --fresh exclude each other")
    cli.setup_logging(args.log_level, rank=int(os.environ.get("RANK", 0)))
    cfg = override(load_config(args.params), seed=args.seed)
    mode = "require" if args.resume else "never" if args.fresh else "auto"
    try:
        summary = train(args.shards, args.out, args.method, cfg, method_config(args.method, args.params), mode,
                        args.device, summary_copy=args.summary)
    except ResumeError as e:
        log.error("%s", e)
        return 2
    except (ShardDataError, storage.StorageError) as e:     # unreadable shard set: one line naming it
        log.error("%s", e)
        return 1
    finally:
        dist.destroy()
    log.info("wrote %s (checkpoint.pt, summary.json, dvclive/): %s, %d of %d steps on %d process(es)%s", args.out,
             args.method, summary["steps"], summary["total_steps"], summary["world_size"],
             "" if not summary["health"]["problems"] else "; UNHEALTHY: " + "; ".join(summary["health"]["problems"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
