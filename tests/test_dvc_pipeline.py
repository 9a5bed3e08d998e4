"""`dvc repro` on a copy of the project with a reduced embedded data set, end to end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import contracts as C
from pipeline.readers import read_coco, read_openimages


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
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_dvc_repro_builds_the_embedded_data_and_openimage_mini(repo: Path, tmp_path: Path):
    proj = project_copy(repo, tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["synth"]["images"] = 40
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / "dvc.lock").unlink(missing_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)

    dvc(proj, "repro")
    synth = proj / "data" / "synth"
    res = read_coco(synth / "coco" / "annotations" / "instances_val2017.json", synth / "coco" / "val2017")
    assert res.images.num_rows >= 1 and res.rejects.num_rows == 0
    oi = synth / "openimages"
    res = read_openimages(oi / "oidv6-train-annotations-bbox.csv", oi / "class-descriptions-boxable.csv", oi / "train")
    assert res.images.num_rows == 22 and res.rejects.num_rows == 0
    mini = proj / "data" / "openimage_mini"
    stats = json.loads((mini / "stats.json").read_text())
    assert all(stats["criteria"].values())
    assert C.read_table(mini / "images.parquet", C.IMAGES).num_rows == stats["openimage_mini"]["num_images"] > 0
    assert len((mini / "image_ids.txt").read_text().splitlines()) == stats["openimage_mini"]["num_images"]
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    assert lock["stages"]["synth"]["params"]["params.yaml"]["synth"]["images"] == 40

    # Nothing changed: nothing runs. A parameter changed: the stage runs again.
    assert "didn't change" in dvc(proj, "repro").stdout
    params["synth"]["seed"] = 1
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = dvc(proj, "repro").stdout
    assert "Running stage 'synth'" in rerun and "Running stage 'sample'" in rerun
    # A parameter of a later stage re-runs only that stage.
    params["sample"]["seed"] = 7
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = dvc(proj, "repro").stdout
    assert "Running stage 'sample'" in rerun and "Running stage 'synth'" not in rerun
