"""Resume through DVC: `dvc repro` killed (SIGKILL, the whole process group) in the middle of a
stage, then run again, ends with the same result as a run nobody disturbed. DVC would delete a
stage's outputs before rerunning it; the stages here take their outputs' flags (`persist: true`)
from the project's dvc.yaml, and the stage itself decides what of them it may reuse (the stamp
beside the checkpoint, the fingerprint of the proposal parts, the plan of the shards)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.train.conftest import shards  # noqa: F401  (the tiny shards fixture)
from tests.train.test_resume import tiny_params

REPO = Path(__file__).resolve().parents[1]
STEPS = 6                 # the whole run: 4 steps an epoch, a checkpoint every 2 steps


def env() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=str(REPO), DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")


RESUMABLE = {"proposals": ["data/proposals"], "shards": ["data/shards"],
             "pretrain": ["checkpoint.pt", "snapshots", "dvclive/plots/metrics"]}


def project_out(stage: str, suffix: str, path: str) -> dict:
    """`{path: flags}`: the flags the project's dvc.yaml gives the output of `stage` ending in `suffix`."""
    for out in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["outs"]:
        name, flags = (out, {}) if isinstance(out, str) else next(iter(out.items()))
        if name.endswith(suffix):
            return {path: flags}
    raise KeyError(f"dvc.yaml: stage {stage} has no output ending in {suffix}")


def test_every_output_a_stage_resumes_from_persists_in_the_projects_dvc_yaml():
    """Without `persist: true` DVC deletes the output before the stage runs, and a rerun after a
    crash starts from nothing."""
    for stage, suffixes in RESUMABLE.items():
        for suffix in suffixes:
            assert project_out(stage, suffix, suffix)[suffix].get("persist") is True, (stage, suffix)


def dvc_project(root: Path, stages: dict) -> Path:
    """A git + DVC project in `root` whose dvc.yaml holds `stages`."""
    root.mkdir(parents=True, exist_ok=True)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True, env=env())
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return root


