"""Detection fine-tuning on the GPU (issue 17): a few iterations of Mask R-CNN (C4) through the
stage's entry point, then PreciseBN and the COCO evaluation, on the device.

Marked `cuda`: skips without a GPU; `D3SSL_CPU_SMOKE=1` runs it on the CPU at a tiny size
(`python -m benchmarks.gpu_check --cpu-smoke` does, through `tests/test_gpu_check.py`).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tests.eval.test_detect import TINY, make_shapes_set

from tests.cuda_smoke import DEVICE, SMOKE, device  # noqa: F401 (the device fixture)

pytestmark = pytest.mark.cuda



def test_detection_iterations(device, tmp_path):
    import eval.detect as detect

    size = 64 if SMOKE else 128
    train_ann, train_dir = make_shapes_set(tmp_path, "train", 4 if SMOKE else 8, seed=0, size=size)
    val_ann, val_dir = make_shapes_set(tmp_path, "val", 2 if SMOKE else 4, seed=1, size=size)
    params = tmp_path / "params.yaml"
    params.write_text("detect:\n  preset: short\n  workers: 0\n  log_every: 1\n")
    tiny = replace(TINY, min_size_train=(size,), min_size_test=size, max_size=size, ims_per_batch=2,
                   max_iter=2 if SMOKE else 5, steps=(), warmup_iters=1, precise_bn_iters=1, masks=True)
    old = dict(detect.PRESETS)
    detect.PRESETS["short"] = tiny
    try:
        assert detect.main(["--backbone", "random", "--arch", "resnet18", "--train-ann", str(train_ann),
                            "--train-images", str(train_dir), "--val-ann", str(val_ann), "--val-images",
                            str(val_dir), "--out", str(tmp_path / "det"), "--params", str(params),
                            "--device", device.type]) == 0
    finally:
        detect.PRESETS.clear()
        detect.PRESETS.update(old)
    m = json.loads((tmp_path / "det" / "metrics.json").read_text())
    assert m["device"].startswith(device.type)
    assert set(m["bbox"]) >= {"AP", "AP50"} and set(m["segm"]) >= {"AP", "AP50"}
    rows = (tmp_path / "det" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 1 + tiny.max_iter
    losses = [float(r.split(",")[2]) for r in rows[1:]]
    assert all(x == x and abs(x) < 1e6 for x in losses), losses
