"""The whole `dvc repro` on a copy of the project with a reduced embedded data set, end to end.

Every stage runs its real code on tiny settings (80 images, 2 training steps, one seed); the
report must hold every field, each a number in its range, DVC must re-run only what a changed
parameter touches, and one parameter switches pre-training from OpenImage-MINI to COCO train2017.

Every kind of stage runs, but not every model: of the pre-training methods only d3ssl and SoCo
(the report's first ordering), since d3ssl_dc and MoCo v2 run the same stages with other
`methods` parameters (their losses: tests/train/test_methods.py), and the README's main command
runs every model of `params.yaml` through `dvc repro` on the embedded data; detection fine-tuning
for random and d3ssl (its report claim). Each stage left out saves a process start with its
torch import, most of a tiny stage's time.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import contracts as C

MODELS = ["random", "supervised", "d3ssl", "soco"]
DETECT = ["random", "d3ssl"]


def project_copy(repo: Path, dest: Path) -> Path:
    """The project's files as a fresh clone would have them (tracked and untracked, not ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    for f in filter(None, files):
        src = repo / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1")
    run = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run


def changed_stages(proj: Path) -> set[str]:
    """The stages `dvc status` lists (a stage's name is an unindented line ending in ':')."""
    out = dvc(proj, "status").stdout
    return {line[:-1] for line in out.splitlines() if line.endswith(":") and not line[:1].isspace()}


def reduce(params: dict) -> dict:
    """The embedded default shrunk to a smoke run of every stage."""
    params["seeds"] = [0]
    params["synth"]["images"] = 80
    params["proposals"]["max_side"] = 128
    params["shards"]["samples_per_shard"] = 16
    # epoch_samples: 2 batches of 8 on each of the 2 ranks, whatever the sampled set's size
    params["loader"].update({"batch_size": 8, "workers": 1, "shuffle_buffer": 16, "epoch_samples": 32})
    params["loader"]["views"].update({"size": 64, "small_size": 32})
    # nproc_per_node 2: the pretrain stages run under torchrun, 2 gloo processes on the CPU
    params["pretrain"].update({"epochs": 1, "max_steps": 2, "checkpoint_every": 1000, "snapshot_steps": [1], "bn_splits": 2,
                               "nproc_per_node": 2})
    params["models"], params["detect_models"] = MODELS, DETECT
    for m in params["methods"].values():
        m["queue_size"] = min(m["queue_size"], 256)
    params["oknn"].update({"min_size": 64, "max_size": 107, "per_image": 2, "workers": 0})
    params["probes"].update({"pairs": 4, "objects": 4, "object_size": 64, "pool_size": 2, "canvas": 128})  # 64 = 2 x 32
    params["detect"].update({"max_iter": 4, "val_images": 8, "workers": 0})
    return params


