"""Resume of the pre-training stage as DVC runs it: the stamp beside the checkpoint decides, without
flags, whether a rerun continues a checkpoint (same params, shards, code) or starts clean; `--resume`
insists; checkpoints also come every `pretrain.checkpoint_minutes`; train.launch runs torchrun."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.test_pretrain import write_params
from train import checkpoint, launch, pretrain
from train.pretrain import ResumeError, load_config, method_config

REPO = Path(__file__).resolve().parents[2]
METHOD = "d3ssl"
CUT = 3             # the "killed" run's last checkpoint
WHOLE = 6           # steps of a whole run (4 steps per epoch: crosses an epoch end)


def tiny_params(path: Path, **pretrain_keys) -> Path:
    """test_pretrain's tiny run, in this process: no loader workers, 4 steps per epoch, checkpoints
    only at the stop and the epoch ends."""
    write_params(path, **{"checkpoint_every": 1000, "checkpoint_minutes": 0, "epochs": 3, **pretrain_keys})
    import yaml
    doc = yaml.safe_load(path.read_text())
    doc["loader"].update({"workers": 0, "epoch_samples": 16})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(shards: Path, out: Path, params: Path, resume="auto", method: dict | None = None, **cfg_changes) -> dict:
    """A run of `params` with `cfg_changes` to its `pretrain` section (`loader`: a dict of loader
    changes, its `views` a dict of views changes) and `method` to `methods.d3ssl`."""
    cfg = load_config(params)
    if cfg_changes:
        loader = dict(cfg_changes.pop("loader", None) or {})
        cfg = pretrain.override(cfg, **cfg_changes)
        if "views" in loader:
            loader["views"] = pretrain.override(cfg.loader.views, **loader["views"])
        if loader:
            cfg = pretrain.override(cfg, loader=pretrain.override(cfg.loader, **loader))
    mcfg = method_config(METHOD, params)
    if method:
        mcfg = pretrain.override(mcfg, **method)
    try:
        return pretrain.train(shards, out, METHOD, cfg, mcfg, resume=resume, device="cpu", progress=False)
    finally:
        torch.use_deterministic_algorithms(False)      # train() sets it for the whole process


def state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def cut_run(shards, tmp_path_factory) -> tuple[Path, Path]:
    """(params, run folder) of a run stopped after its checkpoint at step CUT."""
    root = tmp_path_factory.mktemp("resume")
    params = tiny_params(root / "params.yaml")
    run(shards, root / "cut", params, max_steps=CUT)
    return params, root / "cut"


def copy_run(cut_run, tmp_path: Path) -> Path:
    shutil.copytree(cut_run[1], tmp_path / "run")
    return tmp_path / "run"


def test_a_rerun_resumes_automatically_and_equals_an_undisturbed_run(shards, cut_run, tmp_path, caplog):
    params, _ = cut_run
    run_dir = copy_run(cut_run, tmp_path)
    assert state(run_dir)["step"] == CUT and (run_dir / "stamp.json").is_file()
    with caplog.at_level(logging.INFO, logger="train"):
        summary = run(shards, run_dir, params, max_steps=WHOLE)       # the rerun: no flag
    assert f"resumed from step {CUT}" in caplog.text
    run(shards, tmp_path / "whole", params, max_steps=WHOLE)
    a, b = state(tmp_path / "whole"), state(run_dir)
    assert a["step"] == b["step"] == summary["steps"] == WHOLE
    assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"])
    assert a["model"].keys() == b["model"].keys()
    assert any("queue" in k for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k     # student, teacher, queue, BN statistics
    assert json.loads((run_dir / "stamp.json").read_text()) == b["stamp"] == a["stamp"]
    assert summary["health"]["steps"] == WHOLE                    # the health window survived the resume
    # 6 steps of 4 per epoch: one complete epoch, in the returned summary and in summary.json
    assert summary["epochs_done"] == json.loads((run_dir / "summary.json").read_text())["epochs_done"] == 1


def test_resume_without_a_checkpoint_is_an_error(shards, tmp_path, caplog):
    params = tiny_params(tmp_path / "params.yaml")
    with pytest.raises(ResumeError, match="no checkpoint .*checkpoint.pt to resume"):
        run(shards, tmp_path / "none", params, resume="require", max_steps=1)
    args = ["--shards", str(shards), "--out", str(tmp_path / "none"), "--method", METHOD, "--params", str(params),
            "--device", "cpu", "--resume"]
    with caplog.at_level(logging.ERROR, logger="train"):
        assert pretrain.main(args) == 2
    assert "no checkpoint" in caplog.text and not (tmp_path / "none" / "checkpoint.pt").exists()


def test_resume_across_a_changed_batch_size_is_refused_naming_it(shards, cut_run, tmp_path, caplog):
    params, _ = cut_run
    run_dir = copy_run(cut_run, tmp_path)
    with pytest.raises(ResumeError, match=r"loader\.batch_size was 4, is now 8.*restore the setting.*new run folder"):
        run(shards, run_dir, params, resume="require", max_steps=WHOLE, loader={"batch_size": 8})
    with pytest.raises(ResumeError, match=r"loader\.workers was 0, is now 1"):
        run(shards, run_dir, params, resume="require", max_steps=WHOLE, loader={"workers": 1})
    assert state(run_dir)["step"] == CUT                          # untouched
    # a setting that does not change what is trained resumes (max_steps here)
    with caplog.at_level(logging.INFO, logger="train"):
        run(shards, run_dir, params, resume="require", max_steps=CUT + 1)
    assert f"resumed from step {CUT}" in caplog.text and state(run_dir)["step"] == CUT + 1


def other_torch(monkeypatch) -> str:
    """Pretend torch was upgraded since the checkpoint; returns the stamp's words for it."""
    real = checkpoint.library_versions()
    monkeypatch.setattr(checkpoint, "library_versions", lambda: {**real, "versions.torch": "99.0"})
    return f"versions.torch was {real['versions.torch']!r}, is now '99.0'"


