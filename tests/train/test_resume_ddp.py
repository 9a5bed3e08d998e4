"""A 2-rank (gloo, CPU) pre-training run stopped after a checkpoint in the middle of an epoch and
resumed ends where an undisturbed 2-rank run ends, and every rank holds the same queue (and
student) as the checkpoint.

The ranks are started here with torch.multiprocessing (the environment torchrun would set); each
runs `train.pretrain.main` unchanged and, when the trainer writes its summary, this test saves what
that rank holds (queue, pointer, student) so that the ranks can be compared with each other."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.train.test_resume import tiny_params

STEPS_PER_EPOCH = 2        # on 2 ranks: 16 samples, 4 per rank and step
CUT, WHOLE = 1, 4          # stopped in the middle of epoch 0 (after its batch 1 of 2), resumed across 2 epoch ends


def _rank(rank: int, world: int, port: int, argv: list[str], dump: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from train import pretrain, trainer

    real = trainer.Trainer.summary

    def summary(self):
        q = self.method.queue
        torch.save({"features": q.features.clone(), "ptr": int(q.ptr), "filled": int(q.filled),
                    "student": {k: v.clone() for k, v in self.method.student.state_dict().items()}},
                   Path(dump) / f"rank{rank}.pt")
        return real(self)
    trainer.Trainer.summary = summary
    code = pretrain.main(argv)
    if code:
        raise SystemExit(f"rank {rank}: train.pretrain exited with {code}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(shards: Path, out: Path, params: Path, dump: Path) -> list[dict]:
    dump.mkdir(parents=True, exist_ok=True)
    argv = ["--shards", str(shards), "--out", str(out), "--method", "d3ssl", "--params", str(params),
            "--device", "cpu"]
    mp.spawn(_rank, args=(2, free_port(), argv, str(dump)), nprocs=2, join=True)
    return [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(2)]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_resumed_two_rank_run_equals_an_undisturbed_one_with_one_queue_on_every_rank(shards, tmp_path, capfd):
    # A checkpoint averages the ranks' BN statistics in place: bitwise equal runs need checkpoints at
    # the same steps, so the undisturbed run checkpoints at CUT too (every step; not stamped).
    params = tiny_params(tmp_path / "params.yaml", max_steps=CUT, deterministic=False, checkpoint_every=1)
    stopped = run_two_ranks(shards, tmp_path / "run", params, tmp_path / "cut")
    cut = checkpoint(tmp_path / "run")
    # mid-epoch: each rank resumes its stream inside the epoch, at its batch CUT
    assert (cut["step"], cut["epoch"], cut["batch"]) == (CUT, 0, CUT) and 0 < CUT < STEPS_PER_EPOCH
    params.write_text(params.read_text().replace(f"max_steps: {CUT}", f"max_steps: {WHOLE}"))
    capfd.readouterr()
    resumed = run_two_ranks(shards, tmp_path / "run", params, tmp_path / "resumed")
    assert f"resumed from step {CUT}" in capfd.readouterr().err      # rank 0 logs it; the ranks agree on it
    whole = run_two_ranks(shards, tmp_path / "whole", params, tmp_path / "whole_dump")

    a, b = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "run")
    assert a["step"] == b["step"] == WHOLE and a["world_size"] == b["world_size"] == 2
    for ranks, ckpt in ((resumed, b), (whole, a)):
        for r in ranks:                                            # every rank holds the saved queue
            assert torch.equal(r["features"], ckpt["model"]["queue.features"])
            assert (r["ptr"], r["filled"]) == (int(ckpt["model"]["queue.ptr"]), int(ckpt["model"]["queue.filled"]))
            for k, v in r["student"].items():
                if v.is_floating_point() and "running" not in k:   # BN statistics are averaged at the save
                    assert torch.equal(v, ckpt["model"][f"student.{k}"]), k
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k        # student, teacher, queue, BN statistics
    assert torch.equal(stopped[0]["features"], stopped[1]["features"])
    assert not torch.equal(stopped[0]["features"], resumed[0]["features"])   # the resumed steps enqueued keys
