"""Selective-search proposals: the Ray stage against a bare loop of the same OpenCV calls.

    python -m benchmarks.bench_proposals [--repeat 2] [--trials 3] [--workdir /tmp/bench_proposals] \
        [--out benchmarks/results/proposals.json]

On real photos that installed packages ship (scikit-image: astronaut, chelsea, coffee, rocket,
hubble_deep_field, the left view of stereo_motorcycle; scikit-learn: china, flower; 300 to 1000 px,
written once as JPEG q95), each listed `--repeat` times, with the default `proposals` settings
(fast mode, searched at a longest side of 500 px):
 - baseline: a bare loop in this process, one OpenCV thread: PIL decode, RGB -> BGR, cv2.resize to
   the search size, createSelectiveSearchSegmentation / setBaseImage / switchToSelectiveSearchFast
   / process. No filtering, no Ray, no files written;
 - the stage, `pipeline.proposals.run`, on a local Ray runtime of 2 CPUs started once and warmed up
   (a cluster start is paid once per job), with 1 worker, then 2 workers.
Each of the three runs `--trials` times, interleaved, and the best time counts (the least
disturbed by other processes). Targets: the stage with one worker >= 0.9x the bare loop (both on
one core: images/s per core), and 2 workers >= 1.7x one worker on 2 cores. The figures (images
per hour per core included: images per CPU-second of the Ray workers x 3600) go to `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline import contracts, raycluster
from pipeline.files import write_text
from pipeline.proposals import ProposalsConfig, run, search_size


def photos() -> dict[str, np.ndarray]:
    """HxWx3 uint8 RGB photos shipped inside scikit-image and scikit-learn (no download)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {n: getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")}
    out["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    sk = load_sample_images()
    for name, img in zip(sk.filenames, sk.images):
        out[Path(name).stem] = img
    return out


def write_images(workdir: Path, repeat: int) -> tuple[Path, dict[str, tuple[int, int]]]:
    """JPEGs of the photos and an images table listing each `repeat` times (distinct keys)."""
    folder = workdir / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    sizes, rows = {}, []
    for name, rgb in photos().items():
        path = folder / f"{name}.jpg"
        if not path.exists():
            Image.fromarray(rgb).save(path, quality=95)
        sizes[name] = (rgb.shape[1], rgb.shape[0])
    for r in range(repeat):
        for name, (w, h) in sizes.items():
            rows.append({"key": f"{name}-{r}", "source": "bench", "image_id": name,
                         "path": str(folder / f"{name}.jpg"), "width": w, "height": h})
    table = pa.Table.from_pylist(rows, schema=contracts.IMAGES_SCHEMA)
    return contracts.write_table(table, workdir / "images.parquet", contracts.IMAGES), sizes


def bare_loop(paths: list[str], cfg: ProposalsConfig) -> tuple[float, float, int]:
    """Wall and CPU seconds for the same decode + OpenCV calls as the stage, in a plain loop; and
    the total of raw boxes."""
    cv2.setNumThreads(1)
    n = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        size = search_size(bgr.shape[1], bgr.shape[0], cfg.max_side)
        if size != (bgr.shape[1], bgr.shape[0]):
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(bgr)
        ss.switchToSelectiveSearchFast(cfg.base_k, cfg.inc_k, cfg.sigma)
        n += len(ss.process())
    return time.perf_counter() - t0, time.process_time() - c0, n


def workers_cpu_seconds() -> float:
    """User + system CPU seconds of this process's Ray workers (descendants titled `ray::`)."""
    me, tick, total = os.getpid(), os.sysconf("SC_CLK_TCK"), 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                continue
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            p = int(stat[1])
            while p > 1 and p != me:
                p = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if p == me:
                total += (int(stat[11]) + int(stat[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


def stage(images: Path, out: Path, cfg: ProposalsConfig, workers: int) -> tuple[float, float, dict]:
    """Wall seconds, workers' CPU seconds and the summary of one stage run."""
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = workers_cpu_seconds(), time.perf_counter()
    summary = run(images, out, cfg, num_workers=workers, progress=False)
    return time.perf_counter() - t0, workers_cpu_seconds() - c0, summary


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=2, help="times each photo is listed")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_proposals"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/proposals.json"))
    args = p.parse_args()
    cfg = ProposalsConfig()
    images, sizes = write_images(args.workdir, args.repeat)
    paths = contracts.read_table(images, contracts.IMAGES).column("path").to_pylist()
    n = len(paths)
    print(f"{len(sizes)} photos x {args.repeat} = {n} images: "
          + ", ".join(f"{k} {w}x{h}" for k, (w, h) in sizes.items())
          + f"; fast mode, searched at longest side {cfg.max_side}; {len(os.sched_getaffinity(0))} cores, "
          f"load average {os.getloadavg()[0]:.1f}")

    raycluster.start(None, 2)
    try:
        stage(images, args.workdir / "warmup", cfg, 2)    # both workers started and imported
        best = {"bare": np.inf, 1: np.inf, 2: np.inf}        # wall seconds
        cpu = {"bare": np.inf, 1: np.inf, 2: np.inf}         # CPU seconds of the loop / the workers
        for t in range(args.trials):
            secs, cpu_secs, raw = bare_loop(paths, cfg)
            best["bare"], cpu["bare"] = min(best["bare"], secs), min(cpu["bare"], cpu_secs)
            for w in (1, 2):
                secs, cpu_secs, summary = stage(images, args.workdir / f"out{w}", cfg, w)
                best[w], cpu[w] = min(best[w], secs), min(cpu[w], cpu_secs)
            print(f"trial {t + 1}: bare {n / best['bare']:.3f}, stage 1 worker {n / best[1]:.3f}, "
                  f"2 workers {n / best[2]:.3f} img/s (best so far; load average {os.getloadavg()[0]:.1f})")
    finally:
        raycluster.stop()

    rate = {k: n / v for k, v in best.items()}
    per_cpu = {k: n / v for k, v in cpu.items()}
    b = summary["boxes_per_image"]
    props = contracts.read_tables(sorted((args.workdir / "out2").glob("part-*.parquet")), contracts.PROPOSALS)
    counts = {r["values"]: r["counts"] for r in pc.value_counts(props.column("key")).to_pylist()}
    print(f"bare loop, 1 core      : {rate['bare']:7.3f} images/s ({raw / n:.0f} raw selective-search boxes per image)")
    print(f"stage, 1 worker        : {rate[1]:7.3f} images/s per core -> {rate[1] / rate['bare']:.3f}x the bare loop "
          "(target >= 0.9)")
    print(f"stage, 2 workers       : {rate[2]:7.3f} images/s -> {rate[2] / rate[1]:.3f}x one worker "
          "(target >= 1.7 on 2 cores)")
    print(f"per CPU-second         : bare {per_cpu['bare']:.3f}, stage 1 worker {per_cpu[1]:.3f} "
          f"({per_cpu[1] / per_cpu['bare']:.3f}x), 2 workers {per_cpu[2]:.3f} images "
          f"(CPU time of the loop / of the Ray workers: the per-core figures without other processes' share)")
    print(f"boxes per image        : mean {b['mean']}, median {b['median']}, min {b['min']}, max {b['max']}; "
          f"paths {summary['paths']}")
    print("per photo              : " + ", ".join(f"{k} {counts.get(f'{k}-0', 0)}" for k in sizes))
    write_text(args.out, json.dumps({
        "stage": "proposals", "images": n, "photos": {k: f"{w}x{h}" for k, (w, h) in sizes.items()},
        "settings": "default proposals section (fast mode, max_side 500)", "trials": args.trials,
        "images_per_second": {"bare_loop": round(rate["bare"], 3), "stage_1_worker": round(rate[1], 3),
                              "stage_2_workers": round(rate[2], 3)},
        "images_per_hour_per_core": round(3600 * per_cpu[1]),    # the Ray worker's own CPU time
        "images_per_hour_per_core_bare_loop": round(3600 * per_cpu["bare"]),
        "cores": len(os.sched_getaffinity(0)), "load_average_1min": round(os.getloadavg()[0], 2),
        "note": "the per-core figure counts the Ray workers' own CPU time, so it holds for an idle core; "
                "load_average_1min says how busy the machine was (wall-clock rates slow down with it)",
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