@pytest.mark.parametrize("change", ["params", "code", "library"])
def test_a_stamp_mismatch_starts_clean_and_says_why(shards, cut_run, tmp_path, caplog, monkeypatch, change):
    params, _ = cut_run
    run_dir = copy_run(cut_run, tmp_path)
    cfg = {"max_steps": 2}
    if change != "code":            # the checkpoint's code version: the sources may change while the tests run
        monkeypatch.setattr(checkpoint, "code_version", lambda module, v=state(run_dir)["stamp"]["code"]: v)
    if change == "params":
        cfg["base_lr"] = 0.1
        why = f"base_lr was {pretrain.load_config(params).base_lr}, is now 0.1"
    elif change == "library":
        why = other_torch(monkeypatch)
    else:
        monkeypatch.setattr(checkpoint, "code_version", lambda module: "another version")
        why = "the code version (the sources train.pretrain imports) differs"
    with caplog.at_level(logging.INFO, logger="train"):
        summary = run(shards, run_dir, params, **cfg)
    assert "resumed from" not in caplog.text
    assert f"its stamp differs ({why}); starting clean" in caplog.text
    new = state(run_dir)
    assert new["step"] == summary["steps"] == 2 and summary["health"]["steps"] == 2   # 2 fresh steps, not CUT + 0
    assert json.loads((run_dir / "stamp.json").read_text()) == new["stamp"] != state(cut_run[1])["stamp"]


@pytest.mark.parametrize("change, why", [
    ({"base_lr": 0.1}, r"base_lr was 0\.\d+, is now 0\.1"),
    ({"optimizer": "lars"}, r"optimizer was 'sgd', is now 'lars'"),
    ({"roi_size": 5}, r"roi_size was 7, is now 5"),
    ({"loader": {"views": {"size": 48}}}, r"loader\.views\.size was 64, is now 48"),
    ({"method": {"queue_size": 128}}, r"methods\.d3ssl\.queue_size was 64, is now 128"),
    ({"library": True}, r"versions\.torch was '.+', is now '99\.0'"),
])
def test_resume_refuses_any_stamped_change_naming_it(shards, cut_run, tmp_path, monkeypatch, change, why):
    """--resume continues only the settings the checkpoint was trained with: a change of the
    model (queue_size, roi_size), the optimiser, the views, the schedule or the libraries is
    refused naming the setting (not a warning followed by load_state_dict's traceback)."""
    params, _ = cut_run
    run_dir = copy_run(cut_run, tmp_path)
    change = dict(change)
    if change.pop("library", False):
        other_torch(monkeypatch)
    with pytest.raises(ResumeError, match=rf"cannot resume .*checkpoint\.pt: {why}\..*restore the setting\(s\).*"
                                          r"new run folder"):
        run(shards, run_dir, params, resume="require", max_steps=WHOLE, **change)
    assert state(run_dir)["step"] == CUT                          # untouched


