"""benchmarks/gpu_check.py cannot rot: its CPU smoke runs every check's code path at tiny sizes
(the CUDA tests with D3SSL_CPU_SMOKE=1, throughput with and without torch.compile, the loader)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.gpu_check import METHOD_NAMES, planned_checks

# The CUDA tests the script must report (tests/**/test_cuda*.py, device "cpu" in the smoke).
CUDA_TESTS = [
    *(f"tests/train/test_cuda.py::test_loss_falls_on_a_fixed_batch[cpu-{m}]" for m in METHOD_NAMES),
    "tests/train/test_cuda.py::test_bf16_autocast_keeps_rois_float32[cpu]",
    "tests/train/test_cuda.py::test_channels_last_matches_contiguous[cpu]",
    "tests/train/test_cuda.py::test_shuffle_bn_on_the_device[cpu]",
    "tests/train/test_cuda.py::test_shuffle_bn_method_step[cpu]",
    "tests/train/test_cuda.py::test_sync_batchnorm_conversion[cpu]",
    "tests/train/test_cuda.py::test_one_rank_process_group[cpu]",
    "tests/train/test_cuda.py::test_pretrain_epoch_checkpoint_resume_export[cpu]",
    "tests/eval/test_cuda_detect.py::test_detection_iterations[cpu]",
]
CUDA_ONLY = ["tests/train/test_cuda.py::test_pinned_memory_transfer[cpu]"]     # skipped on the CPU, by design
CHECKS = ["cuda_tests",
          *(f"throughput.{mode}.{n}" for mode in ("eager", "compile") for n in ("baseline", *METHOD_NAMES)),
          "loader.workers0", "loader.workers1"]


def test_cpu_smoke_names_every_check_and_passes(repo, tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ)
    env.pop("D3SSL_CPU_SMOKE", None)
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--out", str(out)],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=540)
    report = json.loads((out / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert sorted(planned_checks(smoke=True)) == sorted(CHECKS)
    missing = [n for n in CHECKS + CUDA_TESTS + CUDA_ONLY if n not in checks]
    assert not missing, missing
    bad = {n: (checks[n]["status"], checks[n].get("error")) for n in CHECKS + CUDA_TESTS if checks[n]["status"] != "pass"}
    assert not bad, bad
    for n in CUDA_ONLY:
        assert checks[n]["status"].startswith("skipped: pinned memory needs CUDA"), checks[n]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for mode in ("eager", "compile"):
        base = checks[f"throughput.{mode}.baseline"]["figures"]
        assert base["images_per_s"] > 0 and base["compile"] == (mode == "compile")
        for m in METHOD_NAMES:
            f = checks[f"throughput.{mode}.{m}"]["figures"]
            assert f["images_per_s"] > 0 and f["ratio_to_baseline"] > 0, f
            assert (f.get("compiled_graphs_in_process", 0) > 0) == (mode == "compile"), f
    for w in (0, 1):
        f = checks[f"loader.workers{w}"]["figures"]
        assert f["samples_per_s"] > 0 and set(f["loader_over_trainer"]) == set(METHOD_NAMES), f
    md = (out / "gpu_check.md").read_text()
    assert all(f"`{n}`" in md for n in CHECKS + CUDA_TESTS)
    assert report["passed"] and report["elapsed_s"] < report["budget_s"]
