"""The paper's views of one image and its proposals (section 4, "Views construction").

- x1: the whole image resized to 224x224;
- x2: a RandomResizedCrop of the image, scale [0.4, 1], resized to 224x224;
- x2-s: x2 downsampled to 112x112 (scale invariance).
Each view is flipped horizontally at random (independently for x1 and x2; x2-s follows x2) and
colour-augmented asymmetrically as in SoCo's C4 recipe (BYOL-style): both views get colour jitter
(0.4, 0.4, 0.2, 0.1) with p=0.8 and grayscale with p=0.2; x1 is always blurred, x2 with p=0.1 and
solarized with p=0.2. (Hue is rotated in YIQ rather than shifted in HSV, so the jitter is one
affine pass; see `jitter_matrix`.)

Every proposal is mapped into each view. A proposal takes part when its intersection with the x2
crop keeps at least `min_visible` of its area and is at least `min_box_size` pixels wide and high
in both 224 views; the *intersection* is used in both views, so the two boxes of a pair cover the
same pixels of the image. K of them (SoCo's C4 setting: 4) are drawn at random; when fewer exist
the rest are padding with `valid = False`. An image without any usable proposal falls back to the
whole-image box, restricted to what x2 shows (the crop itself), which is always visible in both.
The paper says only that the proposals are used in both views; this selection rule (the visible
share, the minimum side, the intersection in both views) is ours.

Pure functions of (image, proposals, numpy Generator): the colour operations are written out with
OpenCV/numpy so that every random draw comes from the one Generator (deterministic per sample).
Images are uint8 HxWx3 RGB; boxes are float32 (x1, y1, x2, y2) in pixels of their view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from pipeline import images as image_io


@dataclass(frozen=True)
class ColourConfig:
    """Colour augmentation of one view (torchvision semantics, SoCo's values)."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)   # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)   # pixels of a 224 px view, scaled to the view's size
    solarize_p: float = 0.0


BLUR_REFERENCE_SIZE = 224
"""BYOL (appendix B) gives the blur sigma (0.1-2.0 px, kernel 23 px) for 224 px views, and SoCo
follows it; the paper is silent on the blur. Scaling the sigma by size / 224 at other view sizes is
our choice, so that the blur removes the same share of the image's detail: 2 px on a 64 px view
would blur like 7 px at 224, wiping out the texture the miniature's classes are made of."""


@dataclass(frozen=True)
class ViewConfig:
    """The `views` settings: geometry of x1/x2/x2-s, proposal selection, colour per view."""

    size: int = 224
    small_size: int = 112
    crop_scale: tuple[float, float] = (0.4, 1.0)         # paper: RandomResizedCrop scale [0.4, 1]
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)  # torchvision's default
    flip_p: float = 0.5
    num_proposals: int = 4                               # K; SoCo C4 (select_k 4)
    min_visible: float = 0.5
    min_box_size: float = 8.0
    colour1: ColourConfig = field(default_factory=ColourConfig)   # x1: blur always
    colour2: ColourConfig = field(default_factory=lambda: ColourConfig(blur_p=0.1, solarize_p=0.2))  # x2


# ----------------------------------------------------------------------------------- geometry


