"""Selective-search proposals for every image of an images table, as a Ray job (paper section 4).

    python -m pipeline.proposals --images data/openimage_mini/images.parquet --out data/proposals \
        [--ray-address ADDR] [--num-workers N] [--params params.yaml]

The paper says only "similar to SoCo, we use selective search to generate noisy bounding boxes".
Everything else follows SoCo's released code (github.com/hologerry/SoCo, `selective_search/`) where
it says something, and is ours where it does not:
- SoCo: the filters (strategy `ratio3size0308`): both sides >= 32 px, aspect ratio w/h in [1/3, 3],
  sqrt(box area / image area) in [0.3, 0.8]; the fallback for an image left with no box (SoCo's
  `filter_ss_proposals_json_post_no_prop.py`): drop the size rule, then keep only the 32 px rule;
  images decoded with PIL `.convert("RGB")`.
- Ours: OpenCV's selective search (`cv2.ximgproc.segmentation`, the "fast" preset of Uijlings et
  al.: HSV and Lab, graph segmentation k = 150, 300, 450, sigma 0.8; "quality" selectable) instead
  of SoCo's scikit-image port, run on the image shrunk to `max_side` (never enlarged; the cost grows
  faster than the pixel count), boxes mapped back to original pixels; near-duplicate removal
  (greedy, in rank order, IoU > `nms_iou`); an optional cap; the whole-image box as the last
  fallback; the rank order: a random order of selective search's distinct boxes fixed by `seed`.
  OpenCV's own order is random too (C `rand()` x hierarchy level), but C `rand()` is shared with
  Ray's threads in a worker, so that order cannot be reproduced; a seeded one can, and a rerun or a
  retried task gives the same parts. With the cap this is SoCo's `random` proposal selection.

Pixel frame: boxes are in the stored pixel frame, the one PIL decodes *without* EXIF transpose. That
is the frame the images table's `width`/`height` describe (`pipeline.readers.image_size` reads
them from the file header), the frame of the ground-truth boxes, and what SoCo and torchvision's
loader (`Image.open(p).convert("RGB")`) decode. An EXIF Orientation tag is therefore ignored and
counted (`exif_orientation_ignored` in the summary). An image whose decoded size differs from its
table row fails with `size_mismatch` rather than get boxes in a frame no other stage uses.

Images are decoded by `pipeline.images.decode`, the one decoding policy of every stage (shards,
the training stream and the evaluations see the same pixels): grayscale and palette expanded, CMYK
converted, alpha dropped (the stored colour under it is kept), 16-bit grayscale scaled to 8 bits,
over PIL's pixel limit `too_large`. What cannot be decoded is a failure with one of
`FAILURE_REASONS`, never an error of the job.

The per-image compute (the settings, selective search, the filters, near-duplicate removal) is
`pipeline.selective_search`; this module runs it on Ray and writes the outputs.

Outputs in `--out` (the layout, its readers and the rerun checks: `pipeline.proposalset`):
- `part-00000.parquet`, ...: the proposals contract (`key, x1, y1, x2, y2, rank`, float32 pixels,
  rank from 0 per image in the seeded rank order after filtering), `images_per_part` images per
  part, in the images table's order. Every `*.parquet` under `--out` is a proposal table.
- `part-00000.json`, ...: per image of the part: the path it took (`PATHS`), its box count, its
  failure reason and decode notes; plus the fingerprint of the run. Written just before the part's
  parquet, which is written last (under a temporary name, renamed when complete): a part is
  finished when its parquet exists.
- `summary.json`: images, boxes per image (distribution), counts per path, failures per reason,
  decode notes, the number of parts, the settings the output depends on. Nothing that varies
  between runs of the same inputs (DVC hashes this folder, and a changed hash reruns every stage
  downstream): parts written and skipped, workers, Ray address, timing and the speed-only
  settings go to the log (and to the `"run"` entry of what `run()` returns).
- `failures.csv`: `key, path, reason, detail`, one row per failed image (CSV, not parquet, so
  that every parquet file under `--out` is a proposal table, as `pipeline.browse` reads them).
  Paths are written as the images table gives them, never made absolute (the output must not
  depend on the folder the stage ran in).

A rerun skips finished parts (DVC keeps the folder: `persist: true` in dvc.yaml) whose images
still have the bytes that were searched (each image's sha256 is in its part's sidecar; a part with
an image fixed, replaced or gone is proposed again). Parts of a
different run (other settings, another images table, another code version of this stage: any edit
of the modules it runs but a comment or docstring) are never mixed in: the stage logs that it
starts clean and removes its outputs from `--out` (the parts, `summary.json`, `failures.csv`;
nothing else there).

Locations: `--images`, `--out` and the images table's `path` column may be local paths or
object-store URLs (`s3://bucket/prefix`, read and written through `pipeline.storage`).

Ray: started or joined by `pipeline.raycluster`: local by default (`--num-workers` CPUs, all
usable cores unless given), or the cluster at `--ray-address` / `RAY_ADDRESS`, shipped the
`pipeline` package (workers must reach the images: URLs, or paths on a shared file system;
relative paths are resolved against the working directory of the command), where `--num-workers` caps the tasks
running at once (default: the cluster's CPUs). One task = `images_per_task` images, one CPU, one
OpenCV thread; a task whose worker dies is retried `max_retries` times, then its images are retried
one by one, and an image that still kills its worker is listed as `worker_crashed`.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm import tqdm

from pipeline import cli, contracts, raycluster, storage
from pipeline import images as image_io
from pipeline.closure import code_version
from pipeline.images import ImageFailure, to_rgb  # noqa: F401 - re-exported
from pipeline.params import as_dict, load_section
from pipeline.proposalset import (
    FAILURES_NAME, FAILURES_SCHEMA, SUMMARY_NAME, finished_parts, part_name, parts_with_new_bytes, read_records,
)
# The per-image compute, re-exported: tests, benchmarks and pipeline.shards import it from here.
from pipeline.selective_search import (  # noqa: F401 - re-exported
    FAILED, FAILURE_REASONS, PATHS, ImageResult, ProposalsConfig, check_opencv, decode, nms, propose, propose_file,
    rule_mask, search_size, select_boxes, selective_search,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ Ray and the disk


def check_node() -> None:
    """What a Ray node needs to run this stage beyond the import (`raycluster.check_nodes` runs it
    on every node of a cluster; `run` on the driver): OpenCV with selective search."""
    check_opencv()


def _propose_task(rows: list[tuple[str, str, int, int]], cfg: ProposalsConfig) -> tuple[list[ImageResult], str]:
    """A Ray task: the images `rows` (key, absolute path or URL, width, height), one OpenCV
    thread; returns their results and the node it ran on."""
    cv2.setNumThreads(1)   # Ray runs one task per core; OpenCV's own threads would oversubscribe
    return [propose_file(*row, cfg) for row in rows], raycluster.node_id()


def results_table(results: list[ImageResult]) -> pa.Table:
    """The proposals table of some images' results, in their order, ranks from 0 per image."""
    n = [len(r.boxes) for r in results]
    boxes = np.concatenate([r.boxes for r in results]) if sum(n) else np.zeros((0, 4), np.float32)
    return pa.table({
        "key": pa.array(np.repeat([r.key for r in results], n).tolist() if sum(n) else [], pa.string()),
        "x1": pa.array(boxes[:, 0], pa.float32()), "y1": pa.array(boxes[:, 1], pa.float32()),
        "x2": pa.array(boxes[:, 2], pa.float32()), "y2": pa.array(boxes[:, 3], pa.float32()),
        "rank": pa.array(np.concatenate([np.arange(k, dtype=np.int32) for k in n] or [np.zeros(0, np.int32)]),
                         pa.int32()),
    }, schema=contracts.PROPOSALS_SCHEMA)


