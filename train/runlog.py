"""What a pre-training run logs: per-step metrics (dvclive under RUN_DIR/dvclive, rank 0) with a
progress bar, and the end-of-run health check.

Besides the loss terms, every step logs the learning rate, the teacher momentum, the queue fill and
the loader's errors. Speed (images/s) is shown by the progress bar and logged every
`SPEED_LOG_EVERY` steps and at the end, never written to the dvclive folder: that folder is a
stage output DVC hashes, and a timing in it would change with every run of the same inputs. `health` judges the last `HEALTH_WINDOW` steps: a loss at its
chance level per InfoNCE term (ln(M + 1), M the query's own negatives: the queue less the keys of
its own image, `train.losses.chance_loss`) means the method learned nothing; a key spread near 0
means the keys collapsed to one point.

A resumed run's log equals an undisturbed run's: the run logs step k (1-based) as dvclive step
k - 1, and a crash after the checkpoint at step N leaves rows of steps N and later in the metrics
TSVs (and dvclive's own resume would continue after the last row logged, or at 0 where
metrics.json is gone). `resume_live` cuts every TSV under dvclive's plots/metrics to the rows of
steps before N, rebuilds metrics.json's summary from their last rows and continues at step N.
metrics.json holds its keys sorted (at every level), in every run: its order then comes from the
names alone, never from the file a crash may have left empty or half written.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

HEALTH_WINDOW = 20        # steps averaged for the end-of-run health check
AT_CHANCE = 0.95          # loss / chance level at or above this: the queue method learned nothing
COLLAPSED = 0.1           # key spread (1: spread over the sphere, 0: one point) below this: collapse
SPEED_LOG_EVERY = 50      # steps between log lines with the loss and images/s


def health(recent: list[dict]) -> dict:
    """The end-of-run check over the last steps: loss against its chance level ln(M + 1) per
    InfoNCE term (M: each query's own negatives), the positive's rank-1 accuracy, the key spread; `problems` says what is wrong."""
    if not recent:
        return {"steps": 0, "problems": []}
    mean = {k: float(np.nanmean([r[k] for r in recent])) if not all(np.isnan(r[k]) for r in recent) else None
            for k in ("loss", "chance", "top1", "key_std")}
    out = {"steps": len(recent), **mean, "loss_over_chance": None, "problems": []}
    if mean["chance"]:
        out["loss_over_chance"] = mean["loss"] / mean["chance"]
        if out["loss_over_chance"] >= AT_CHANCE:
            out["problems"].append(f"ends at chance: loss {mean['loss']:.3f} against the chance level "
                                   f"{mean['chance']:.3f} (ln(M + 1) per InfoNCE term, M each query's negatives), rank-1 accuracy "
                                   f"{mean['top1']:.3f}")
    if mean["key_std"] is not None and mean["key_std"] < COLLAPSED:
        out["problems"].append(f"collapsed keys: spread {mean['key_std']:.3f} (1 = spread over the sphere, 0 = one point)")
    return out


def open_live(path: Path, resume: bool):
    """A dvclive logger at `path`, also inside a git repository that has no commit yet.

    dvclive 3.49 asks git for the current revision when it starts and raises on a repository with
    no commit (a fresh `git init`, or a copy of the project). The metrics do not need a revision,
    so there it logs as outside any repository (no experiment reference), and says so.
    """
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    try:
        return Live(str(path), resume=resume, save_dvc_exp=False, dvcyaml=None)
    except SCMError as e:
        log.warning("dvclive: %s; logging %s without a git revision", e, path)
        return _live_without_git()(str(path), resume=resume, save_dvc_exp=False, dvcyaml=None)


def _live_without_git():
    """dvclive's `Live` with its repository set-up as dvclive runs it where there is no repository
    (no DVC repo, no git revision, no experiment reference): metrics and plots only."""
    from dvclive import Live
    from dvclive.dvc import get_exp_name

    class LiveWithoutGit(Live):
        def _init_dvc(self):
            self._dvc_repo = None
            self._exp_name = get_exp_name(self._exp_name, None, self._baseline_rev)
            self._dvc_file = self._init_dvc_file()

    return LiveWithoutGit


METRICS_SUBFOLDER = Path("plots") / "metrics"      # dvclive's metric histories, one TSV per metric


def _parse(text: str) -> int | float | str:
    """A TSV cell as dvclive logged it: int, float (`repr`, so it round-trips exactly) or text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def truncate_metrics(live_dir: Path, step: int) -> dict:
    """Cut every metric TSV under `live_dir`/plots/metrics to its header and the rows of dvclive
    steps below `step` (the run's steps up to its checkpoint at `step`); returns the summary of
    the kept log as dvclive's metrics.json holds it (each metric's last kept value, nested by its
    path, and "step": the last kept step), for the resumed logger to continue from.

    Files are rewritten only where rows are dropped, with their bytes otherwise untouched (the
    folder is a stage output DVC hashes). A file without a `step` column is an error naming it."""
    root = live_dir / METRICS_SUBFOLDER
    summary: dict = {}
    last_step = -1
    for path in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
        if not lines:
            continue
        header = next(csv.reader(io.StringIO(lines[0].rstrip("\r\n")), delimiter="\t"))
        if "step" not in header:
            raise ValueError(f"{path}: no `step` column in its header {header}; it is not a dvclive metric "
                             "history. Remove it, or start the run clean (--fresh)")
        at, name = header.index("step"), os.path.splitext(path.name)[0]
        kept, last = [lines[0]], None
        for line in lines[1:]:
            # a row cut short by the crash (no line end, missing cells) belongs to a step after the
            # checkpoint: dropped like the complete ones
            row = next(csv.reader(io.StringIO(line.rstrip("\r\n")), delimiter="\t"), [])
            if line.endswith("\n") and len(row) == len(header) and row[at].isdigit() and int(row[at]) < step:
                kept.append(line)
                last = row
        if len(kept) < len(lines):
            path.write_bytes("".join(kept).encode("utf-8"))
        if last is not None and name in header:
            node = summary
            for part in path.relative_to(root).with_suffix("").parts[:-1]:
                node = node.setdefault(part, {})
            node[name] = _parse(last[header.index(name)])
            last_step = max(last_step, int(last[at]))
    if last_step >= 0:
        summary["step"] = last_step
    return summary


def _sorted_tree(d: dict) -> dict:
    """`d` with its keys sorted at every level (the order metrics.json is written in)."""
    return {k: _sorted_tree(v) if isinstance(v, dict) else v for k, v in sorted(d.items())}


def resume_live(path: Path, step: int):
    """A dvclive logger at `path` that continues the log of a run resumed from its checkpoint at
    `step`: the metric TSVs cut to the steps before it (`truncate_metrics`), metrics.json's summary
    from what they keep, and the next row logged as dvclive step `step`, as in a run never stopped."""
    summary = truncate_metrics(path, step)
    if summary.get("step", -1) != step - 1:
        log.warning("the dvclive log in %s ends at step %s, not at the checkpoint's step %d: the rows of the "
                    "steps between are missing (the folder was deleted or is older)", path,
                    summary.get("step", -1) + 1, step)
    # dvclive's resume reads its step and summary from metrics.json, which a crash may have left
    # at a later step, half written or empty: both are set here instead, the summary's keys sorted
    # as every write of it sorts them (StepLog.step), so nothing is read from the old file
    (path / "metrics.json").unlink(missing_ok=True)
    live = open_live(path, resume=True)
    live.summary = _sorted_tree(summary)
    live.step = step
    return live


class StepLog:
    """Rank 0's per-step logs: dvclive metrics under RUN_DIR/dvclive and the progress bar."""

    def __init__(self, run, progress: bool):
        """`run`: the rank's `train.pretrain.Trainer` (its out, name, cfg, rank, world, schedule, position, method)."""
        from tqdm import tqdm

        self.run = run
        self.live = None
        if run.rank == 0:
            resumed = run.resumed and run.pos.step > 0
            self.live = resume_live(run.out / "dvclive", run.pos.step) if resumed else open_live(run.out / "dvclive",
                                                                                                resume=False)
        if self.live is not None:
            for k, v in {"method": run.name, "arch": run.cfg.arch, "world_size": run.world,
                         "steps": run.sched.total_steps}.items():
                self.live.log_param(k, v)
        self.bar = tqdm(total=min(run.sched.stop, run.sched.total_steps), initial=run.pos.step, desc=run.name,
                        unit="step", disable=not (progress and run.rank == 0))
        self.t_last, self.seen = time.perf_counter(), 0
        self.t_start, self.seen_total, self.steps = self.t_last, 0, 0

    def step(self, batch: dict, lr: float, loss: torch.Tensor, terms: dict) -> None:
        self.seen += len(batch["key"])
        self.bar.update()
        live, method = self.live, self.run.method
        if live is None:
            return
        now = time.perf_counter()
        speed = self.seen * self.run.world / max(now - self.t_last, 1e-9)
        self.seen_total, self.steps = self.seen_total + self.seen, self.steps + 1
        if self.steps % SPEED_LOG_EVERY == 0:
            log.info("%s step %d: loss %.3f, %.1f images/s", self.run.name, self.run.pos.step, loss.item(), speed)
        live.log_metric("train/loss", loss.item())
        if self.run.recent[-1]["chance"]:
            live.log_metric("train/loss_chance", self.run.recent[-1]["chance"])
        for k, v in terms.items():
            live.log_metric(f"train/{k}", float(v))
        live.log_metric("train/lr", lr)
        live.log_metric("train/momentum", method.last_momentum)
        live.log_metric("train/queue_fill", method.queue_fill())
        live.log_metric("train/loader_errors", int(batch["errors"]))
        # metrics.json's key order: the names', not the order of logging ("step" as make_summary sets it)
        live.summary = _sorted_tree({**live.summary, "step": live.step})
        live.next_step()
        self.t_last, self.seen = now, 0
        self.bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{speed:.1f}")

    def close(self) -> None:
        self.bar.close()
        if self.live is not None:
            if self.steps:
                wall = time.perf_counter() - self.t_start
                log.info("%s: %d steps in %.1f s, %.1f images/s (not in the outputs)", self.run.name, self.steps,
                         wall, self.seen_total * self.run.world / max(wall, 1e-9))
            self.live.end()
