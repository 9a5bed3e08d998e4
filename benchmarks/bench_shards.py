"""The shards stage's throughput: images packed per hour per core.

    python -m benchmarks.bench_shards [--repeat 4] [--trials 2] [--samples-per-shard 8] \
        [--workdir /tmp/bench_shards] [--out benchmarks/results/shards.json]

On the same real photos as `benchmarks.bench_proposals` (8 photos shipped by scikit-image and
scikit-learn, 300 to 1000 px, JPEG q95), each listed `--repeat` times, with 20 proposals per image
(the stage's cost does not depend on the boxes: it hashes, checks and copies the image bytes),
`pipeline.shards.run` runs on a local Ray runtime of one CPU started once and warmed up, from an
empty output folder each trial; the best trial counts. Reported: images per second of wall time
and images per CPU-second of the Ray worker (the per-core figure without other processes' share
of a loaded machine), both also per hour, and the machine's load average, written to `--out`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.bench_proposals import workers_cpu_seconds, write_images
from pipeline import cli, contracts, raycluster
from pipeline.files import write_text
from pipeline.shards import ShardsConfig, run

log = logging.getLogger("benchmarks.bench_shards")


def fake_proposals(images: Path, folder: Path, per_image: int = 20) -> Path:
    """A proposals-stage output with `per_image` boxes per image (no failures)."""
    table = contracts.read_table(images, contracts.IMAGES)
    rows = [{"key": r["key"], "x1": 0.0, "y1": 0.0, "x2": float(r["width"] - i), "y2": float(r["height"] - i),
             "rank": i}
            for r in table.to_pylist() for i in range(per_image)]
    folder.mkdir(parents=True, exist_ok=True)
    contracts.write_table(pa.Table.from_pylist(rows), folder / "part-00000.parquet", contracts.PROPOSALS)
    (folder / "failures.csv").write_text('"key","path","reason","detail"\n')
    return folder


def measure(images: Path, props: Path, workdir: Path, cfg: ShardsConfig, trials: int) -> tuple[float, float]:
    """Best wall seconds and best worker CPU seconds of `trials` runs from an empty output."""
    best_wall, best_cpu = np.inf, np.inf
    for _ in range(trials):
        out = workdir / "out"
        shutil.rmtree(out, ignore_errors=True)
        c0, t0 = workers_cpu_seconds(), time.perf_counter()
        run(images, props, out, cfg, progress=False)
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, workers_cpu_seconds() - c0)
    return best_wall, best_cpu


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m benchmarks.bench_shards", __doc__)
    p.add_argument("--repeat", type=int, default=4, help="times each photo is listed")
    p.add_argument("--trials", type=int, default=2, help="runs; the best counts")
    p.add_argument("--samples-per-shard", type=int, default=8, help="samples per shard (one Ray task each)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_shards"), help="scratch folder")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/shards.json"), help="result file")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    images, sizes = write_images(args.workdir, args.repeat)
    props = fake_proposals(images, args.workdir / "props")
    n = len(sizes) * args.repeat
    cfg = ShardsConfig(samples_per_shard=args.samples_per_shard)
    raycluster.start(None, 1)
    try:
        run(images, props, args.workdir / "warmup", cfg, progress=False)     # the worker started and imported
        wall, cpu = measure(images, props, args.workdir, cfg, args.trials)
    finally:
        raycluster.stop()
    result = {
        "stage": "shards", "images": n, "photos": {k: f"{w}x{h}" for k, (w, h) in sizes.items()},
        "samples_per_shard": cfg.samples_per_shard, "ray_cpus": 1, "trials": args.trials,
        "images_per_second_wall": round(n / wall, 2), "images_per_hour_wall": round(3600 * n / wall),
        "images_per_cpu_second": round(n / cpu, 2) if cpu > 0 else None,
        "images_per_hour_per_core": round(3600 * n / cpu) if cpu > 0 else None,
        "cores": len(os.sched_getaffinity(0)), "load_average_1min": round(os.getloadavg()[0], 2),
        "note": "the per-core figure counts the Ray worker's own CPU time, so it holds for an idle core; "
                "load_average_1min says how busy the machine was (wall-clock rates slow down with it)",
    }
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    log.info("shards: %d images, %.1f images/s wall, %s images/hour per core (worker CPU time); wrote %s",
             n, n / wall, result["images_per_hour_per_core"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
