"""Shared fixtures. Tests never touch the network: telemetry is off for Ray, FiftyOne and DVC.

The suite leaves nothing behind: FiftyOne's database (a MongoDB, about 300 MB) lives in a session
folder that is removed at the end, and every process the suite started that is still running then
(FiftyOne's mongod and service, Ray's workers, loader forkservers, app servers) is ended first.
"""
from __future__ import annotations

import os
import shutil
import tempfile

# FiftyOne keeps its MongoDB data in this folder; tests never touch a developer's real database.
SESSION_DIR = tempfile.mkdtemp(prefix="d3ssl-tests-")
os.environ["FIFTYONE_DATABASE_DIR"] = os.path.join(SESSION_DIR, "fiftyone-db")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# One intra-op thread per process: tests run several processes at once (Ray workers, loader
# workers, torchrun ranks) on 2 cores, and OpenMP thread pools that wait for each other's cores
# make a CPU-bound step several times slower than one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A small embedded data set (80 images over the three splits), built once per session."""
    from pipeline.synth import SynthConfig, build

    out = tmp_path_factory.mktemp("synth") / "synth"
    build(SynthConfig(images=80, seed=0), out, workers=2, progress=False)
    return out


def pytest_collection_modifyitems(session, config, items):
    """Run the `slow` tests first (stable order otherwise). Under pytest-xdist the scheduler hands out
    tests in this order, so the longest ones start at once rather than last on one worker while the
    other sits idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """`pytest -n auto`: one worker per CPU this process may use (its affinity, which is what a
    container grants, not the host's count), at most 8: each worker holds its own FiftyOne database
    and Ray instances, and the end-to-end `dvc repro` test bounds the suite's time beyond that."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def _end_children(grace_s: float = 10.0) -> list[str]:
    """Terminate (then kill, after `grace_s`) every process this one started that still runs, and
    return their names. Only descendants of the pytest process: nothing else is touched."""
    import psutil

    children = psutil.Process().children(recursive=True)
    names = []
    for c in children:
        try:
            names.append(c.name())
            c.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for c in alive:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return names


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """End the processes the suite left running, then remove the session folder (FiftyOne's DB)."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    ended = _end_children()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if ended and reporter is not None:
        reporter.write_line(f"conftest: ended {len(ended)} leftover processes: {', '.join(sorted(set(ended)))}")
    shutil.rmtree(SESSION_DIR, ignore_errors=True)
