"""The per-image compute of the proposals stage (pipeline.proposals): selective search on one
decoded image, SoCo's box filters with their fallback order, near-duplicate removal, and the
settings (`ProposalsConfig`, the `proposals` section of params.yaml). Pure functions of an image
and the settings: no Ray, no output files.

- SoCo's filters (strategy `ratio3size0308`): both sides >= `min_side` px, aspect ratio w/h in
  [1/`max_aspect`, `max_aspect`], sqrt(box area / image area) in `scale_range`; an image left with
  no box drops the size rule, then keeps only the min-side rule (`PATHS`), and the whole-image box
  is the last resort.
- OpenCV's selective search (`cv2.ximgproc.segmentation`, "fast" or "quality" preset), run on the
  image shrunk to `max_side` (never enlarged), boxes mapped back to original pixels; the rank order
  is a random order of the distinct boxes fixed by `seed` (see `selective_search`).
- Images are decoded by `pipeline.images.decode` in the stored pixel frame (no EXIF transpose);
  a bad image is a failed `ImageResult` with a reason, never an exception.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from pipeline import images as image_io
from pipeline.images import ImageFailure

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
    sha256: str = ""                            # of the bytes searched ("" if the file could not be read)

    def record(self) -> dict:
        return {"key": self.key, "path": self.path, "boxes": int(len(self.boxes)),
                "reason": self.reason, "detail": self.detail, "sha256": self.sha256, **self.notes}


def decode(path: str | Path | bytes, width: int, height: int) -> tuple[np.ndarray, dict]:
    """Decode `path` (or its bytes) by the shared policy (`pipeline.images`: stored pixel frame, no EXIF transpose)
    to HxWx3 uint8 RGB, checking its size against the table's. Returns (rgb, notes); raises ImageFailure."""
    return image_io.decode(path, width, height)


def search_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) the search runs at: the image shrunk to `max_side`, never enlarged."""
    s = max_side / max(width, height)
    if s >= 1:
        return width, height
    return max(1, round(width * s)), max(1, round(height * s))


def opencv_release() -> str:
    """The installed OpenCV wheel's version ("4.14.0.94"; pyproject.toml pins the plain and the contrib
    build to the same one), else cv2's own with a wildcard for the wheel's build number."""
    from importlib import metadata

    for dist in ("opencv-contrib-python-headless", "opencv-python-headless", "opencv-python"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return cv2.__version__ + ".*"


def check_opencv() -> None:
    """Raise a RuntimeError naming the fix when this process's OpenCV has no selective search (the
    contrib build's `cv2.ximgproc`): every image would fail, so the job must not start."""
    if not hasattr(cv2, "ximgproc"):
        raise RuntimeError(
            f"OpenCV {cv2.__version__} ({cv2.__file__}) has no cv2.ximgproc, so no selective search: pip install "
            f"--no-deps --force-reinstall opencv-contrib-python-headless=={opencv_release()} (fiftyone pulls "
            "opencv-python-headless, which owns the same cv2 without the contrib modules)")


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
    """Decode and propose one image file; a bad image gives a failed result, never an exception.
    The result carries the sha256 of the bytes it read (a rerun reuses it only for the same bytes)."""
    digest = ""
    try:
        data = image_io.read_bytes(path)
        digest = image_io.sha256_bytes(data)
        rgb, notes = decode(data, width, height)
        try:
            boxes, taken, resized = propose(rgb, cfg)
        except cv2.error as e:
            raise ImageFailure("search_error", str(e).strip()) from None
        if resized:
            notes["resized"] = True
        return ImageResult(key, boxes, taken, notes=notes, sha256=digest)
    except ImageFailure as f:
        return ImageResult(key, np.zeros((0, 4), np.float32), FAILED, f.reason, f.detail, sha256=digest)
