"""Shared fixtures. Tests never touch the network: telemetry is off for Ray, FiftyOne and DVC."""
from __future__ import annotations

import os
import tempfile

# FiftyOne keeps its MongoDB data in this folder; tests never touch a developer's real database.
os.environ["FIFTYONE_DATABASE_DIR"] = tempfile.mkdtemp(prefix="d3ssl-fiftyone-")
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