def test_resume_continues_across_an_allowed_change_with_a_warning(shards, cut_run, tmp_path, caplog):
    """`deterministic` (RESUME_MAY_CHANGE) picks kernels only: --resume continues, and says so."""
    params, _ = cut_run
    run_dir = copy_run(cut_run, tmp_path)
    assert "deterministic" in checkpoint.RESUME_MAY_CHANGE
    with caplog.at_level(logging.INFO, logger="train"):
        run(shards, run_dir, params, resume="require", max_steps=CUT + 1, deterministic=False)
    assert "although deterministic was True, is now False" in caplog.text
    assert f"resumed from step {CUT}" in caplog.text and state(run_dir)["step"] == CUT + 1


def test_a_checkpoint_stamped_before_library_versions_continues_with_a_warning():
    """Versions missing from an older stamp are unknown, not changed: --resume continues with a
    warning (refusing would strand every checkpoint written before they were stamped)."""
    new = {"settings": {"base_lr": 0.1, **checkpoint.library_versions()}, "shards": "s", "code": "c"}
    old = {**new, "settings": {"base_lr": 0.1}}
    refused, other = checkpoint.stamp_changes(old, new)
    assert refused == [] and len(other) == len(checkpoint.VERSIONED_LIBRARIES)
    assert all("was not stamped" in why for why in other)
    # a version that was stamped and changed is still refused
    moved = {**new, "settings": {**new["settings"], "versions.torch": "0.1"}}
    assert checkpoint.stamp_changes(moved, new)[0] == [f"versions.torch was '0.1', is now {torch.__version__!r}"]


@pytest.mark.parametrize("resume", ["auto", "require"])
def test_a_checkpoint_that_does_not_load_into_the_model_is_a_resume_error_naming_it(shards, cut_run, tmp_path,
                                                                                     monkeypatch, resume):
    """Its stamp matches, its state does not fit (a wrong-sized queue): a ResumeError naming the
    file, not load_state_dict's traceback."""
    params, _ = cut_run
    run_dir = copy_run(cut_run, tmp_path)
    bad = state(run_dir)
    bad["model"]["queue.features"] = bad["model"]["queue.features"][:, :3]
    bad["stamp"]["code"] = "this code"               # pinned: the sources may change while the tests run
    monkeypatch.setattr(checkpoint, "code_version", lambda module: "this code")
    torch.save(bad, run_dir / "checkpoint.pt")
    with pytest.raises(ResumeError, match=rf"the checkpoint {run_dir / 'checkpoint.pt'} does not load into this "
                                          r"run's model.*queue\.features.*--fresh"):
        run(shards, run_dir, params, resume=resume, max_steps=WHOLE)


def write_unusable(path: Path, kind: str) -> None:
    if kind == "corrupt":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "truncated":                                  # killed while copying it
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:                                                      # an older format: no run position, no RNG states
        torch.save({"model": state(path.parent)["model"], "step": CUT}, path)


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "old format"])
def test_an_unreadable_checkpoint_starts_clean_or_is_refused_with_resume(shards, cut_run, tmp_path, caplog, kind):
    params, _ = cut_run
    run_dir = copy_run(cut_run, tmp_path)
    ckpt = run_dir / "checkpoint.pt"
    write_unusable(ckpt, kind)
    with pytest.raises(ResumeError, match=rf"--resume: cannot read the checkpoint {ckpt} \(.+\); delete or move "
                                          "it away and run without --resume"):
        run(shards, run_dir, params, resume="require", max_steps=2)
    with caplog.at_level(logging.INFO, logger="train"):
        summary = run(shards, run_dir, params, max_steps=2)       # automatic: a warning, and a clean start
    assert f"cannot read the checkpoint {ckpt}" in caplog.text and "starting clean" in caplog.text
    assert any(r.levelno == logging.WARNING and str(ckpt) in r.getMessage() for r in caplog.records)
    assert "resumed from" not in caplog.text
    assert summary["steps"] == state(run_dir)["step"] == 2 and summary["health"]["steps"] == 2


def test_checkpoints_come_every_checkpoint_minutes_too(shards, tmp_path, monkeypatch):
    params = tiny_params(tmp_path / "params.yaml")
    saved = []
    real = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda path, m, o, pos, *a: (saved.append(pos.step),
                                                                                    real(path, m, o, pos, *a)))
    run(shards, tmp_path / "off", params, max_steps=2)
    assert saved == [2]                                           # only the stop
    saved.clear()
    run(shards, tmp_path / "on", params, max_steps=2, checkpoint_minutes=1e-9)
    assert saved == [1, 2]                                        # each step is past the time limit