SPEED_ONLY = ("images_per_task", "max_retries")   # settings that change the speed, never the output


def output_settings(cfg: ProposalsConfig) -> dict:
    """The settings the output depends on (those of SPEED_ONLY left out)."""
    return {k: v for k, v in as_dict(cfg).items() if k not in SPEED_ONLY}


def fingerprint(images: pa.Table, cfg: ProposalsConfig) -> str:
    """What a finished part depends on: the output settings, the part size, OpenCV, the decoding
    policy, the code version of this stage (`pipeline.closure.code_version`: a docstring or comment
    edit is no change) and the images."""
    settings = output_settings(cfg)
    doc = {"settings": settings, "opencv": cv2.__version__, "decode": image_io.POLICY,
           "code": code_version("pipeline.proposals")}
    h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
    for col in ("key", "path", "width", "height"):
        h.update(json.dumps(images.column(col).to_pylist()).encode())
    return h.hexdigest()[:16]


def write_part(out: str | Path, index: int, results: list[ImageResult], fp: str) -> None:
    """Sidecar first, the parquet last: the part is finished once its parquet exists."""
    side = {"fingerprint": fp, "images": [r.record() for r in results]}
    storage.write_text(storage.join(out, f"{part_name(index)}.json"), json.dumps(side) + "\n")
    storage.write_table(results_table(results), storage.join(out, f"{part_name(index)}.parquet"), contracts.PROPOSALS)