def random_resized_crop(rng: np.random.Generator, width: int, height: int,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters: (x0, y0, w, h) in pixels of the image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the largest centred crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def boxes_to_view(boxes: np.ndarray, crop: tuple[float, float, float, float], out_w: float, out_h: float,
                  flip: bool) -> np.ndarray:
    """Map (n, 4) image boxes into a view made by cropping `crop` = (x0, y0, w, h), resizing to
    (out_w, out_h) and, if `flip`, mirroring horizontally."""
    x0, y0, w, h = crop
    sx, sy = out_w / w, out_h / h
    out = np.empty_like(boxes, dtype=np.float32)
    out[:, 0] = (boxes[:, 0] - x0) * sx
    out[:, 2] = (boxes[:, 2] - x0) * sx
    out[:, 1] = (boxes[:, 1] - y0) * sy
    out[:, 3] = (boxes[:, 3] - y0) * sy
    if flip:
        out[:, [0, 2]] = out_w - out[:, [2, 0]]
    return out


def select_proposals(rng: np.random.Generator, proposals: np.ndarray, crop: tuple[float, float, float, float],
                     width: int, height: int, cfg: ViewConfig) -> tuple[np.ndarray, int]:
    """K proposals visible in both views, as image boxes cut to the crop: ((K, 4), n_valid).

    Falls back to the crop itself (the whole image as far as x2 shows it) when none qualifies.
    """
    x0, y0, w, h = crop
    k = cfg.num_proposals
    out = np.zeros((k, 4), np.float32)
    inter = np.empty((0, 4), np.float32)
    if len(proposals):
        p = np.asarray(proposals, np.float32)
        inter = np.stack([np.maximum(p[:, 0], x0), np.maximum(p[:, 1], y0),
                          np.minimum(p[:, 2], x0 + w), np.minimum(p[:, 3], y0 + h)], axis=1)
        iw, ih = inter[:, 2] - inter[:, 0], inter[:, 3] - inter[:, 1]
        area = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
        # smallest side in pixels of either 224 view (x1 scales the image, x2 the crop)
        s1 = np.minimum(iw * cfg.size / width, ih * cfg.size / height)
        s2 = np.minimum(iw * cfg.size / w, ih * cfg.size / h)
        ok = (iw > 0) & (ih > 0) & (iw * ih >= cfg.min_visible * area) & (np.minimum(s1, s2) >= cfg.min_box_size)
        inter = inter[ok]
    if len(inter) == 0:
        out[0] = (x0, y0, x0 + w, y0 + h)
        return out, 1
    n = min(k, len(inter))
    out[:n] = inter[rng.choice(len(inter), size=n, replace=False)]
    return out, n


# ------------------------------------------------------------------------------------- colour


GRAY = np.array([0.299, 0.587, 0.114], np.float32)   # ITU-R 601 luma, as torchvision and OpenCV
EYE = np.eye(3, dtype=np.float32)
TO_GRAY = np.tile(GRAY, (3, 1))                       # x -> (grey, grey, grey)
# YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
YIQ2RGB = np.linalg.inv(RGB2YIQ).astype(np.float32)
SOLARIZE = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)).astype(np.uint8)


def jitter_matrix(rng: np.random.Generator, strengths: tuple[float, float, float, float],
                  mean_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour jitter as one affine map x -> A x + b on RGB pixel values.

    torchvision's four operations, in a random order: brightness (scale), contrast (blend with the
    image's mean grey), saturation (blend with the pixel's grey) and hue (here a rotation of the
    YIQ chroma plane by up to hue * 360 degrees, as NVIDIA DALI does, instead of torchvision's HSV
    shift; both turn hues around the grey axis, and this one is linear, so the whole jitter is one
    pass over the image). The contrast mean is that of the image as transformed so far.
    """
    b, c, s, h = strengths
    A, off = EYE.copy(), np.zeros(3, np.float32)
    for op in rng.permutation(4):
        if op == 0 and b > 0:
            f = rng.uniform(1 - b, 1 + b)
            A, off = f * A, f * off
        elif op == 1 and c > 0:
            f = rng.uniform(1 - c, 1 + c)
            grey = float(GRAY @ (A @ mean_rgb + off))
            A, off = f * A, f * off + (1 - f) * grey
        elif op == 2 and s > 0:
            f = rng.uniform(1 - s, 1 + s)
            M = f * EYE + (1 - f) * TO_GRAY
            A, off = M @ A, M @ off
        elif op == 3 and h > 0:
            t = rng.uniform(-h, h) * 2 * math.pi
            R = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]], np.float32)
            M = YIQ2RGB @ R @ RGB2YIQ
            A, off = M @ A, M @ off
    return A, off


def colour_augment(img: np.ndarray, rng: np.random.Generator, cfg: ColourConfig) -> np.ndarray:
    """SoCo/BYOL colour augmentation of a uint8 RGB image, every draw from `rng`.

    Jitter (p = jitter_p) and grayscale (p = grayscale_p) are affine maps of the pixel values, so
    they are composed and applied in one uint8 pass (cv2.transform, clipped once at the end rather
    than after each operation); then Gaussian blur (`blur_sigma` in pixels of a 224 px view, scaled
to this image's width, see `BLUR_REFERENCE_SIZE`) and solarization.
    """
    x = img
    A, off, affine = EYE, np.zeros(3, np.float32), False
    if rng.random() < cfg.jitter_p:
        A, off = jitter_matrix(rng, cfg.jitter, np.asarray(cv2.mean(x)[:3], np.float32))
        affine = True
    if rng.random() < cfg.grayscale_p:
        A, off = TO_GRAY @ A, TO_GRAY @ off
        affine = True
    if affine:
        x = cv2.transform(x, np.concatenate([A, off[:, None]], axis=1))
    if rng.random() < cfg.blur_p:
        sigma = rng.uniform(*cfg.blur_sigma) * x.shape[1] / BLUR_REFERENCE_SIZE
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma)
    if rng.random() < cfg.solarize_p:
        x = SOLARIZE[x]
    return x


# -------------------------------------------------------------------------------------- views


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bilinear, or area averaging when shrinking by more than 2x (where bilinear would alias)."""
    strong_shrink = img.shape[1] > 2 * w or img.shape[0] > 2 * h
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if strong_shrink else cv2.INTER_LINEAR)