@pytest.mark.slow
@pytest.mark.timeout(1800)      # 514 s alone on 2 EPYC cores, over 600 s beside another test worker
def test_dvc_repro_runs_every_stage_and_the_report_is_complete(repo: Path, tmp_path: Path):
    proj = project_copy(repo, tmp_path / "proj")
    params = reduce(yaml.safe_load((proj / "params.yaml").read_text()))
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / "dvc.lock").unlink(missing_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)

    dvc(proj, "repro")

    # the data stages
    mini = proj / "data" / "openimage_mini"
    stats = json.loads((mini / "stats.json").read_text())
    assert all(stats["criteria"].values())
    assert C.read_table(mini / "images.parquet", C.IMAGES).num_rows == stats["openimage_mini"]["num_images"] > 0
    index = json.loads((proj / "data" / "shards" / "index.json").read_text())
    assert index["total_samples"] == stats["openimage_mini"]["num_images"]

    # every model's backbone was exported and evaluated
    for m in MODELS:
        assert (proj / "runs" / m / "seed0" / "export" / "backbone.pth").is_file()
    for m in MODELS[2:]:
        summary = json.loads((proj / "runs" / m / "seed0" / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["world_size"] == 2 and summary["ranks_identical"], m
        assert (proj / "runs" / m / "seed0" / "snapshots" / "step1" / "backbone.pth").is_file()
        curve = json.loads((proj / "reports" / "models" / m / "seed0" / "oknn_curve.json").read_text())
        assert [p["step"] for p in curve["points"]] == [1]

    # the report: every field, a number in its range
    report = json.loads((proj / "reports" / "results.json").read_text())
    assert report["models"] == MODELS and report["seeds"] == [0]
    for m in MODELS:
        r = report["results"][m]
        for k, v in r.items():
            assert v["n"] == 1 and math.isfinite(v["mean"]) and v["std"] == 0.0, (m, k)
        for k in ("oknn_top1", "oknn_top5", "oknn_disturbed_top1", "oknn_disturbed_top5") + (
                ("det_AP", "det_AP50", "det_AP75") if m in DETECT else ()):
            assert 0.0 <= r[k]["mean"] <= 100.0, (m, k)
        assert ("det_AP" in r) == (m in DETECT)
        for layer in ("C2", "C3", "C4", "C5"):
            assert 0.0 < r[f"cr_{layer}"]["mean"] < 10.0 and -1.0 <= r[f"mcs_{layer}"]["mean"] <= 1.0 + 1e-9
        assert r["oknn_top1"]["mean"] <= r["oknn_top5"]["mean"]
    claims = {o["claim"] for o in report["orderings"]}
    assert "O-KNN top-1: d3ssl > soco > random" in claims and "MCS at C5: d3ssl > d3ssl_dc" in claims
    assert all(isinstance(o["holds"], bool) and isinstance(o["clear"], bool) for o in report["orderings"])
    assert report["dataset"]["openimage_mini"]["num_images"] == stats["openimage_mini"]["num_images"]
    md = (proj / "reports" / "results.md").read_text()
    for title in ("Object-level kNN", "Table 7", "Table 1", "Table 2", "orderings"):
        assert title in md
    assert set(report["curves"]["oknn"]) == set(MODELS[2:])          # every pre-trained method on one plot
    for plot in ("results_cr.png", "results_mcs.png", "results_loss.png", "oknn_curve.png"):
        assert (proj / "reports" / plot).read_bytes()[:4] == b"\x89PNG"

    # Nothing changed: nothing runs. A parameter of one stage re-runs that stage and what follows.
    assert "Running stage" not in dvc(proj, "repro").stdout
    # A forced rerun of proposals writes the same bytes: nothing downstream is stale.
    dvc(proj, "repro", "--force", "--single-item", "proposals")
    assert changed_stages(proj) == set()
    # Editing a module makes exactly the stages that import it stale.
    probes = proj / "eval" / "probes.py"
    source = probes.read_text()
    probes.write_text(source + "\n# edited\n")
    assert changed_stages(proj) == {f"probes@{m}-0" for m in MODELS}
    probes.write_text(source)
    params["probes"]["seed"] = 1
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = dvc(proj, "repro").stdout
    ran = {line.split("'")[1] for line in rerun.splitlines() if line.startswith("Running stage")}
    assert ran == {f"probes@{m}-0" for m in MODELS} | {"report"}, ran

    # Pre-training on COCO train2017 instead of OpenImage-MINI is one parameter.
    params["data"]["pretrain_images"] = "coco_train2017"
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = dvc(proj, "repro", "shards").stdout
    assert "Running stage 'proposals'" in rerun and "Running stage 'sample'" not in rerun
    coco = C.read_table(proj / "data" / "coco_train2017" / "images.parquet", C.IMAGES)
    index = json.loads((proj / "data" / "shards" / "index.json").read_text())
    assert index["total_samples"] == coco.num_rows > 0
    assert "pretrain@d3ssl-0" in dvc(proj, "status").stdout        # what trains on them is now stale
