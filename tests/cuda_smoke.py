"""Shared by the `cuda`-marked tests: they run on the GPU, or on the CPU at tiny sizes when
D3SSL_CPU_SMOKE=1 (what `python -m benchmarks.gpu_check --cpu-smoke` and CI do)."""
from __future__ import annotations

import os

import pytest
import torch

SMOKE = os.environ.get("D3SSL_CPU_SMOKE", "") not in ("", "0")
DEVICE = "cpu" if SMOKE else "cuda"


@pytest.fixture(params=[DEVICE])
def device(request) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is false); D3SSL_CPU_SMOKE=1 runs this on the CPU")
    return torch.device(request.param)