def summarize(records: list[dict]) -> dict:
    """Counts over the per-image records of every part."""
    ok = [r["boxes"] for r in records if r["path"] != FAILED]
    n = np.asarray(ok, dtype=np.int64)
    edges = [1, 2, 5, 10, 20, 50, 100, 200, 500]
    labels = [f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    hist = np.histogram(n, bins=edges + [np.iinfo(np.int64).max])[0] if len(n) else np.zeros(len(labels))
    q = (lambda p: float(np.percentile(n, p))) if len(n) else (lambda p: 0.0)
    return {
        "images": len(records),
        "images_with_boxes": len(ok),
        "boxes": int(n.sum()),
        "boxes_per_image": {
            "mean": round(float(n.mean()), 3) if len(n) else 0.0, "min": int(n.min()) if len(n) else 0,
            "p05": q(5), "p25": q(25), "median": q(50), "p75": q(75), "p95": q(95),
            "max": int(n.max()) if len(n) else 0, "histogram": dict(zip(labels, map(int, hist))),
        },
        "paths": {p: sum(r["path"] == p for r in records) for p in (*PATHS, FAILED)},
        "failures": dict(sorted(collections.Counter(r["reason"] for r in records if r["path"] == FAILED).items())),
        "decoded_from_mode": dict(sorted(collections.Counter(r["mode"] for r in records if "mode" in r).items())),
        "exif_orientation_ignored": sum("exif_orientation" in r for r in records),
        "resized_for_search": sum(bool(r.get("resized")) for r in records),
    }


def write_failures(out: str | Path, records: list[dict], paths: dict[str, str]) -> None:
    bad = [r for r in records if r["path"] == FAILED]
    table = pa.table({"key": [r["key"] for r in bad], "path": [paths[r["key"]] for r in bad],
                      "reason": [r["reason"] for r in bad], "detail": [r["detail"] for r in bad]},
                     schema=FAILURES_SCHEMA)
    with storage.atomic_write(storage.join(out, FAILURES_NAME)) as tmp:
        pacsv.write_csv(table, str(tmp))


def _as_given(result: ImageResult, absolute: str, given: str) -> ImageResult:
    """`result` with its failure detail naming the file as the images table does: a decoder's
    message holds the absolute path the worker opened, which depends on the working folder."""
    if absolute != given and absolute in result.detail:
        return dataclasses.replace(result, detail=result.detail.replace(absolute, given))
    return result


def _run_parts(rows: list[tuple], todo: list[int], size: dict[int, int], out: str, cfg: ProposalsConfig,
               fp: str, workers: int, progress: bool, given: dict[str, str]) -> list[str]:
    """Propose the images of parts `todo` on Ray, `workers` tasks at a time; write each part as
    soon as its last task is back. `given`: key -> the path as the images table writes it.
    Returns the node each finished task ran on."""
    import ray

    task = ray.remote(_propose_task).options(max_retries=cfg.max_retries, retry_exceptions=False,
                                             **raycluster.TASK_OPTIONS)
    nodes: list[str] = []
    per_part = cfg.images_per_part
    # The task queue: (part, index of the chunk's first image, rows), parts in order, so a killed
    # run leaves the earliest parts finished.
    queue: collections.deque = collections.deque(
        (p, s, rows[s:min(s + cfg.images_per_task, p * per_part + size[p])])
        for p in todo for s in range(p * per_part, p * per_part + size[p], cfg.images_per_task))
    pending: dict = {}                                  # ObjectRef -> (part, start, rows)
    results: dict[int, dict[int, ImageResult]] = {p: {} for p in todo}   # part -> image index -> result
    with tqdm(total=sum(size.values()), unit="img", desc="proposals", disable=not progress) as bar:
        while queue or pending:
            while queue and len(pending) < workers:     # one task per worker at a time
                p, s, chunk = queue.popleft()
                pending[task.remote(chunk, cfg)] = (p, s, chunk)
            ready, _ = ray.wait(list(pending), num_returns=1)
            p, s, chunk = pending.pop(ready[0])
            try:
                got, node = ray.get(ready[0])
                nodes.append(node)
            except raycluster.worker_died() as e:       # the worker died on every retry (our code
                if len(chunk) > 1:                      # raising or a lost node ends the job); find
                    queue.extendleft(reversed([(p, s + i, [row]) for i, row in enumerate(chunk)]))
                    continue                            # the image that kills it: one by one
                got = [ImageResult(chunk[0][0], np.zeros((0, 4), np.float32), FAILED, "worker_crashed",
                                   raycluster.died_message(e), sha256=storage.digest(chunk[0][1]))]
            got = [_as_given(r, row[1], given[row[0]]) for r, row in zip(got, chunk)]
            results[p].update({s + i: r for i, r in enumerate(got)})
            bar.update(len(got))
            if len(results[p]) == size[p]:
                write_part(out, p, [results[p].pop(i) for i in sorted(results[p])], fp)
    return nodes


def _table_rows(images: pa.Table) -> tuple[list[tuple], dict[str, str]]:
    """(key, location a worker opens, width, height) per image, and key -> path as the table gives
    it. Relative local paths are made absolute (`storage.worker_location`)."""
    keys, table_paths = images.column("key").to_pylist(), images.column("path").to_pylist()
    opened = [storage.worker_location(p) for p in table_paths]
    rows = list(zip(keys, opened, images.column("width").to_pylist(), images.column("height").to_pylist()))
    return rows, dict(zip(keys, table_paths))


def run(images_path: str | Path, out: str | Path, cfg: ProposalsConfig, *, num_workers: int | None = None,
        ray_address: str | None = None, progress: bool = True) -> dict:
    """The whole stage; returns the summary written to `out/summary.json`, plus, under `"run"`,
    what varies between runs and is only logged: parts written and skipped, workers, Ray address,
    tasks per node, seconds. `images_path` and `out` are paths or URLs.

    Uses the Ray runtime the caller started, if any; otherwise starts a local one (or joins
    `ray_address` / RAY_ADDRESS) and shuts it down at the end."""
    t0 = time.perf_counter()
    if raycluster.address_of(ray_address) is None:
        check_node()            # a cluster's nodes are checked one by one when it is joined
    images = storage.read_table(images_path, contracts.IMAGES)
    fp = fingerprint(images, cfg)
    out = str(out)
    storage.makedirs(out)
    n_parts = -(-images.num_rows // cfg.images_per_part)
    rows, given = _table_rows(images)
    done = finished_parts(out, n_parts, fp)
    done -= parts_with_new_bytes(out, done, [r[1] for r in rows], cfg.images_per_part)
    todo = [i for i in range(n_parts) if i not in done]

    size = {p: min((p + 1) * cfg.images_per_part, len(rows)) - p * cfg.images_per_part for p in todo}
    workers, nodes = 0, []
    if todo:
        import ray

        started = raycluster.start(ray_address, num_workers, module=__name__)
        try:
            workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            nodes = _run_parts(rows, todo, size, out, cfg, fp, workers, progress, given)
        finally:
            if started:
                raycluster.stop()

    records = [r for i in range(n_parts) for r in read_records(out, i)]
    write_failures(out, records, given)
    summary = {
        **summarize(records),
        "parts": n_parts,
        "fingerprint": fp,
        "settings": output_settings(cfg),
        "opencv": cv2.__version__,
    }
    storage.write_text(storage.join(out, SUMMARY_NAME), json.dumps(summary, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    run_info = {
        "parts_written": len(todo), "parts_skipped": len(done), "workers": workers,
        "ray_address": raycluster.address_of(ray_address) or "local",
        "tasks_per_node": raycluster.count_nodes(nodes),
        "seconds": round(seconds, 3),
        "images_per_second": round(sum(size.values()) / seconds, 3) if seconds > 0 else 0.0,
        **{k: getattr(cfg, k) for k in SPEED_ONLY},
    }
    log.info("proposals run (not in summary.json): %s", json.dumps(run_info))
    return {**summary, "run": run_info}


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipeline.proposals", __doc__)
    p.add_argument("--images", required=True, help="images table (parquet): a path or URL (s3://...)")
    p.add_argument("--out", required=True, help="folder or URL prefix of the proposal parts, summary, failures")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-workers", type=int, help="local: CPUs for Ray (default: all usable); "
                                                   "cluster: tasks at once (default: its CPUs)")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'proposals' section from")
    args = p.parse_args(argv)
    if args.num_workers is not None and args.num_workers < 1:
        p.error("--num-workers must be >= 1")
    cli.setup_logging(args.log_level)
    cfg = load_section(ProposalsConfig, "proposals", args.params)
    try:
        s = run(args.images, args.out, cfg, num_workers=args.num_workers, ray_address=args.ray_address)
    except (storage.StorageError, FileNotFoundError, ConnectionError) as e:   # a Ray task's cause too; a bad --ray-address
        log.error("%s", getattr(e, "cause", None) or e)
        return 1
    b = s["boxes_per_image"]
    log.info("wrote proposals of %d images to %s: %d boxes (per image: mean %s, median %s, min %s, max %s); "
             "paths %s; failures %s; parts written %d, skipped %d; %s s", s["images"], args.out, s["boxes"],
             b["mean"], b["median"], b["min"], b["max"], s["paths"], s["failures"] or "none",
             s["run"]["parts_written"], s["run"]["parts_skipped"], s["run"]["seconds"])
    return 0


if __name__ == "__main__":
    # Run the function of the importable module, not of __main__: Ray ships `__main__`'s functions
    # by value (with the C library handle), and workers must return the importable modules' classes
    # (`pipeline.selective_search.ImageResult`).
    from pipeline.proposals import main as _main

    sys.exit(_main())