def decode_for_views(im: Image.Image, crop: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Decode `im` (opened, not yet decoded) at the smallest JPEG scale that still gives x1 and
    the x2 crop at least `size` pixels a side (PIL draft: 1/2, 1/4, 1/8 DCT scaling)."""
    width, height = im.size
    _, _, w, h = crop
    f = min(1.0, max(size / width, size / height, size / w, size / h))
    if f < 1.0 and im.format == "JPEG":
        im.draft("RGB", (math.ceil(width * f), math.ceil(height * f)))
    return image_io.to_rgb(im)


def make_views(im: Image.Image, proposals: np.ndarray, rng: np.random.Generator, cfg: ViewConfig) -> dict:
    """x1, x2, x2-s (uint8 HxWx3) and the K selected proposals mapped into each, for one image.

    `proposals` are (n, 4) boxes in pixels of the stored image (`im.size`), best first.
    """
    width, height = im.size
    crop = random_resized_crop(rng, width, height, cfg.crop_scale, cfg.crop_ratio)
    flip1, flip2 = rng.random() < cfg.flip_p, rng.random() < cfg.flip_p
    boxes, n = select_proposals(rng, proposals, crop, width, height, cfg)

    arr = decode_for_views(im, crop, cfg.size)
    sx, sy = arr.shape[1] / width, arr.shape[0] / height
    # The crop in decoded pixels, and back in image pixels exactly as it was cut.
    cx0, cy0 = int(round(crop[0] * sx)), int(round(crop[1] * sy))
    cx1 = max(cx0 + 1, int(round((crop[0] + crop[2]) * sx)))
    cy1 = max(cy0 + 1, int(round((crop[1] + crop[3]) * sy)))
    cut = (cx0 / sx, cy0 / sy, (cx1 - cx0) / sx, (cy1 - cy0) / sy)

    x1 = _resize(arr, cfg.size, cfg.size)
    x2 = _resize(arr[cy0:cy1, cx0:cx1], cfg.size, cfg.size)
    if flip1:
        x1 = cv2.flip(x1, 1)
    if flip2:
        x2 = cv2.flip(x2, 1)
    x1 = colour_augment(x1, rng, cfg.colour1)
    x2 = colour_augment(x2, rng, cfg.colour2)
    x2s = cv2.resize(x2, (cfg.small_size, cfg.small_size), interpolation=cv2.INTER_AREA)

    boxes1 = boxes_to_view(boxes, (0.0, 0.0, float(width), float(height)), cfg.size, cfg.size, flip1)
    boxes2 = boxes_to_view(boxes, cut, cfg.size, cfg.size, flip2)
    # Clip the sub-pixel overshoot that the crop's rounding can leave.
    np.clip(boxes2, 0, cfg.size, out=boxes2)
    valid = np.zeros(cfg.num_proposals, dtype=bool)
    valid[:n] = True
    boxes1[~valid] = 0
    boxes2[~valid] = 0
    return {
        "x1": x1, "x2": x2, "x2s": x2s,
        "boxes1": boxes1, "boxes2": boxes2, "boxes2s": boxes2 * (cfg.small_size / cfg.size),
        "valid": valid,
    }
