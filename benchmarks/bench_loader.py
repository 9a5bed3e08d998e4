"""Throughput of the training input pipeline against decoding alone, on the same shards.

    python -m benchmarks.bench_loader [--shards data/shards] [--samples 1500]

- baseline: read the shards, decode each JPEG with PIL and resize it to 224x224 (one process);
- full pipeline in one process (`make_stream`, no loader workers): decode with draft, the three
  views, box mapping and K-selection, colour augmentation, batching;
- the same through a DataLoader with 1 and 2 worker processes;
- the time to the first batch (worker start-up, once per epoch) with each worker start method.
Reported as samples/s and samples/s per core (one busy process = one core); target: the full
pipeline at least 0.5x the baseline per core.
"""
from __future__ import annotations

import argparse
import io
import tarfile
import time

import cv2
import numpy as np
from PIL import Image

from pipeline import shardset
from train.stream import LoaderConfig, make_loader, make_stream


def baseline(paths: list[str], samples: int) -> float:
    cv2.setNumThreads(1)
    n, t0 = 0, time.perf_counter()
    while n < samples:
        for path in paths:
            with tarfile.open(path, "r|*") as tar:
                for m in tar:
                    if m.name.endswith(".jpg"):
                        img = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
                        cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA)
                        n += 1
            if n >= samples:
                break
    return n / (time.perf_counter() - t0)


def pipeline_rate(paths: list[str], total: int, samples: int, workers: int) -> float:
    cfg = LoaderConfig(batch_size=32, workers=workers, epoch_samples=samples)
    if workers == 0:
        cv2.setNumThreads(1)
        stream = make_stream(paths, cfg, seed=0, total_samples=total)
        t0, n = time.perf_counter(), 0
        for b in stream:
            n += len(b["key"])
        return n / (time.perf_counter() - t0)
    loader = make_loader(paths, cfg, seed=0, total_samples=total)
    it = iter(loader)
    first = next(it)           # worker start-up is not throughput
    t0, n = time.perf_counter(), 0
    for b in it:
        n += len(b["key"])
    del first
    return n / (time.perf_counter() - t0)


def first_batch_seconds(paths: list[str], total: int, start_method: str, repeats: int = 3) -> float:
    """Median time from creating the loader's iterator to its first batch (2 workers)."""
    cfg = LoaderConfig(batch_size=32, workers=2, epoch_samples=128, start_method=start_method)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        it = iter(make_loader(paths, cfg, seed=0, total_samples=total))
        next(it)
        times.append(time.perf_counter() - t0)
        del it
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--samples", type=int, default=1500)
    args = p.parse_args()
    paths, total = shardset.shards(args.shards)
    base = baseline(paths, args.samples)
    one = pipeline_rate(paths, total, args.samples, 0)
    w1 = pipeline_rate(paths, total, args.samples, 1)
    w2 = pipeline_rate(paths, total, args.samples, 2)
    print(f"decode + resize to 224 alone (1 process): {base:7.1f} samples/s")
    print(f"full pipeline, in process (1 core):       {one:7.1f} samples/s  ratio {one / base:.2f}x (target >= 0.5x)")
    print(f"full pipeline, 1 loader worker:           {w1:7.1f} samples/s  ({w1:.1f} per core)")
    print(f"full pipeline, 2 loader workers:          {w2:7.1f} samples/s  ({w2 / 2:.1f} per core, {w2 / w1:.2f}x of 1 worker)")
    starts = {m: first_batch_seconds(paths, total, m) for m in ("fork", "forkserver", "spawn")}
    print("first batch with 2 workers (start-up, once per epoch): "
          + ", ".join(f"{m} {t:.2f} s" for m, t in starts.items())
          + f"; forkserver {starts['forkserver'] / starts['fork']:.2f}x fork")


if __name__ == "__main__":
    main()
