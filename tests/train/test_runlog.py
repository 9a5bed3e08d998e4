"""The per-step log of pre-training (`train.runlog.StepLog`): what lands in the dvclive folder, a
stage output that DVC hashes, must depend on the run's numbers only, never on how fast it ran."""
from __future__ import annotations

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
