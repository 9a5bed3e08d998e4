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

Outputs in `--out`:
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

A rerun skips finished parts. Parts of a different run (other settings, another images table) are
an error that names the fix, never mixed in.

Ray: local by default (`ray.init(num_cpus=--num-workers)`, all usable cores unless given), or the
cluster at `--ray-address` / `RAY_ADDRESS` (workers must reach the image paths; relative paths are
resolved against the working directory of the command), where `--num-workers` caps the tasks
running at once (default: the cluster's CPUs). One task = `images_per_task` images, one CPU, one
OpenCV thread; a task whose worker dies is retried `max_retries` times, then its images are retried
one by one, and an image that still kills its worker is listed as `worker_crashed`.
"""
from __future__ import annotations

import os

# Telemetry off, before Ray is imported. A new local cluster would otherwise switch on token
# authentication; a run against `--ray-address` uses whatever that cluster asks for.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_AUTH_MODE_DEFAULTED = "RAY_AUTH_MODE" not in os.environ and not os.environ.get("RAY_ADDRESS")
if _AUTH_MODE_DEFAULTED:
    os.environ["RAY_AUTH_MODE"] = "disabled"

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402
import ray  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline import contracts  # noqa: E402
from pipeline import images as image_io  # noqa: E402
from pipeline.files import atomic_path, write_text  # noqa: E402
from pipeline.images import ImageFailure, to_rgb  # noqa: E402,F401 - re-exported
from pipeline.params import as_dict, load_section  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProposalsConfig:
    """The `proposals` section of params.yaml (SoCo's values where SoCo has one)."""

    mode: Literal["fast", "quality"] = "fast"   # OpenCV's selective-search preset
    max_side: int = 500             # search on the image shrunk to this longest side (never enlarged)
    base_k: int = 150               # graph segmentation k of the first segmentation (OpenCV default)
    inc_k: int = 150                # k step between segmentations (fast: 3 values, quality: 5)
    sigma: float = 0.8              # graph segmentation Gaussian sigma (OpenCV default)
    min_side: float = 32.0          # SoCo: both box sides >= 32 px of the original image
    max_aspect: float = 3.0         # SoCo: w/h within [1/3, 3]
    scale_range: tuple[float, float] = (0.3, 0.8)   # SoCo: sqrt(box area / image area) in range
    nms_iou: float = 0.9            # drop a box whose IoU with a better-ranked kept box is above (1.0: off)
    max_boxes: int | None = None    # keep at most this many per image, best-ranked first (None: all)
    seed: int = 0                   # seed of the rank order (random, as OpenCV's; see selective_search)
    images_per_part: int = 256      # images per output part (the unit a rerun skips)
    images_per_task: int = 8        # images per Ray task (speed only, not the output)
    max_retries: int = 3            # retries of a task whose worker died (speed only)

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        problems = [
            msg for bad, msg in (
                (self.max_side < 1, "max_side must be >= 1"),
                (self.base_k <= 0 or self.inc_k < 0 or self.sigma < 0, "base_k > 0, inc_k >= 0, sigma >= 0"),
                (self.min_side < 0, "min_side must be >= 0"),
                (self.max_aspect < 1, "max_aspect must be >= 1 (w/h within [1/max_aspect, max_aspect])"),
                (not 0 <= lo <= hi, "scale_range must be [lo, hi] with 0 <= lo <= hi"),
                (not 0 < self.nms_iou <= 1, "nms_iou must be in (0, 1]"),
                (self.max_boxes is not None and self.max_boxes < 1, "max_boxes must be >= 1 or null"),
                (self.images_per_part < 1 or self.images_per_task < 1, "images_per_part/task must be >= 1"),
                (self.max_retries < 0, "max_retries must be >= 0"),
            ) if bad
        ]
        if problems:
            raise ValueError(f"proposals settings: {'; '.join(problems)}")


# The rules an image's boxes passed, strictest first (SoCo's fallback order), and the last resort.
PATHS = ("all_rules", "without_scale_rule", "min_side_rule_only", "whole_image")
FAILED = "failed"
FAILURE_REASONS = image_io.FAILURE_REASONS + (   # the decoding failures (pipeline.images), and:
    "search_error",     # OpenCV raised on this image
    "worker_crashed",   # the image killed its worker process on every retry
)
FAILURES_SCHEMA = pa.schema([("key", pa.string()), ("path", pa.string()),
                             ("reason", pa.string()), ("detail", pa.string())])

# ------------------------------------------------------------------------ pure compute, one image


@dataclass
class ImageResult:
    """What one image gave: boxes (Nx4 float32 x1,y1,x2,y2 in original pixels, rank order), the
    path it took (PATHS, or FAILED with a reason), and what decoding noticed."""

    key: str
    boxes: np.ndarray
    path: str
    reason: str = ""
    detail: str = ""
    notes: dict = field(default_factory=dict)   # mode (if not RGB), exif_orientation (if not 1), resized

    def record(self) -> dict:
        return {"key": self.key, "path": self.path, "boxes": int(len(self.boxes)),
                "reason": self.reason, "detail": self.detail, **self.notes}


def decode(path: str | Path, width: int, height: int) -> tuple[np.ndarray, dict]:
    """Decode `path` by the shared policy (`pipeline.images`: stored pixel frame, no EXIF transpose)
    to HxWx3 uint8 RGB, checking its size against the table's. Returns (rgb, notes); raises ImageFailure."""
    return image_io.decode(path, width, height)


def search_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) the search runs at: the image shrunk to `max_side`, never enlarged."""
    s = max_side / max(width, height)
    if s >= 1:
        return width, height
    return max(1, round(width * s)), max(1, round(height * s))


def selective_search(bgr: np.ndarray, cfg: ProposalsConfig) -> np.ndarray:
    """OpenCV selective search on a BGR uint8 image: Nx4 int (x, y, w, h), distinct, in rank order.

    The rank is a random order fixed by `cfg.seed` and the set of boxes alone. OpenCV's own order
    (rand() x hierarchy level) cannot be reproduced in a Ray worker: C rand() is one state per
    process and Ray's threads draw from it too (`_raylet.so` calls rand/srand), so the same image
    came out in different orders. The set of boxes does not depend on it."""
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if cfg.mode == "fast":
        ss.switchToSelectiveSearchFast(cfg.base_k, cfg.inc_k, cfg.sigma)
    else:
        ss.switchToSelectiveSearchQuality(cfg.base_k, cfg.inc_k, cfg.sigma)
    rects = np.asarray(ss.process(), dtype=np.int64).reshape(-1, 4)
    canonical = rects[np.lexsort(rects.T[::-1])]                 # by x, then y, w, h
    return canonical[np.random.default_rng(cfg.seed).permutation(len(canonical))]


def rule_mask(boxes: np.ndarray, width: int, height: int, cfg: ProposalsConfig,
              scale_rule: bool = True, aspect_rule: bool = True) -> np.ndarray:
    """Boxes (Nx4 x1,y1,x2,y2 original pixels) that pass SoCo's rules: min side, aspect, scale."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    keep = (w >= cfg.min_side) & (h >= cfg.min_side)
    if aspect_rule:
        ratio = w / np.maximum(h, 1e-9)
        keep &= (ratio >= 1.0 / cfg.max_aspect) & (ratio <= cfg.max_aspect)
    if scale_rule:
        scale = np.sqrt(w * h / float(width * height))
        keep &= (scale >= cfg.scale_range[0]) & (scale <= cfg.scale_range[1])
    return keep


def nms(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Greedy near-duplicate removal in the given (rank) order: indices of the kept boxes."""
    if iou >= 1.0 or len(boxes) < 2:
        return np.arange(len(boxes))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept: list[int] = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        kept.append(i)
        rest = np.arange(i + 1, len(boxes))
        rest = rest[~suppressed[rest]]
        if not len(rest):
            break
        iw = np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0])
        ih = np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1])
        inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
        suppressed[rest[inter / (area[i] + area[rest] - inter) > iou]] = True
    return np.asarray(kept, dtype=np.int64)


def select_boxes(boxes: np.ndarray, width: int, height: int, cfg: ProposalsConfig) -> tuple[np.ndarray, str]:
    """The filtered boxes of one image and the path (PATHS) that gave them.

    `boxes`: Nx4 x1,y1,x2,y2 in original pixels, in selective-search rank order. The first rule set
    that leaves a box wins (all rules; without the scale rule; the min-side rule alone), then
    near-duplicates go and the cap applies; with no box left at all, the whole image is the box."""
    levels = ((PATHS[0], True, True), (PATHS[1], False, True), (PATHS[2], False, False))
    for path, scale_rule, aspect_rule in levels:
        kept = boxes[rule_mask(boxes, width, height, cfg, scale_rule, aspect_rule)]
        if len(kept):
            kept = kept[nms(kept, cfg.nms_iou)]
            return (kept[: cfg.max_boxes] if cfg.max_boxes else kept), path
    return np.array([[0, 0, width, height]], dtype=np.float32), PATHS[3]


def propose(rgb: np.ndarray, cfg: ProposalsConfig) -> tuple[np.ndarray, str, bool]:
    """Proposals of one decoded HxWx3 RGB image: (Nx4 float32 boxes in its pixels, path, resized)."""
    height, width = rgb.shape[:2]
    sw, sh = search_size(width, height, cfg.max_side)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    if (sw, sh) != (width, height):
        bgr = cv2.resize(bgr, (sw, sh), interpolation=cv2.INTER_AREA)
    rects = selective_search(bgr, cfg)                          # Nx4 (x, y, w, h), search pixels
    sx, sy = width / sw, height / sh
    boxes = np.stack([rects[:, 0] * sx, rects[:, 1] * sy,
                      (rects[:, 0] + rects[:, 2]) * sx, (rects[:, 1] + rects[:, 3]) * sy], axis=1)
    boxes = np.minimum(boxes, [width, height, width, height])   # Nx4 x1,y1,x2,y2, original pixels
    kept, path = select_boxes(boxes, width, height, cfg)
    return kept.astype(np.float32), path, (sw, sh) != (width, height)


def propose_file(key: str, path: str, width: int, height: int, cfg: ProposalsConfig) -> ImageResult:
    """Decode and propose one image file; a bad image gives a failed result, never an exception."""
    try:
        rgb, notes = decode(path, width, height)
        try:
            boxes, taken, resized = propose(rgb, cfg)
        except cv2.error as e:
            raise ImageFailure("search_error", str(e).strip()) from None
        if resized:
            notes["resized"] = True
        return ImageResult(key, boxes, taken, notes=notes)
    except ImageFailure as f:
        return ImageResult(key, np.zeros((0, 4), np.float32), FAILED, f.reason, f.detail)


# ------------------------------------------------------------------------------ Ray and the disk


@ray.remote(num_cpus=1)
def _propose_task(rows: list[tuple[str, str, int, int]], cfg: ProposalsConfig) -> list[ImageResult]:
    """A Ray task: the images `rows` (key, absolute path, width, height), one OpenCV thread."""
    cv2.setNumThreads(1)   # Ray runs one task per core; OpenCV's own threads would oversubscribe
    return [propose_file(*row, cfg) for row in rows]


def part_name(index: int) -> str:
    return f"part-{index:05d}"


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
    """What a finished part depends on: the output settings, the part size, OpenCV, the images."""
    settings = output_settings(cfg)
    h = hashlib.sha256(json.dumps({"settings": settings, "opencv": cv2.__version__, "decode": image_io.POLICY},
                                  sort_keys=True).encode())
    for col in ("key", "path", "width", "height"):
        h.update(json.dumps(images.column(col).to_pylist()).encode())
    return h.hexdigest()[:16]


_OUR_TMP = re.compile(r"^\.(part-\d{5}\.(parquet|json)|summary\.json|failures\.csv)\.tmp-[0-9a-f]{8}$")


def finished_parts(out: Path, n_parts: int, fp: str) -> set[int]:
    """Parts of `out` a previous run finished, after checking they belong to this run. Temporary
    files a killed run left behind are removed."""
    for f in out.iterdir():
        if _OUR_TMP.match(f.name):
            f.unlink()
    done = set()
    for f in sorted(out.glob("part-*.parquet")):
        m = re.fullmatch(r"part-(\d{5})\.parquet", f.name)
        side = f.with_suffix(".json")
        theirs = json.loads(side.read_text()).get("fingerprint") if side.is_file() else None
        if m is None or int(m.group(1)) >= n_parts or theirs != fp:
            raise RuntimeError(
                f"{out} holds {f.name} from a different run (other settings or images table: "
                f"fingerprint {theirs}, this run {fp}). Delete {out} or pass another --out.")
        done.add(int(m.group(1)))
    return done


def write_part(out: Path, index: int, results: list[ImageResult], fp: str) -> None:
    """Sidecar first, the parquet last: the part is finished once its parquet exists."""
    side = {"fingerprint": fp, "images": [r.record() for r in results]}
    write_text(out / f"{part_name(index)}.json", json.dumps(side) + "\n")
    contracts.write_table(results_table(results), out / f"{part_name(index)}.parquet", contracts.PROPOSALS)


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


def write_failures(out: Path, records: list[dict], paths: dict[str, str]) -> None:
    bad = [r for r in records if r["path"] == FAILED]
    table = pa.table({"key": [r["key"] for r in bad], "path": [paths[r["key"]] for r in bad],
                      "reason": [r["reason"] for r in bad], "detail": [r["detail"] for r in bad]},
                     schema=FAILURES_SCHEMA)
    with atomic_path(out / "failures.csv") as tmp:
        pacsv.write_csv(table, str(tmp))


def _start_ray(address: str | None, num_workers: int | None) -> bool:
    """Start or join Ray unless a caller already did; True if this call started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        if _AUTH_MODE_DEFAULTED and os.environ.get("RAY_AUTH_MODE") == "disabled":
            del os.environ["RAY_AUTH_MODE"]   # the cluster decides whether it wants a token
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=num_workers or len(os.sched_getaffinity(0)),
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    return True


def _as_given(result: ImageResult, absolute: str, given: str) -> ImageResult:
    """`result` with its failure detail naming the file as the images table does: a decoder's
    message holds the absolute path the worker opened, which depends on the working folder."""
    if absolute != given and absolute in result.detail:
        return dataclasses.replace(result, detail=result.detail.replace(absolute, given))
    return result


def _run_parts(rows: list[tuple], todo: list[int], size: dict[int, int], out: Path, cfg: ProposalsConfig,
               fp: str, workers: int, progress: bool, given: dict[str, str]) -> None:
    """Propose the images of parts `todo` on Ray, `workers` tasks at a time; write each part as
    soon as its last task is back. `given`: key -> the path as the images table writes it."""
    task = _propose_task.options(max_retries=cfg.max_retries, retry_exceptions=False)
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
                got = ray.get(ready[0])
            except ray.exceptions.RayTaskError:         # our code raised: a bug, not a bad image
                raise
            except ray.exceptions.RayError as e:         # the worker died on every retry
                if len(chunk) > 1:                      # find the image that kills it: one by one
                    queue.extendleft(reversed([(p, s + i, [row]) for i, row in enumerate(chunk)]))
                    continue
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                got = [ImageResult(chunk[0][0], np.zeros((0, 4), np.float32), FAILED, "worker_crashed", msg)]
            got = [_as_given(r, row[1], given[row[0]]) for r, row in zip(got, chunk)]
            results[p].update({s + i: r for i, r in enumerate(got)})
            bar.update(len(got))
            if len(results[p]) == size[p]:
                write_part(out, p, [results[p].pop(i) for i in sorted(results[p])], fp)


def run(images_path: Path, out: Path, cfg: ProposalsConfig, *, num_workers: int | None = None,
        ray_address: str | None = None, progress: bool = True) -> dict:
    """The whole stage; returns the summary written to `out/summary.json`, plus, under `"run"`,
    what varies between runs and is only logged: parts written and skipped, workers, Ray address,
    seconds.

    Uses the Ray runtime the caller started, if any; otherwise starts a local one (or joins
    `ray_address` / RAY_ADDRESS) and shuts it down at the end."""
    t0 = time.perf_counter()
    images = contracts.read_table(images_path, contracts.IMAGES)
    fp = fingerprint(images, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_parts = -(-images.num_rows // cfg.images_per_part)
    done = finished_parts(out, n_parts, fp)
    keys, table_paths = images.column("key").to_pylist(), images.column("path").to_pylist()
    rows = list(zip(keys, [str(Path(p).absolute()) for p in table_paths],
                    images.column("width").to_pylist(), images.column("height").to_pylist()))
    todo = [i for i in range(n_parts) if i not in done]

    size = {p: min((p + 1) * cfg.images_per_part, len(rows)) - p * cfg.images_per_part for p in todo}
    workers = 0
    if todo:
        started = _start_ray(ray_address, num_workers)
        try:
            workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            _run_parts(rows, todo, size, out, cfg, fp, workers, progress, dict(zip(keys, table_paths)))
        finally:
            if started:
                ray.shutdown()

    records = [r for i in range(n_parts)
               for r in json.loads((out / f"{part_name(i)}.json").read_text())["images"]]
    write_failures(out, records, dict(zip(keys, table_paths)))
    summary = {
        **summarize(records),
        "parts": n_parts,
        "fingerprint": fp,
        "settings": output_settings(cfg),
        "opencv": cv2.__version__,
    }
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    run_info = {
        "parts_written": len(todo), "parts_skipped": len(done), "workers": workers,
        "ray_address": ray_address or os.environ.get("RAY_ADDRESS") or "local",
        "seconds": round(seconds, 3),
        "images_per_second": round(sum(size.values()) / seconds, 3) if seconds > 0 else 0.0,
        **{k: getattr(cfg, k) for k in SPEED_ONLY},
    }
    log.info("proposals run (not in summary.json): %s", json.dumps(run_info))
    return {**summary, "run": run_info}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.proposals", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, type=Path, help="images table (parquet)")
    p.add_argument("--out", required=True, type=Path, help="folder of proposal parts, summary, failures")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--num-workers", type=int, help="local: CPUs for Ray (default: all usable); "
                                                   "cluster: tasks at once (default: its CPUs)")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'proposals' section from")
    args = p.parse_args(argv)
    if args.num_workers is not None and args.num_workers < 1:
        p.error("--num-workers must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_section(ProposalsConfig, "proposals", args.params)
    s = run(args.images, args.out, cfg, num_workers=args.num_workers, ray_address=args.ray_address)
    b = s["boxes_per_image"]
    print(f"{s['images']} images, {s['boxes']} boxes (per image: mean {b['mean']}, median {b['median']}, "
          f"min {b['min']}, max {b['max']}); paths {s['paths']}; failures {s['failures'] or 'none'}; "
          f"parts written {s['run']['parts_written']}, skipped {s['run']['parts_skipped']}; {s['run']['seconds']} s")
    return 0


if __name__ == "__main__":
    # Run the function of the importable module, not of __main__: Ray ships `__main__`'s functions
    # by value (with the C library handle), and workers must return `pipeline.proposals` classes.
    from pipeline.proposals import main as _main

    sys.exit(_main())
