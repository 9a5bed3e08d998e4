"""The scenes of the embedded synthetic data (`pipeline.synth`): backgrounds, object shapes and
textures, one object drawn, and a scene composed of objects with their visible masks.

A class is what survives the SSL augmentations: its silhouette (one of `SHAPES`, with the class's
aspect and rotation limit) and its two-tone texture (one of `TEXTURES`, at a class-specific
frequency and orientation). Colour is a per-instance nuisance: a hue of `HUES` (jittered) as a dark
shade and a light tint. Scale, position, rotation, shading, background, occlusion and truncation
are per instance too. Every draw comes from the `rng` passed in, so a scene is a pure function of
its generator's seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from pipeline.synth import SynthClass, SynthConfig

HUES = {"red": 0.0, "orange": 28.0, "yellow": 55.0, "green": 115.0,
        "cyan": 180.0, "blue": 220.0, "purple": 275.0, "pink": 325.0}
SHAPES = ("ellipse", "rectangle", "triangle", "hexagon", "cross", "crescent", "arrow", "heart",
          "lshape", "diamond", "blob", "star", "ring", "tshape", "ushape", "hourglass")
# Two-tone patterns, each covering about half of the object with either tone, so that the mean
# colour of an object says nothing about its texture.
TEXTURES = ("stripes", "checker", "dots", "rings", "grid")
TEXTURE_FREQ = (1.5, 5.0)     # allowed pattern periods across an object (sqrt of its area)


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


# NumPy's transcendental ufuncs take a SIMD path chosen at run time (AVX-512, AVX2, baseline), and
# those paths differ in the last bits: NumPy's sin and arctan2 made an AVX2-only CPU draw other
# images than an AVX-512 one. The shapes and textures use these two instead, built from +, -, *, /
# and rint, which IEEE 754 rounds the same on every path, so a scene is the same bytes on every x86
# CPU. Accurate to about 1e-12 (float64), far below a pixel.
_HALF_PI, _TWO_PI = math.pi / 2, 2 * math.pi
_TAN_PI_8 = math.tan(math.pi / 8)


def _sin(x) -> np.ndarray:
    """sin(x), the same bits on every CPU: reduced to [-pi/2, pi/2], then its Taylor series to x^17."""
    x = np.asarray(x)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    r = x.astype(np.float64)
    r = r - np.rint(r / _TWO_PI) * _TWO_PI                  # [-pi, pi]
    r = np.where(r > _HALF_PI, math.pi - r, r)
    r = np.where(r < -_HALF_PI, -math.pi - r, r)            # [-pi/2, pi/2]
    r2, term, out = r * r, r, r
    for n in range(1, 9):                                   # (-1)^n r^(2n+1) / (2n+1)!
        term = term * r2 / (-(2 * n) * (2 * n + 1))
        out = out + term
    return out.astype(dtype)


def _atan2(y, x) -> np.ndarray:
    """arctan2(y, x) in [-pi, pi], the same bits on every CPU: atan of t in [0, tan(pi/8)] by its
    series (to t^39), unfolded by the octant."""
    y, x = np.asarray(y), np.asarray(x)
    rt = np.result_type(y, x)
    dtype = rt if rt in (np.float32, np.float64) else np.float64
    ay, ax = np.abs(y.astype(np.float64)), np.abs(x.astype(np.float64))
    hi, lo = np.maximum(ay, ax), np.minimum(ay, ax)
    t = np.divide(lo, hi, out=np.zeros_like(hi), where=hi > 0)       # [0, 1]
    big = t > _TAN_PI_8
    z = np.where(big, (t - 1) / (t + 1), t)                            # |z| <= tan(pi/8)
    z2, term, a = z * z, z, z
    for n in range(1, 20):                                             # (-1)^n z^(2n+1) / (2n+1)
        term = -term * z2
        a = a + term / (2 * n + 1)
    a = np.where(big, math.pi / 4 + a, a)                              # atan(t), [0, pi/4]
    a = np.where(ay > ax, _HALF_PI - a, a)
    a = np.where(x < 0, math.pi - a, a)
    a = np.where(y < 0, -a, a)
    return a.astype(dtype)


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
    th = _atan2(v, u)
    if shape == "blob":
        rad = 0.78 + 0.14 * _sin(2 * th + 6.28 * params[0]) + 0.08 * _sin(3 * th + 6.28 * params[1])
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
        return sharp(0.5 + 0.5 * _sin(math.pi * freq * a + phase))
    if texture == "checker":
        return sharp(0.5 + 0.5 * _sin(math.pi * freq * a + phase) * _sin(math.pi * freq * b + phase) * 4)
    if texture == "dots":     # discs of radius 0.4 period: half the area
        fa, fb = cell(a), cell(b)
        return sharp(0.5 + (0.4 - np.sqrt(fa * fa + fb * fb)) * 4)
    if texture == "rings":
        return sharp(0.5 + 0.5 * _sin(math.pi * freq * np.sqrt(u * u + v * v) + phase))
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
