"""The per-step log of pre-training (`train.runlog.StepLog`): what lands in the dvclive folder, a
stage output that DVC hashes, must depend on the run's numbers only, never on how fast it ran."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from train.runlog import StepLog


class FakeMethod:
    last_momentum = 0.99

    def queue_fill(self) -> float:
        return 0.5


def fake_run(out: Path) -> SimpleNamespace:
    return SimpleNamespace(out=out, name="d3ssl", cfg=SimpleNamespace(arch="resnet18"), rank=0, world=1,
                           sched=SimpleNamespace(total_steps=3, stop=3), pos=SimpleNamespace(step=0),
                           resumed=False, method=FakeMethod(), recent=[])


def log_three_steps(out: Path, pause_s: float) -> None:
    run = fake_run(out)
    steplog = StepLog(run, progress=False)
    for i in range(3):
        time.sleep(pause_s)                     # a slower or faster machine
        run.pos.step += 1
        run.recent.append({"chance": 13.86})
        steplog.step({"key": ["a", "b"], "errors": 0}, lr=0.1 * i, loss=torch.tensor(10.0 - i),
                     terms={"loss_dc": torch.tensor(5.0 - i)})
    steplog.close()


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_dvclive_folder_holds_no_timing_and_the_log_does(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="train.runlog"):
        log_three_steps(tmp_path / "fast", pause_s=0.0)
        log_three_steps(tmp_path / "slow", pause_s=0.05)
    fast = folder_bytes(tmp_path / "fast" / "dvclive" / "plots")
    slow = folder_bytes(tmp_path / "slow" / "dvclive" / "plots")
    assert "metrics/train/loss.tsv" in fast and "metrics/train/loss_dc.tsv" in fast
    assert fast == slow                         # same numbers, different speeds: the same bytes
    assert any("images/s (not in the outputs)" in r.getMessage() for r in caplog.records)


def log_steps(out: Path, start: int, stop: int, total: int = 6, resumed: bool = False) -> StepLog:
    """Steps start+1..stop of a `total`-step run, as the trainer logs them (values depend on the
    step only); the log is left open, as a killed run leaves it."""
    run = fake_run(out)
    run.sched.total_steps = run.sched.stop = total
    run.pos.step, run.resumed = start, resumed
    steplog = StepLog(run, progress=False)
    for i in range(start, stop):
        run.pos.step += 1
        run.recent.append({"chance": 13.86})
        steplog.step({"key": ["a", "b"], "errors": 0}, lr=0.1 * i, loss=torch.tensor(10.0 - i),
                     terms={"loss_dc": torch.tensor(5.0 - i)})
    return steplog


def test_a_resumed_log_is_cut_to_the_checkpoint_and_equals_an_undisturbed_one(tmp_path):
    """A run killed after logging step 5 resumes from its checkpoint at step 3: the rows of steps 4
    and 5 are dropped, not logged twice, and dvclive continues at step 3 (the 4th row), whatever
    dvclive's metrics.json says (here a row cut short by the kill, and metrics.json lost)."""
    log_steps(tmp_path / "whole", 0, 6).close()
    log_steps(tmp_path / "cut", 0, 5)                          # killed: never closed
    live = tmp_path / "cut" / "dvclive"
    with open(live / "plots" / "metrics" / "train" / "loss.tsv", "a") as f:
        f.write("5\t5.")                                       # the row the kill cut short
    log_steps(tmp_path / "cut", 3, 6, resumed=True).close()
    assert folder_bytes(live) == folder_bytes(tmp_path / "whole" / "dvclive")
    rows = (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss" and [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2", "3", "4", "5"]

    # a resume at the stop itself: metrics.json back at the checkpoint's step
    log_steps(tmp_path / "at_stop", 0, 3, total=3).close()
    log_steps(tmp_path / "cut_at_stop", 0, 5, total=3)
    log_steps(tmp_path / "cut_at_stop", 3, 3, total=3, resumed=True).close()
    assert folder_bytes(tmp_path / "cut_at_stop" / "dvclive") == folder_bytes(tmp_path / "at_stop" / "dvclive")

    # metrics.json lost (dvclive alone would log the next row as step 0 again), or emptied or half
    # written by a kill during its write: the same bytes, the summary's key order included (the
    # folder is a stage output DVC hashes)
    whole = folder_bytes(tmp_path / "whole" / "dvclive")
    for name, damage in (("lost", None), ("emptied", ""), ("half", '{\n    "train": {\n        "lo')):
        log_steps(tmp_path / name, 0, 5)
        metrics = tmp_path / name / "dvclive" / "metrics.json"
        metrics.unlink() if damage is None else metrics.write_text(damage)
        log_steps(tmp_path / name, 3, 6, resumed=True).close()
        assert folder_bytes(tmp_path / name / "dvclive") == whole, name
    summary = json.loads(whole["metrics.json"])
    assert list(summary) == ["step", "train"] and list(summary["train"]) == sorted(summary["train"])
    assert summary["step"] == 5 and summary["train"]["loss"] == 5.0


def test_truncation_names_a_file_that_is_no_metric_history(tmp_path):
    import pytest

    from train.runlog import truncate_metrics

    bad = tmp_path / "dvclive" / "plots" / "metrics" / "notes.tsv"
    bad.parent.mkdir(parents=True)
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match=r"notes\.tsv: no `step` column"):
        truncate_metrics(tmp_path / "dvclive", 1)
