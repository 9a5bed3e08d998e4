"""The embedded default data: procedural multi-object scenes in the real COCO 2017 and OpenImages V6
on-disk layouts, so that every later stage runs its real loading code on them.

    python -m pipeline.synth --out data/synth --images 2000 --seed 0 [--params params.yaml] [--workers N]

Writes, under `--out`:

    coco/annotations/instances_train2017.json   COCO 2017 instances format: the 80 real categories,
    coco/annotations/instances_val2017.json     images, annotations (bbox [x, y, w, h], area,
    coco/train2017/000000xxxxxx.jpg             iscrowd, polygon segmentation of the visible part)
    coco/val2017/000000xxxxxx.jpg
    openimages/oidv6-train-annotations-bbox.csv official V6 header, normalised coordinates
    openimages/class-descriptions-boxable.csv   the 601 real classes (MID, display name)
    openimages/train/<16-hex ImageID>.jpg
    synth_card.json                             settings, counts per split and class

The scenes: 3 to 15 objects per image over real photo backgrounds (scikit-image, scikit-learn) or
procedural textures. Each object class (`data_manifests/synth_classes.csv`) is a real COCO
category and/or real OpenImages MIDs (people are labelled Person, Man, Woman, Boy or Girl, as in
OpenImages).

What makes a class is what survives the SSL augmentations (colour jitter, grey-scale, blur,
64 px views), as for real categories: its silhouette (shape family and aspect) and its two-tone
texture pattern (stripes, checker, dots, rings or grid, at a class-specific frequency of 2 to 4
periods across the object and a class-specific orientation). No two classes share a (shape,
texture) combination, and the 16 COCO classes have 16 different shapes: the silhouette tells
them apart, the pattern is a second cue (for a half-hidden object, say). Colour is a
per-instance nuisance, drawn independently of the class: any hue of `HUES` (jittered), as a
dark shade and a light tint whose brightness contrast keeps the pattern visible in grey; every
pattern covers about half the object with each tone, so even the mean colour of an object says
nothing about its class. Scale, position, rotation (within the class's limit), aspect jitter,
shading, background, occlusion and truncation are per-instance too.

Class frequencies are long-tailed (Zipf), with a different order in the OpenImages pool than in
COCO, so that COCO-matched sampling (OpenImage-MINI) has real work to do; OpenImages also carries
classes COCO lacks, images without any COCO class, and group-of boxes (IsGroupOf=1).

Everything is a function of (seed, split, image index): the same seed gives the same bytes, for
any number of workers.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.categories import MANIFESTS, OPENIMAGES_CLASSES_CSV, coco_categories
from pipeline.files import atomic_dir
from pipeline.params import as_dict, load_section, override
from pipeline.readers import OPENIMAGES_HEADER

SYNTH_CLASSES_CSV = MANIFESTS / "synth_classes.csv"
SPLITS = ("openimages_train", "coco_train2017", "coco_val2017")
HUES = {"red": 0.0, "orange": 28.0, "yellow": 55.0, "green": 115.0,
        "cyan": 180.0, "blue": 220.0, "purple": 275.0, "pink": 325.0}
SHAPES = ("ellipse", "rectangle", "triangle", "hexagon", "cross", "crescent", "arrow", "heart",
          "lshape", "diamond", "blob", "star", "ring", "tshape", "ushape", "hourglass")
# Two-tone patterns, each covering about half of the object with either tone, so that the mean
# colour of an object says nothing about its texture.
TEXTURES = ("stripes", "checker", "dots", "rings", "grid")
TEXTURE_FREQ = (1.5, 5.0)     # allowed pattern periods across an object (sqrt of its area)


@dataclass(frozen=True)
class SynthConfig:
    """Settings of the `synth` section of params.yaml (defaults give the embedded default set)."""

    images: int = 2000                        # images over all three splits
    seed: int = 0
    # Share of images per split: OpenImages train pool, COCO train2017, COCO val2017.
    split_fractions: tuple[float, float, float] = (0.55, 0.30, 0.15)
    # (width, height) choices; small so the whole pipeline runs on 2 CPU cores in minutes.
    image_sizes: tuple[tuple[int, int], ...] = ((320, 240), (240, 320), (320, 320), (320, 256), (256, 320))
    objects_per_image: tuple[int, int] = (3, 15)
    # Objects beyond the minimum are Poisson with these means: COCO ~7 objects per image, the
    # OpenImages pool more (OpenImage-MINI has 9.1 per image against COCO's 7.4, paper Table 2).
    extra_objects_coco: float = 4.0
    extra_objects_openimages: float = 6.0
    object_scale: tuple[float, float] = (0.14, 0.45)   # sqrt(object area) / shorter image side, log-uniform
    zipf_exponent: float = 0.9                # class frequency ~ rank ** -zipf_exponent
    max_occlusion: float = 0.5                # no object loses more than this share to later ones
    max_truncation: float = 0.3               # share of an object allowed outside the image
    photo_background: float = 0.6             # else a procedural texture
    group_of_probability: float = 0.5         # OpenImages: >= 3 instances of a class -> one IsGroupOf box
    # Share of OpenImages images drawn from non-COCO classes only (trees, buildings, ...), which
    # criterion 1 of the OpenImage-MINI sampling must leave out.
    openimages_without_coco: float = 0.1
    hue_jitter: float = 12.0                  # degrees, per instance, around a hue drawn from HUES
    jpeg_quality: int = 90

    def split_sizes(self) -> dict[str, int]:
        if self.images < len(SPLITS):
            raise ValueError(f"synth.images must be at least {len(SPLITS)}, got {self.images}")
        fr = np.asarray(self.split_fractions, dtype=float)
        if (fr <= 0).any() or abs(fr.sum() - 1) > 1e-6:
            raise ValueError(f"synth.split_fractions must be positive and sum to 1, got {self.split_fractions}")
        sizes = np.maximum(1, np.floor(fr * self.images).astype(int))
        sizes[0] += self.images - sizes.sum()
        return dict(zip(SPLITS, sizes.tolist()))


@dataclass(frozen=True)
class SynthClass:
    name: str
    coco_id: int | None
    openimages: tuple[tuple[str, float], ...]   # (MID, weight)
    shape: str
    texture: str
    texture_freq: float     # pattern periods across the object (sqrt of its area)
    texture_angle: float    # pattern orientation in the object's frame, degrees
    aspect: float
    max_rotation: float
    coco_rank: int | None
    openimages_rank: int | None


def load_classes(path: str | Path = SYNTH_CLASSES_CSV) -> list[SynthClass]:
    """The synthetic classes; validates shapes, textures and COCO ids, and that no two classes
    share a (shape, texture) combination."""
    path = Path(path)
    coco_ids = {c.id for c in coco_categories()}
    out = []
    seen: dict[tuple[str, str], str] = {}
    with path.open(newline="") as f:
        for line, r in enumerate(csv.DictReader(f), start=2):
            where = f"{path}, line {line}"
            mids = tuple((m.split(":")[0], float(m.split(":")[1])) for m in r["openimages_labels"].split())
            c = SynthClass(
                name=r["name"],
                coco_id=int(r["coco_id"]) if r["coco_id"] else None,
                openimages=mids,
                shape=r["shape"], texture=r["texture"],
                texture_freq=float(r["texture_freq"]), texture_angle=float(r["texture_angle"]),
                aspect=float(r["aspect"]), max_rotation=float(r["max_rotation"]),
                coco_rank=int(r["coco_rank"]) if r["coco_rank"] else None,
                openimages_rank=int(r["openimages_rank"]) if r["openimages_rank"] else None,
            )
            if c.shape not in SHAPES or c.texture not in TEXTURES:
                raise ValueError(f"{where}: shape must be one of {SHAPES}, texture one of {TEXTURES}")
            if not TEXTURE_FREQ[0] <= c.texture_freq <= TEXTURE_FREQ[1]:
                raise ValueError(f"{where}: texture_freq must lie in {TEXTURE_FREQ}")
            if (c.shape, c.texture) in seen:
                raise ValueError(f"{where}: {c.shape} + {c.texture} is already class {seen[c.shape, c.texture]!r}")
            seen[c.shape, c.texture] = c.name
            if c.coco_id is not None and c.coco_id not in coco_ids:
                raise ValueError(f"{where}: {c.coco_id} is not a COCO category id")
            if (c.coco_id is None) != (c.coco_rank is None):
                raise ValueError(f"{where}: coco_id and coco_rank go together")
            out.append(c)
    return out


# ------------------------------------------------------------------------------ backgrounds


@lru_cache(maxsize=1)
def background_photos() -> tuple[np.ndarray, ...]:
    """Real photos shipped inside installed packages (no download), RGB uint8.

    Colour photos from scikit-image and scikit-learn; grey texture photos (brick, grass, gravel,
    camera, coins) are kept grey here and tinted per image.
    """
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "brick", "grass", "gravel", "camera", "coins"):
        try:
            im = getattr(skd, name)()
        except Exception as e:  # a data file missing from the installed wheel
            raise RuntimeError(f"scikit-image photo '{name}' is not available offline ({e}); "
                               "reinstall scikit-image==0.26.0") from None
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        photos.append(np.ascontiguousarray(im[..., :3].astype(np.uint8)))
    photos.extend(np.ascontiguousarray(im) for im in load_sample_images().images)
    return tuple(photos)


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random `cells`-grid upsampled bicubically."""
    g = rng.random((cells + 3, cells + 3)).astype(np.float32)
    up = cv2.resize(g, (w + 2 * (w // cells + 1), h + 2 * (h // cells + 1)), interpolation=cv2.INTER_CUBIC)
    oy, ox = h // cells + 1, w // cells + 1
    return np.clip(up[oy:oy + h, ox:ox + w], 0, 1)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One RGB colour in [0, 1] from hue (degrees), saturation and value."""
    px = np.array([[[h / 2.0, s * 255.0, v * 255.0]]], dtype=np.float32).astype(np.uint8)
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def make_background(rng: np.random.Generator, w: int, h: int, photo_p: float) -> np.ndarray:
    """A float32 RGB background in [0, 1]: a jittered crop of a real photo, or a procedural texture."""
    if rng.random() < photo_p:
        photos = background_photos()
        im = photos[rng.integers(len(photos))]
        ph, pw = im.shape[:2]
        frac = rng.uniform(0.35, 1.0)
        ch = int(min(ph, pw * h / w) * frac)
        cw = int(ch * w / h)
        y0 = rng.integers(0, ph - ch + 1)
        x0 = rng.integers(0, pw - cw + 1)
        crop = cv2.resize(im[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
        bg = crop.astype(np.float32) / 255.0
        if rng.random() < 0.5:
            bg = bg[:, ::-1]
        if np.ptp(bg.reshape(-1, 3).mean(axis=0)) < 0.02:  # a grey photo: tint it
            bg = bg * _hsv(rng.uniform(0, 360), rng.uniform(0.2, 0.6), 1.0)
        bg = (bg - 0.5) * rng.uniform(0.7, 1.1) + 0.5 + rng.uniform(-0.1, 0.1)
    else:
        c1 = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9))
        c2 = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9))
        t = 0.6 * _value_noise(rng, h, w, int(rng.integers(2, 6))) + 0.4 * _value_noise(rng, h, w, int(rng.integers(8, 20)))
        bg = c1 * t[..., None] + c2 * (1 - t[..., None])
    return np.ascontiguousarray(np.clip(bg, 0, 1), dtype=np.float32)


# ------------------------------------------------------------------------- shapes and textures


def _convex(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Signed distance-like value of a convex polygon (counter-clockwise in (u, v)); < 0 inside."""
    d = np.full(u.shape, -np.inf, dtype=np.float32)
    n = len(pts)
    for i in range(n):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % n]
        ex, ey = x1 - x0, y1 - y0
        L = math.hypot(ex, ey)
        # outward normal of a counter-clockwise edge is (ey, -ex)
        d = np.maximum(d, ((u - x0) * ey - (v - y0) * ex) / L)
    return d


def _box(u, v, cx, cy, hx, hy):
    return np.maximum(np.abs(u - cx) - hx, np.abs(v - cy) - hy)


def _circle(u, v, cx, cy, r):
    return np.sqrt((u - cx) ** 2 + (v - cy) ** 2) - r


def shape_distance(shape: str, u: np.ndarray, v: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Distance-like field of a unit shape in local coordinates (u, v in about [-1, 1]); < 0 inside.

    `params` holds per-instance random numbers in [0, 1) (used by 'blob' and 'star').
    """
    if shape == "ellipse":
        return _circle(u, v, 0, 0, 1)
    if shape == "rectangle":
        return _box(u, v, 0, 0, 1, 1)
    if shape == "triangle":
        return _convex(u, v, [(0, -1), (-1, 1), (1, 1)][::-1])
    if shape == "hexagon":
        return _convex(u, v, [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]])
    if shape == "diamond":
        return _convex(u, v, [(1, 0), (0, 1), (-1, 0), (0, -1)])
    if shape == "cross":
        return np.minimum(_box(u, v, 0, 0, 0.33, 1), _box(u, v, 0, 0, 1, 0.33))
    if shape == "lshape":
        return np.minimum(_box(u, v, -0.6, 0, 0.4, 1), _box(u, v, 0, 0.6, 1, 0.4))
    if shape == "crescent":
        return np.maximum(_circle(u, v, 0, 0, 1), -_circle(u, v, 0.45 + 0.15 * params[0], 0, 0.8))
    if shape == "arrow":
        shaft = _box(u, v, -0.45, 0, 0.55, 0.28)
        head = _convex(u, v, [(0.1, -0.9), (1.0, 0.0), (0.1, 0.9)])
        return np.minimum(shaft, head)
    if shape == "heart":
        lobes = np.minimum(_circle(u, v, -0.48, -0.35, 0.52), _circle(u, v, 0.48, -0.35, 0.52))
        tip = _convex(u, v, [(-0.97, -0.2), (0.0, 1.0), (0.97, -0.2)][::-1])
        return np.minimum(lobes, tip)
    if shape == "ring":
        return np.maximum(_circle(u, v, 0, 0, 1), -_circle(u, v, 0, 0, 0.5))
    if shape == "tshape":
        return np.minimum(_box(u, v, 0, -0.65, 1, 0.35), _box(u, v, 0, 0.35, 0.33, 0.65))
    if shape == "ushape":
        return np.minimum(np.minimum(_box(u, v, -0.65, 0, 0.35, 1), _box(u, v, 0.65, 0, 0.35, 1)),
                          _box(u, v, 0, 0.65, 1, 0.35))
    if shape == "hourglass":
        top = _convex(u, v, [(-1, -1), (1, -1), (0.15, 0.15), (-0.15, 0.15)])
        bottom = _convex(u, v, [(-1, 1), (-0.15, -0.15), (0.15, -0.15), (1, 1)])
        return np.minimum(top, bottom)
    r = np.sqrt(u * u + v * v)
    th = np.arctan2(v, u)
    if shape == "blob":
        rad = 0.78 + 0.14 * np.sin(2 * th + 6.28 * params[0]) + 0.08 * np.sin(3 * th + 6.28 * params[1])
        return r - rad
    if shape == "star":
        k = 5
        phase = (th * k / (2 * math.pi) + params[0]) % 1.0
        tri = np.abs(phase - 0.5) * 2  # 1 at the tips, 0 between
        return r - (0.45 + 0.55 * tri)
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def texture_field(texture: str, u: np.ndarray, v: np.ndarray, freq: float, angle: float,
                  phase: float) -> np.ndarray:
    """Mix weight in [0, 1] between an object's two tones, about half of each.

    (u, v) are isotropic local coordinates (the object's sqrt-area side spans [-1, 1]); the
    pattern has `freq` periods across that side, is turned by `angle` (radians) and shifted by
    `phase` (radians). Tone edges are steep linear ramps, not hard steps.
    """
    ca, sa = math.cos(angle), math.sin(angle)
    a, b = u * ca + v * sa, -u * sa + v * ca

    def sharp(x, k=6.0):
        return np.clip(0.5 + k * (x - 0.5), 0, 1)

    def cell(x):      # position within a period, in [-0.5, 0.5)
        return (freq * x / 2 + phase / (2 * math.pi)) % 1.0 - 0.5

    if texture == "stripes":
        return sharp(0.5 + 0.5 * np.sin(math.pi * freq * a + phase))
    if texture == "checker":
        return sharp(0.5 + 0.5 * np.sin(math.pi * freq * a + phase) * np.sin(math.pi * freq * b + phase) * 4)
    if texture == "dots":     # discs of radius 0.4 period: half the area
        fa, fb = cell(a), cell(b)
        return sharp(0.5 + (0.4 - np.sqrt(fa * fa + fb * fb)) * 4)
    if texture == "rings":
        return sharp(0.5 + 0.5 * np.sin(math.pi * freq * np.sqrt(u * u + v * v) + phase))
    if texture == "grid":     # lines 0.29 of a period wide: half the area
        d = np.minimum(0.5 - np.abs(cell(a)), 0.5 - np.abs(cell(b)))
        return sharp(0.5 + (0.146 - d) * 4)
    raise ValueError(f"unknown texture {texture!r}; valid: {TEXTURES}")


@dataclass
class Placed:
    """One object drawn in a scene."""

    cls: int
    alpha: np.ndarray       # float32 coverage in [0, 1] over the window
    rgb: np.ndarray         # float32 colour over the window
    y0: int
    x0: int
    full_area: float        # area of the whole shape in pixels, inside or outside the image
    inside_area: float      # area inside the image
    truncated: bool


def draw_object(rng: np.random.Generator, c: SynthClass, w: int, h: int, cfg: SynthConfig) -> Placed | None:
    """Sample one instance of class `c` (pose, size, colours, texture) and render it."""
    side = min(w, h)
    lo, hi = cfg.object_scale
    size = math.exp(rng.uniform(math.log(lo), math.log(hi))) * side     # sqrt(area) in px
    aspect = c.aspect * math.exp(rng.normal(0, 0.15))                    # width / height
    ax = size * math.sqrt(aspect) / 2                                    # half width
    ay = size / math.sqrt(aspect) / 2                                    # half height
    theta = math.radians(rng.uniform(-c.max_rotation, c.max_rotation))
    ex = abs(ax * math.cos(theta)) + abs(ay * math.sin(theta))
    ey = abs(ax * math.sin(theta)) + abs(ay * math.cos(theta))
    cx = rng.uniform(-0.2 * ex, w + 0.2 * ex)
    cy = rng.uniform(-0.2 * ey, h + 0.2 * ey)
    fx0, fx1 = int(math.floor(cx - ex)) - 1, int(math.ceil(cx + ex)) + 1
    fy0, fy1 = int(math.floor(cy - ey)) - 1, int(math.ceil(cy + ey)) + 1
    x0, x1 = max(fx0, 0), min(fx1, w)
    y0, y1 = max(fy0, 0), min(fy1, h)
    if x1 - x0 < 8 or y1 - y0 < 8:
        return None
    # Render over the whole (unclipped) window so the truncated share can be measured.
    yy, xx = np.mgrid[fy0:fy1, fx0:fx1].astype(np.float32)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    ct, st = math.cos(theta), math.sin(theta)
    u = (dx * ct + dy * st) / ax
    v = (-dx * st + dy * ct) / ay
    shape_params = rng.random(4)
    dist = shape_distance(c.shape, u, v, shape_params) * min(ax, ay)     # ~ pixels
    alpha_full = np.clip(0.5 - dist, 0, 1).astype(np.float32)
    full_area = float(alpha_full.sum())
    sl = (slice(y0 - fy0, y1 - fy0), slice(x0 - fx0, x1 - fx0))
    alpha = alpha_full[sl]
    inside_area = float(alpha.sum())
    if full_area < 64 or inside_area < (1 - cfg.max_truncation) * full_area:
        return None
    u, v = u[sl], v[sl]

    # Colours: nothing about them depends on the class. One hue of any palette entry, jittered,
    # in a dark shade and a light tint, so that the pattern survives grey-scale conversion
    # whatever the hue; which tone is the ground is a coin flip.
    hue = (list(HUES.values())[rng.integers(len(HUES))] + rng.normal(0, cfg.hue_jitter)) % 360
    sat = rng.uniform(0.45, 0.95)
    cols = [_hsv(hue, sat, rng.uniform(0.25, 0.5)), _hsv(hue, sat * rng.uniform(0.2, 0.5), rng.uniform(0.8, 1.0))]
    if rng.random() < 0.5:
        cols.reverse()
    # The class's pattern, in isotropic coordinates (not stretched by the aspect), its frequency
    # and orientation jittered per instance.
    freq = c.texture_freq * math.exp(rng.normal(0, 0.1))
    angle = math.radians(c.texture_angle + rng.normal(0, 8.0))
    t = texture_field(c.texture, u * math.sqrt(aspect), v / math.sqrt(aspect), freq, angle,
                      rng.uniform(0, 2 * math.pi))[..., None]
    rgb = cols[0] * (1 - t) + cols[1] * t
    # Shading from a random light direction, a darker rim, and a little noise.
    lx, ly = rng.normal(size=2)
    rgb = rgb * (0.85 + 0.12 * np.clip(-(u * lx + v * ly) / (abs(lx) + abs(ly) + 1e-6), -1, 1))[..., None]
    if rng.random() < 0.5:
        rim = np.clip(-dist[sl] / 2.0, 0, 1)[..., None]
        rgb = rgb * (0.65 + 0.35 * rim)
    rgb = rgb + rng.normal(0, 0.015, size=rgb.shape).astype(np.float32)
    return Placed(-1, alpha, np.clip(rgb, 0, 1).astype(np.float32), y0, x0, full_area, inside_area,
                  truncated=inside_area < full_area - 0.5)


def compose_scene(rng: np.random.Generator, classes: list[SynthClass], class_ids: list[int],
                  w: int, h: int, cfg: SynthConfig) -> tuple[np.ndarray, list[dict]]:
    """Render a scene with the given object classes, in drawing order (later ones on top).

    Returns the uint8 RGB image and one dict per object that could be placed, with its visible
    mask's box (x, y, w, h in pixels, right/bottom exclusive), area, polygons and flags.
    """
    img = make_background(rng, w, h, cfg.photo_background)
    owner = np.full((h, w), -1, dtype=np.int32)
    placed: list[Placed] = []
    for k in class_ids:
        for _attempt in range(25):
            ob = draw_object(rng, classes[k], w, h, cfg)
            if ob is None:
                continue
            ys = slice(ob.y0, ob.y0 + ob.alpha.shape[0])
            xs = slice(ob.x0, ob.x0 + ob.alpha.shape[1])
            cover = ob.alpha >= 0.5
            win = owner[ys, xs]
            # Would this object hide too much of an earlier one?
            hidden = np.bincount(win[cover & (win >= 0)], minlength=len(placed))
            ok = all(
                (np.count_nonzero(owner == j) - hidden[j]) >= (1 - cfg.max_occlusion) * placed[j].inside_area
                for j in np.flatnonzero(hidden)
            )
            if not ok:
                continue
            ob.cls = k
            win[cover] = len(placed)
            a = ob.alpha[..., None]
            img[ys, xs] = img[ys, xs] * (1 - a) + ob.rgb * a
            placed.append(ob)
            break
    objects = []
    for j, ob in enumerate(placed):
        vis = (owner == j).astype(np.uint8)
        area = int(vis.sum())
        if area < 16:
            continue
        ys, xs = np.nonzero(vis)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        contours, _ = cv2.findContours(vis, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polys = [(c.reshape(-1, 2).astype(np.float64) + 0.5).round(2).reshape(-1).tolist()
                 for c in contours if len(c) >= 3]
        if not polys:
            polys = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        objects.append({
            "cls": ob.cls, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "segmentation": polys,
            "occluded": area < 0.95 * ob.inside_area, "truncated": ob.truncated,
        })
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out, objects


# --------------------------------------------------------------------------------- one image


def _class_weights(classes: list[SynthClass], split: str, a: float, coco_free: bool = False) -> np.ndarray:
    """Zipf weights over the classes present in `split` (by their rank there)."""
    rank_of = (lambda c: c.openimages_rank) if split.startswith("openimages") else (lambda c: c.coco_rank)
    wts = np.array([
        0.0 if rank_of(c) is None or (coco_free and c.coco_id is not None) else rank_of(c) ** -a
        for c in classes
    ])
    return wts / wts.sum()


def generate_image(cfg: SynthConfig, classes: list[SynthClass], split: str, index: int) -> tuple[bytes, int, int, list[dict]]:
    """One scene of `split`, a pure function of (cfg, split, index): JPEG bytes, size, objects."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    w, h = cfg.image_sizes[rng.integers(len(cfg.image_sizes))]
    lo, hi = cfg.objects_per_image
    extra = cfg.extra_objects_openimages if split.startswith("openimages") else cfg.extra_objects_coco
    n = int(np.clip(lo + rng.poisson(extra), lo, hi))
    coco_free = split.startswith("openimages") and rng.random() < cfg.openimages_without_coco
    wts = _class_weights(classes, split, cfg.zipf_exponent, coco_free)
    class_ids = rng.choice(len(classes), size=n, p=wts).tolist()
    img, objects = compose_scene(rng, classes, class_ids, w, h, cfg)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue(), w, h, objects


def _work(args: tuple) -> tuple[int, int, int, list[dict]]:
    cfg, classes, split, index, path = args
    data, w, h, objects = generate_image(cfg, classes, split, index)
    with open(path, "wb") as f:
        f.write(data)
    return index, w, h, objects


# ------------------------------------------------------------------------------- the data set


def _coco_image_ids(cfg: SynthConfig, n: int) -> list[int]:
    rng = np.random.default_rng([cfg.seed, 1001])
    high = max(581929, 10 * n)  # the real COCO ids lie in [1, 581929]
    return rng.choice(np.arange(1, high + 1), size=n, replace=False).tolist()


def _openimages_ids(cfg: SynthConfig, n: int) -> list[str]:
    rng = np.random.default_rng([cfg.seed, 1002])
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        for x in rng.integers(0, np.iinfo(np.uint64).max, size=n - len(ids), dtype=np.uint64, endpoint=True):
            s = f"{int(x):016x}"
            if s not in seen:
                seen.add(s)
                ids.append(s)
    return ids


def _coco_json(split: str, images: list[dict], annotations: list[dict]) -> str:
    cats = [{"supercategory": c.supercategory, "id": c.id, "name": c.name} for c in coco_categories()]
    doc = {
        "info": {"description": f"D3SSL embedded synthetic data, COCO 2017 layout ({split})",
                 "url": "", "version": "1.0", "year": 2017, "contributor": "pipeline.synth",
                 "date_created": "2017/09/01"},
        "licenses": [{"url": "", "id": 1, "name": "generated procedurally; backgrounds from scikit-image and scikit-learn sample data"}],
        "images": images,
        "annotations": annotations,
        "categories": cats,
    }
    return json.dumps(doc, separators=(",", ":"))


def _openimages_rows(rng: np.random.Generator, image_id: str, w: int, h: int, objects: list[dict],
                     classes: list[SynthClass], cfg: SynthConfig) -> list[list[str]]:
    """Rows of the OpenImages box CSV for one image, with MIDs drawn per class and group-of boxes."""
    rows = []
    by_cls: dict[int, list[dict]] = {}
    for ob in objects:
        by_cls.setdefault(ob["cls"], []).append(ob)

    def row(mid, x0, y0, x1, y1, occluded, truncated, group):
        return [image_id, "xclick" if rng.random() < 0.85 else "activemil", mid, "1",
                f"{x0 / w:.6f}", f"{x1 / w:.6f}", f"{y0 / h:.6f}", f"{y1 / h:.6f}",
                str(int(occluded)), str(int(truncated)), str(int(group)), "0", "0"]

    for k in sorted(by_cls):
        c = classes[k]
        mids = [m for m, _ in c.openimages]
        p = np.array([wt for _, wt in c.openimages], dtype=float)
        p /= p.sum()
        obs = by_cls[k]
        if len(obs) >= 3 and rng.random() < cfg.group_of_probability:
            x0 = min(o["bbox"][0] for o in obs)
            y0 = min(o["bbox"][1] for o in obs)
            x1 = max(o["bbox"][0] + o["bbox"][2] for o in obs)
            y1 = max(o["bbox"][1] + o["bbox"][3] for o in obs)
            rows.append(row(mids[0], x0, y0, x1, y1, True, any(o["truncated"] for o in obs), True))
            continue
        for o in obs:
            x, y, bw, bh = o["bbox"]
            rows.append(row(mids[rng.choice(len(mids), p=p)], x, y, x + bw, y + bh,
                            o["occluded"], o["truncated"], False))
    return rows


def build(cfg: SynthConfig, out: str | Path, workers: int = 0, progress: bool = True) -> dict:
    """Generate the whole embedded data set into `out` (replaced atomically); return the card."""
    from tqdm import tqdm

    classes = load_classes()
    sizes = cfg.split_sizes()
    coco_ids = _coco_image_ids(cfg, sizes["coco_train2017"] + sizes["coco_val2017"])
    oi_ids = _openimages_ids(cfg, sizes["openimages_train"])
    names = {
        "openimages_train": oi_ids,
        "coco_train2017": coco_ids[:sizes["coco_train2017"]],
        "coco_val2017": coco_ids[sizes["coco_train2017"]:],
    }
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    card: dict = {"config": as_dict(cfg), "splits": {}}
    with atomic_dir(out) as tmp:
        dirs = {
            "openimages_train": tmp / "openimages" / "train",
            "coco_train2017": tmp / "coco" / "train2017",
            "coco_val2017": tmp / "coco" / "val2017",
        }
        for d in dirs.values():
            d.mkdir(parents=True)
        (tmp / "coco" / "annotations").mkdir(parents=True)
        shutil.copyfile(OPENIMAGES_CLASSES_CSV, tmp / "openimages" / "class-descriptions-boxable.csv")
        results: dict[str, list] = {}
        total = sum(sizes.values())
        ctx = mp.get_context("fork")
        with tqdm(total=total, desc="synth", unit="img", disable=not progress) as bar, \
                ctx.Pool(workers) if workers > 1 else _Inline() as pool:
            for split in SPLITS:
                ids = names[split]
                fname = (lambda i: f"{i}.jpg") if split.startswith("openimages") else (lambda i: f"{i:012d}.jpg")
                tasks = [(cfg, classes, split, j, dirs[split] / fname(ids[j])) for j in range(len(ids))]
                res = []
                for r in pool.imap(_work, tasks, chunksize=8):
                    res.append(r)
                    bar.update()
                results[split] = res

        ann_id = 1
        for split in ("coco_train2017", "coco_val2017"):
            ims, anns = [], []
            for (j, w, h, objects), image_id in zip(results[split], names[split]):
                ims.append({"license": 1, "file_name": f"{image_id:012d}.jpg", "coco_url": "",
                            "height": h, "width": w, "date_captured": "2017-01-01 00:00:00",
                            "flickr_url": "", "id": image_id})
                for o in objects:
                    anns.append({"segmentation": o["segmentation"], "area": float(o["area"]), "iscrowd": 0,
                                 "image_id": image_id, "bbox": [float(v) for v in o["bbox"]],
                                 "category_id": classes[o["cls"]].coco_id, "id": ann_id})
                    ann_id += 1
            sub = split.split("_")[1]
            (tmp / "coco" / "annotations" / f"instances_{sub}.json").write_text(_coco_json(split, ims, anns))
            card["splits"][split] = _split_card(results[split], classes)

        rng = np.random.default_rng([cfg.seed, 1003])
        rows = []
        for (j, w, h, objects), image_id in sorted(zip(results["openimages_train"], oi_ids), key=lambda t: t[1]):
            rows.extend(_openimages_rows(rng, image_id, w, h, objects, classes, cfg))
        with (tmp / "openimages" / "oidv6-train-annotations-bbox.csv").open("w", newline="") as f:
            wr = csv.writer(f, lineterminator="\n")
            wr.writerow(OPENIMAGES_HEADER)
            wr.writerows(rows)
        card["splits"]["openimages_train"] = _split_card(results["openimages_train"], classes)
        card["splits"]["openimages_train"]["csv_rows"] = len(rows)
        card["splits"]["openimages_train"]["group_of_rows"] = sum(r[10] == "1" for r in rows)
        card["classes"] = [dataclasses.asdict(c) for c in classes]
        (tmp / "synth_card.json").write_text(json.dumps(card, indent=2) + "\n")
    card["seconds"] = time.perf_counter() - t0
    card["images_per_second"] = total / card["seconds"]
    return card


def _split_card(results: list, classes: list[SynthClass]) -> dict:
    n_obj = [len(objs) for _, _, _, objs in results]
    counts = np.bincount([o["cls"] for *_, objs in results for o in objs], minlength=len(classes))
    return {
        "images": len(results),
        "objects": int(sum(n_obj)),
        "objects_per_image": {"min": int(min(n_obj)), "mean": float(np.mean(n_obj)), "max": int(max(n_obj))},
        "class_counts": {c.name: int(k) for c, k in zip(classes, counts) if k},
    }


class _Inline:
    """A stand-in for a process pool with one worker: runs tasks in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, tasks, chunksize=1):
        return map(fn, tasks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder (replaced)")
    p.add_argument("--images", type=int, help="images over all splits (default: params or 2000)")
    p.add_argument("--seed", type=int, help="random seed (default: params or 0)")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'synth' section from")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all CPUs)")
    args = p.parse_args(argv)
    cfg = override(load_section(SynthConfig, "synth", args.params), images=args.images, seed=args.seed)
    card = build(cfg, args.out, workers=args.workers)
    for split, s in card["splits"].items():
        print(f"{split}: {s['images']} images, {s['objects']} objects "
              f"({s['objects_per_image']['mean']:.1f} per image)")
    print(f"wrote {args.out} in {card['seconds']:.1f} s ({card['images_per_second']:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