def repro(root: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, capture_output=True, text=True,
                         env=env(), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def repro_killed_when(root: Path, ready, timeout: float = 120.0) -> None:
    """Start `dvc repro` in its own process group and SIGKILL that group once `ready()` holds."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "dvc repro ended before the kill: " + proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "nothing to kill the stage after"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)         # the group of the process started here: dvc and its stage
        proc.wait()
        proc.stdout.close()


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


LOSS_TSV = Path("dvclive") / "plots" / "metrics" / "train" / "loss.tsv"     # in a run folder


def logged_rows(tsv: Path) -> int:
    """Complete rows (steps) of a dvclive metric history; 0 before its first."""
    if not tsv.is_file():
        return 0
    return max(0, tsv.read_text().count("\n") - 1)


@pytest.mark.slow
def test_a_killed_pretrain_stage_resumes_under_dvc_and_equals_an_undisturbed_run(shards, tmp_path):  # noqa: F811
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(shards, proj / "shards")
    tiny_params(proj / "params.yaml", checkpoint_every=2, max_steps=STEPS)
    args = ["--params", "params.yaml", "--shards", "shards", "--method", "d3ssl", "--device", "cpu"]
    stage = {"cmd": " ".join(["python -m train.launch", *args, "--out", "run"]),
             "deps": ["shards"], "params": ["pretrain", "loader", "methods.d3ssl"],
             "outs": [project_out("pretrain", "checkpoint.pt", "run/checkpoint.pt"),
                      project_out("pretrain", "snapshots", "run/snapshots"),
                      project_out("pretrain", "dvclive/plots/metrics", "run/dvclive/plots/metrics")]}
    dvc_project(proj, {"pretrain": stage})

    # killed once a step after the checkpoint (step 2) is logged: its row is in the log, not in the checkpoint
    ckpt, loss_log = proj / "run" / "checkpoint.pt", proj / "run" / LOSS_TSV
    repro_killed_when(proj, lambda: ckpt.exists() and logged_rows(loss_log) > 2)
    killed_at = checkpoint(ckpt)["step"]
    assert 0 < killed_at < logged_rows(loss_log) and killed_at < STEPS
    out = repro(proj)
    assert f"resumed from step {killed_at}" in out.stdout + out.stderr, out.stdout + out.stderr

    # the undisturbed run: the same command, never stopped
    whole = subprocess.run([sys.executable, "-m", "train.launch", *args, "--out", "whole"], cwd=proj, env=env(),
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = checkpoint(proj / "whole" / "checkpoint.pt"), checkpoint(ckpt)
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys() and any("queue" in k for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k       # student, teacher, queue, BN statistics
    # the loss log too: the resumed run dropped the rows after its checkpoint and logged each step once
    assert logged_rows(proj / "whole" / LOSS_TSV) == logged_rows(loss_log) == STEPS
    assert folder_state(proj / "run" / "dvclive") == folder_state(proj / "whole" / "dvclive")   # TSVs, metrics.json
    assert "pretrain" not in subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=proj, env=env(),
                                            capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray runtime for the module; the stage joins it through RAY_ADDRESS (a start costs
    seconds, and a killed driver leaves the cluster as it is)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def images_table(root: Path, n: int) -> Path:
    """An images table of `n` 160x120 JPEG scenes in `root`."""
    import pyarrow as pa

    from pipeline import contracts as C
    from tests.pipeline.test_proposals import jpeg_bytes, scene

    rows = []
    for i in range(n):
        p = root / "images" / f"scene{i:02d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg_bytes(scene(100 + i, 160, 120)))
        rows.append((f"scene_{i:02d}", str(p)))
    table = pa.table({"key": [r[0] for r in rows], "source": ["test"] * n, "image_id": [r[0] for r in rows],
                      "path": [r[1] for r in rows], "width": pa.array([160] * n, pa.int32()),
                      "height": pa.array([120] * n, pa.int32())})
    C.write_table(table, root / "images.parquet", C.IMAGES)
    return root / "images.parquet"


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_proposals_stage_writes_only_the_missing_parts_under_dvc(ray_address, tmp_path, monkeypatch):
    from pipeline.params import load_section
    from pipeline.proposals import ProposalsConfig, run

    proj = tmp_path / "proj"
    proj.mkdir()
    images = images_table(proj, 12)
    (proj / "params.yaml").write_text(yaml.safe_dump(
        {"proposals": {"images_per_part": 2, "images_per_task": 1, "max_side": 128}}))
    n_parts = 6
    stage = {"cmd": "python -m pipeline.proposals --params params.yaml --images images.parquet --out proposals "
                    "--num-workers 1",
             "deps": ["images.parquet", "images"], "params": ["proposals"],
             "outs": [project_out("proposals", "data/proposals", "proposals")]}
    dvc_project(proj, {"proposals": stage})
    monkeypatch.setenv("RAY_ADDRESS", ray_address)

    out = proj / "proposals"
    repro_killed_when(proj, lambda: len(list(out.glob("part-*.parquet"))) >= 2)
    finished = {p.name: p.stat() for p in out.glob("part-*.parquet")}
    assert 2 <= len(finished) < n_parts, "the stage ended before it was killed"
    assert not (out / "summary.json").exists()

    log = repro(proj)
    run_info = json.loads((log.stdout + log.stderr).split("proposals run (not in summary.json): ")[1].splitlines()[0])
    assert (run_info["parts_written"], run_info["parts_skipped"]) == (n_parts - len(finished), len(finished))
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == [f"part-{i:05d}.parquet" for i in range(n_parts)]
    for name, st in finished.items():           # the finished parts were kept, not written again
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    rewritten = [p for p in parts if p not in finished]
    assert all((out / p).stat().st_mtime_ns > max(st.st_mtime_ns for st in finished.values()) for p in rewritten)

    # an undisturbed run of the same settings writes the same bytes
    cfg = load_section(ProposalsConfig, "proposals", proj / "params.yaml")
    run(images, tmp_path / "whole", cfg, num_workers=1, progress=False)
    assert folder_state(out) == folder_state(tmp_path / "whole")
    assert "proposals" not in subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=proj, env=env(),
                                             capture_output=True, text=True).stdout
