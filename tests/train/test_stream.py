"""The streaming input pipeline: splitting, equal epochs, determinism, resume, bad shards."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pipeline import shardset
from pipeline.shardset import SHARD_PATTERN
from train.stream import LoaderConfig, batches_per_worker, make_loader, make_stream
from train.views import ViewConfig

from tests.conftest import REPO
from tests.train.conftest import N_SHARDS, PER_SHARD


def small(**kw) -> LoaderConfig:
    base = dict(batch_size=4, workers=2, shuffle_buffer=8, views=ViewConfig(size=64, small_size=32))
    base.update(kw)
    return LoaderConfig(**base)


def run_epoch(urls, cfg, **kw) -> list[dict]:
    return list(make_loader(urls, cfg, **kw))


def test_two_ranks_two_workers_see_every_sample_once(shards, monkeypatch):
    urls, total = shardset.shards(shards)
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        for b in run_epoch(urls, small(resampled=False), seed=0):
            keys += b["key"]
    assert len(keys) == total and len(set(keys)) == total


def test_resampled_epochs_have_equal_batch_counts_per_rank(shards, monkeypatch):
    urls, total = shardset.shards(shards)
    cfg = small(epoch_samples=40)
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        batches = run_epoch(urls, cfg, seed=0, total_samples=total, world=2)
        counts.append(len(batches))
        assert all(len(b["key"]) == cfg.batch_size for b in batches)
    assert counts[0] == counts[1] == cfg.workers * batches_per_worker(cfg, total, 2) == 6


def test_batches_hold_the_views_and_boxes(shards):
    urls, total = shardset.shards(shards)
    b = run_epoch(urls, small(), seed=0, total_samples=total)[0]
    assert b["x1"].shape == (4, 3, 64, 64) and b["x1"].dtype == torch.uint8
    assert b["x2s"].shape == (4, 3, 32, 32) and b["boxes2"].shape == (4, 4, 4) and b["valid"].shape == (4, 4)
    assert "xb" not in b                                       # backgrounds are drawn on the device (augment)
    assert torch.allclose(b["boxes2s"], b["boxes2"] * 0.5)
    for i, key in enumerate(b["key"]):
        n = int(b["valid"][i].sum())
        assert 1 <= n <= 4
        if key.endswith("_0"):                                  # no proposals: the whole-image box
            assert n == 1 and torch.allclose(b["boxes2"][i, 0], torch.tensor([0.0, 0.0, 64.0, 64.0]), atol=1e-3)


def test_same_seed_rank_worker_same_batches(shards):
    urls, total = shardset.shards(shards)
    a = run_epoch(urls, small(), seed=5, total_samples=total)
    b = run_epoch(urls, small(), seed=5, total_samples=total)
    c = run_epoch(urls, small(), seed=6, total_samples=total)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["x2"], y["x2"]) and torch.equal(x["boxes1"], y["boxes1"]) for x, y in zip(a, b))
    assert [x["key"] for x in a] != [x["key"] for x in c]
    e1 = run_epoch(urls, small(), seed=5, epoch=1, total_samples=total)
    assert [x["key"] for x in a] != [x["key"] for x in e1]      # a new epoch, a new order


@pytest.mark.parametrize("start", [1, 3, 4])
def test_resuming_mid_epoch_continues_exactly(shards, start):
    urls, total = shardset.shards(shards)
    cfg = small(epoch_samples=48)
    full = run_epoch(urls, cfg, seed=2, total_samples=total)
    rest = run_epoch(urls, cfg, seed=2, total_samples=total, start_batch=start)
    assert len(rest) == len(full) - start
    for x, y in zip(full[start:], rest):
        assert x["key"] == y["key"] and torch.equal(x["x1"], y["x1"]) and torch.equal(x["boxes2"], y["boxes2"])


def test_a_corrupt_shard_is_reported_and_skipped(shards, tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    bad = copy / SHARD_PATTERN.format(2)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])                     # truncated mid-shard
    urls, total = shardset.shards(copy)
    with caplog.at_level(logging.WARNING, logger="train.stream"):
        batches = list(make_stream(urls, small(resampled=False, workers=0), seed=0))
    keys = [k for b in batches for k in b["key"]]
    assert not any(k.startswith("img_2_") and k in keys for k in [f"img_2_{j}" for j in range(3, 5)])
    assert len(keys) >= total - PER_SHARD and len(set(keys)) == len(keys)
    assert int(batches[-1]["errors"]) == 1
    msg = [r.getMessage() for r in caplog.records if "corrupt shard" in r.getMessage()]
    assert msg and str(bad) in msg[0] and "at sample" in msg[0]


def test_resuming_needs_the_resampled_mode(shards):
    urls, _ = shardset.shards(shards)
    with pytest.raises(ValueError, match="resampled"):
        make_stream(urls, small(resampled=False), seed=0, start_batch=2)


def test_unknown_start_method_is_an_error():
    with pytest.raises(ValueError, match="loader.start_method"):
        small(start_method="threads")


def test_workers_start_in_a_process_that_has_used_opencv_and_ray(shards, tmp_path):
    """Forked loader workers hung in a process that had run OpenCV's thread pool (selective search,
    in the same pytest process, in CI): the default start method must deliver every sample in a
    process that has used OpenCV and Ray, within a time limit."""
    script = tmp_path / "after_cv2.py"
    script.write_text(
        "import sys\n"
        "import cv2, numpy as np, ray\n"
        "from pipeline import shardset\n"
        "from train.stream import LoaderConfig, make_loader\n"
        "from train.views import ViewConfig\n"
        "if __name__ == '__main__':\n"      # forkserver and spawn import the main module again
        "    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()\n"
        "    ss.setBaseImage(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))\n"
        "    ss.switchToSelectiveSearchFast()\n"
        "    assert len(ss.process())\n"
        "    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "    ray.get(ray.remote(lambda: 1).remote())\n"
        "    ray.shutdown()\n"
        "    urls, total = shardset.shards(sys.argv[1])\n"
        "    cfg = LoaderConfig(batch_size=4, workers=2, shuffle_buffer=8, resampled=False,\n"
        "                       views=ViewConfig(size=64, small_size=32))\n"
        "    keys = [k for b in make_loader(urls, cfg, seed=0) for k in b['key']]\n"
        "    assert sorted(keys) == sorted(set(keys)) and len(keys) == total, keys\n"
        "    print('ok', len(keys))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    run = subprocess.run([sys.executable, str(script), str(shards)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0 and f"ok {N_SHARDS * PER_SHARD}" in run.stdout, run.stderr[-3000:]


def test_forkserver_workers_inherit_the_main_modules_imports(shards, tmp_path):
    """Every loader worker runs the main module again; under `python -m` (how every stage runs)
    the forkserver imports that module once, so a new epoch's workers find its imports (the
    trainer's: torchvision, dvclive) done instead of spending a second on them. A marker module
    the main module imports records each process that imports it: the trainer and the
    forkserver, not each epoch's worker."""
    pkg = tmp_path / "mods"
    pkg.mkdir()
    (pkg / "heavy_marker.py").write_text(
        "import os, sys\n"
        "with open(os.environ['MARKER_LOG'], 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n")
    (pkg / "probe_main.py").write_text(
        "import sys\n"
        "import heavy_marker\n"
        "from pipeline import shardset\n"
        "from train.stream import LoaderConfig, make_loader\n"
        "from train.views import ViewConfig\n"
        "if __name__ == '__main__':\n"
        "    urls, total = shardset.shards(sys.argv[1])\n"
        "    cfg = LoaderConfig(batch_size=4, workers=1, shuffle_buffer=8, epoch_samples=8,\n"
        "                       views=ViewConfig(size=64, small_size=32))\n"
        "    n = sum(len(b['key']) for epoch in range(2) for b in make_loader(urls, cfg, seed=0, epoch=epoch,\n"
        "                                                                     total_samples=total))\n"
        "    print('samples', n)\n")
    log = tmp_path / "imports.log"
    env = dict(os.environ, PYTHONPATH=f"{pkg}{os.pathsep}{REPO}", MARKER_LOG=str(log))
    run = subprocess.run([sys.executable, "-m", "probe_main", str(shards)], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert run.returncode == 0 and "samples 16" in run.stdout, run.stderr[-3000:]
    assert len(log.read_text().split()) == 2, log.read_text()      # trainer + forkserver; 2 workers ran
    assert "found in sys.modules" not in run.stderr, run.stderr[-3000:]   # runpy: the main module itself is not preloaded


def test_a_batch_carries_a_stable_id_of_each_image(shards):
    """The queue tells an image's own keys by this id: it must be the same in every process and on
    every rank (a hash of the key, not Python's salted hash())."""
    from train.stream import image_id
    assert image_id("img_0_1") == 7728776974478735790
    urls, total = shardset.shards(shards)
    b = run_epoch(urls, small(), seed=0, total_samples=total)[0]
    assert b["image_id"].dtype == torch.int64
    assert b["image_id"].tolist() == [image_id(k) for k in b["key"]]
    assert len(set(b["image_id"].tolist())) == len(set(b["key"]))
