"""The pre-training stage end to end: 2-process DDP, kill-and-resume, export into torchvision."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from pipeline.params import ParamsError
from train.export import export
from train.pretrain import load_config, method_config

REPO = Path(__file__).resolve().parents[2]


def write_params(path: Path, loader: dict | None = None, **pretrain) -> Path:
    """A params file for a tiny run: ResNet-18, RoIAlign 7x7, 64 px views, 2 proposals, small queue
    (`loader` and `pretrain` update those sections)."""
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["pretrain"].update({"arch": "resnet18", "roi_size": 7, "epochs": 2, "checkpoint_every": 2, "warmup_epochs": 0.5,
                            "deterministic": True, "bn_splits": 2, **pretrain})
    doc["loader"].update({"batch_size": 4, "workers": 2, "shuffle_buffer": 8, "epoch_samples": 24, **(loader or {})})
    doc["loader"]["views"].update({"size": 64, "small_size": 32, "num_proposals": 2})
    for m in doc["methods"].values():
        m.update({"queue_size": 64, "proj_hidden": 32})
        if m.get("pred_hidden"):
            m["pred_hidden"] = 32
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    out = subprocess.run([sys.executable, "-m", "train.pretrain", *args], capture_output=True, text=True,
                         env=env, cwd=REPO, **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def final_model(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def test_params_yaml_gives_every_method_a_config():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.loader.views.num_proposals >= 1
    for name in ("d3ssl", "d3ssl_dc", "soco", "mocov2"):
        method_config(name, REPO / "params.yaml")


def test_a_loader_key_error_names_the_loader_section(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  epochs: 1\nloader:\n  batch_sise: 8\n")
    with pytest.raises(ParamsError) as e:
        load_config(p)
    assert f"{p}:loader: unknown key(s) ['batch_sise']" in str(e.value)
    assert "pretrain.loader" not in str(e.value)
    p.write_text("pretrain: {}\nloader:\n  workers: many\n")
    with pytest.raises(ParamsError, match=rf"{p}:loader\.workers: expected an integer"):
        load_config(p)
    p.write_text("pretrain: {}\nloader: [1, 2]\n")
    with pytest.raises(ParamsError, match=rf"{p}:loader: expected a mapping of LoaderConfig settings"):
        load_config(p)


def test_a_params_file_without_a_pretrain_section_is_an_error_not_the_defaults(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("loader:\n  batch_size: 8\nmethods: {}\n")
    with pytest.raises(ParamsError, match=rf"{p}: no section pretrain \(present: \['loader', 'methods'\]\)"):
        load_config(p)
    p.write_text("pretrain: {}\n")                      # explicit: the defaults
    assert load_config(p).arch == "resnet50" and load_config(None) == load_config(p)


def test_dvclive_logs_in_a_git_repository_without_commits(tmp_path, monkeypatch, caplog):
    import subprocess as sp

    from train.runlog import open_live

    sp.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    live = open_live(tmp_path / "dvclive", resume=False)
    live.log_metric("train/loss", 1.5)
    live.next_step()
    live.end()
    assert "without a git revision" in caplog.text
    assert (tmp_path / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().split()[-1] == "1.5"


@pytest.mark.parametrize("body", ["pretrain: 3\n", "pretrain: [1, 2]\n"])
def test_a_section_of_the_wrong_type_names_file_and_section(tmp_path, body):
    p = tmp_path / "params.yaml"
    p.write_text(body)
    section = body.split(":")[0]
    with pytest.raises(ParamsError, match=rf"{p}:{section}: expected a mapping"):
        load_config(p)


def test_killed_and_resumed_run_reaches_the_same_weights(shards, tmp_path):
    params = write_params(tmp_path / "params.yaml", max_steps=8)
    common = ["--shards", str(shards), "--method", "d3ssl", "--params", str(params), "--device", "cpu"]
    run(common + ["--out", str(tmp_path / "whole")])

    # Kill a second run as soon as its first checkpoint is on disk, then resume it.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", *common, "--out", str(tmp_path / "cut")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
    assert step < 8, "the run finished before it could be killed"
    run(common + ["--out", str(tmp_path / "cut"), "--resume"])

    a, b = final_model(tmp_path / "whole"), final_model(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k           # bitwise: weights, teacher, queue, BN statistics
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert whole["steps"] == 8 and (tmp_path / "whole" / "dvclive" / "metrics.json").exists()
    assert whole["epochs_done"] == 1                # 6 steps an epoch (24 samples, 2 workers, batch 4)
    logged = (tmp_path / "whole" / "dvclive" / "plots" / "metrics" / "train" / "loss_dp.tsv").read_text()
    assert len(logged.strip().splitlines()) == 1 + 8


def test_two_runs_of_the_same_settings_write_the_same_checkpoint_bytes(shards, tmp_path):
    """dvc.lock records the checkpoint's hash: a rerun with the same settings must not change it
    (the Python and NumPy RNG states it stores were once seeded from the OS)."""
    params = write_params(tmp_path / "params.yaml", max_steps=2)
    for name in ("a", "b"):
        run(["--shards", str(shards), "--method", "mocov2", "--params", str(params), "--device", "cpu",
             "--out", str(tmp_path / name)])
    a, b = ((tmp_path / name / "checkpoint.pt").read_bytes() for name in ("a", "b"))
    assert a == b


def test_two_process_gloo_ddp_keeps_ranks_identical(shards, tmp_path):
    params = write_params(tmp_path / "params.yaml", max_steps=3, deterministic=False)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "train.pretrain"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(torchrun + ["--shards", str(shards), "--out", str(tmp_path / "ddp"), "--method", "d3ssl",
                                     "--params", str(params), "--device", "cpu"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert len(summary["student_checksums"]) == 2 and summary["ranks_identical"]


def test_export_round_trip_into_torchvision(shards, tmp_path):
    params = write_params(tmp_path / "params.yaml", max_steps=1)
    run(["--shards", str(shards), "--out", str(tmp_path / "r"), "--method", "soco", "--params", str(params),
         "--device", "cpu"])
    info = export(tmp_path / "r" / "checkpoint.pt", tmp_path / "export")
    assert info["arch"] == "resnet18" and info["method"] == "soco"
    sd = torch.load(tmp_path / "export" / "backbone.pth", weights_only=True)
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    student = final_model(tmp_path / "r")
    assert torch.equal(net.layer1[0].conv1.weight, student["student.c4.4.0.conv1.weight"])
    assert torch.equal(net.layer4[1].bn2.running_var, student["student.res5.1.bn2.running_var"])
    d2 = pickle.loads((tmp_path / "export" / "backbone_detectron2.pkl").read_bytes())["model"]
    assert "stem.conv1.weight" in d2 and "stem.conv1.norm.running_mean" in d2
    assert "res2.0.conv1.weight" in d2 and "res3.0.shortcut.weight" in d2 and "res5.1.conv2.norm.bias" in d2
    assert (d2["res5.1.conv2.norm.bias"] == net.layer4[1].bn2.bias.detach().numpy()).all()
    assert len(d2) == len([k for k in sd if not k.endswith("num_batches_tracked")])


def test_resume_refuses_another_method(shards, tmp_path):
    params = write_params(tmp_path / "params.yaml", max_steps=1)
    run(["--shards", str(shards), "--out", str(tmp_path / "r"), "--method", "mocov2", "--params", str(params),
         "--device", "cpu"])
    out = subprocess.run([sys.executable, "-m", "train.pretrain", "--shards", str(shards), "--out", str(tmp_path / "r"),
                          "--method", "soco", "--params", str(params), "--device", "cpu", "--resume"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "cannot resume it as soco" in out.stderr


def test_random_export_is_seeded_and_loads(tmp_path):
    a = export(None, tmp_path / "a", arch="resnet18", seed=1)
    export(None, tmp_path / "b", arch="resnet18", seed=1)
    export(None, tmp_path / "c", arch="resnet18", seed=2)
    assert a["method"] == "random"
    sa, sb, sc = (torch.load(tmp_path / d / "backbone.pth", weights_only=True) for d in "abc")
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sa, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


@pytest.mark.parametrize("method", ["d3ssl", "soco", "mocov2"])
def test_random_export_of_a_seed_is_that_runs_initial_student(tmp_path, method):
    """Step 0 of the O-KNN curves is the `random` row of the same seed, and the harness evaluates
    `export(None, ..., seed)` as a run's step 0: both hold only if the trainer's student starts
    as exactly that network."""
    from dataclasses import replace

    from train.export import backbone_from_checkpoint, random_backbone
    from train.trainer import build_method

    params = write_params(tmp_path / "params.yaml")
    cfg = load_config(params)
    for seed in (1, 2):
        method_obj, _ = build_method(method, replace(cfg, seed=seed), method_config(method, params),
                                     torch.device("cpu"), world=1)
        student = backbone_from_checkpoint({"model": method_obj.state_dict()})
        reference = random_backbone(cfg.arch, seed)
        assert sorted(student) == sorted(reference)
        assert all(torch.equal(student[k], reference[k]) for k in reference), f"seed {seed}"