def test_launcher_picks_torchrun_from_nproc_per_node(tmp_path):
    one = tiny_params(tmp_path / "one.yaml")
    assert launch.command(["--params", str(one), "--out", "x"])[1:] == ["-m", "train.pretrain", "--params", str(one),
                                                                         "--out", "x"]
    two = tiny_params(tmp_path / "two.yaml", nproc_per_node=2)
    cmd = launch.command(["--out", "x", "--params", str(two)])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:] == ["-m", "train.pretrain", "--out", "x", "--params", str(two)]


def test_launcher_runs_two_gloo_ranks_that_checkpoint_and_resume(shards, tmp_path):
    params = tiny_params(tmp_path / "params.yaml", nproc_per_node=2, max_steps=2, deterministic=False)
    args = [sys.executable, "-m", "train.launch", "--params", str(params), "--shards", str(shards),
            "--out", str(tmp_path / "ddp"), "--method", METHOD, "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["ranks_identical"]
    ckpt = state(tmp_path / "ddp")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2 and len(ckpt["rng"]) == 2     # both ranks' RNG states
    assert not torch.equal(ckpt["rng"][0]["augment"], ckpt["rng"][1]["augment"])
    # the rerun continues on both ranks (every rank checks the step and stamp of the others)
    params.write_text(params.read_text().replace("max_steps: 2", "max_steps: 3"))
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from step 2" in out.stderr and state(tmp_path / "ddp")["step"] == 3
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["ranks_identical"]


def test_the_checkpoint_clock_syncs_ranks_only_every_few_steps(monkeypatch):
    """One process reads its clock every step; more processes broadcast rank 0's verdict, and only
    at steps that are multiples of `every`, the same steps on every rank."""
    calls = []
    monkeypatch.setattr(checkpoint.dist, "broadcast", lambda x, src=0: (calls.append(int(x.item())), x)[1])
    now = [1000.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now[0])
    clock = checkpoint.CheckpointClock(1.0, world=2, device=torch.device("cpu"), every=5)
    now[0] += 61                                               # past the minute
    assert [s for s in range(1, 13) if clock.due(s)] == [5, 10]
    assert calls == [1, 1]                                     # two broadcasts in 12 steps
    clock.reset()
    assert not clock.due(15) and calls == [1, 1, 0]
    single = checkpoint.CheckpointClock(1.0, world=1, device=torch.device("cpu"), every=5)
    now[0] += 61
    assert single.due(1) and single.due(3) and calls == [1, 1, 0]   # no broadcast on one process
    assert not checkpoint.CheckpointClock(0, world=2, device=torch.device("cpu")).due(20)   # off


def test_stamp_json_is_written_once_per_stamp(tmp_path):
    path = tmp_path / "stamp.json"
    stamp = {"params": "a", "shards": "b", "code": "c", "settings": {"seed": 0}}
    assert checkpoint.write_stamp(path, stamp)
    assert not checkpoint.write_stamp(path, stamp)              # the run's next checkpoints: untouched
    assert json.loads(path.read_text()) == stamp
    assert checkpoint.write_stamp(path, {**stamp, "code": "d"})
    assert json.loads(path.read_text())["code"] == "d"


def test_the_next_epochs_loader_starts_before_the_epoch_ends_and_changes_nothing(shards, tmp_path, monkeypatch):
    """Each epoch's loader is started PREFETCH_BATCHES batches before the previous epoch ends (its
    workers' start overlaps the last steps), and the weights equal a run that starts each loader
    only when the previous epoch has ended."""
    from train import trainer
    params = tiny_params(tmp_path / "params.yaml")       # 4 steps per epoch, 3 epochs
    started, real = [], trainer.make_loader
    steps = {"n": 0}
    real_step = trainer.Trainer.step

    def spy(*a, **kw):
        started.append((kw["epoch"], steps["n"]))
        return real(*a, **kw)

    def counted(self, batch):
        steps["n"] += 1
        return real_step(self, batch)
    monkeypatch.setattr(trainer, "make_loader", spy)
    monkeypatch.setattr(trainer.Trainer, "step", counted)
    run(shards, tmp_path / "prefetch", params)
    assert trainer.PREFETCH_BATCHES == 2
    assert started == [(0, 0), (1, 2), (2, 6)]            # epochs 1 and 2 start 2 steps before 4 and 8
    monkeypatch.setattr(trainer, "PREFETCH_BATCHES", 0)    # 0: after the epoch's last batch
    started.clear()
    steps["n"] = 0
    run(shards, tmp_path / "plain", params)
    assert started == [(0, 0), (1, 4), (2, 8)]
    a, b = state(tmp_path / "prefetch"), state(tmp_path / "plain")
    assert a["step"] == b["step"] == 12
    # the run stopped at the last step of its 3rd epoch (the position's epoch lags there, at 2)
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["epochs_done"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

