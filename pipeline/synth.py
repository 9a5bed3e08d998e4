"""The embedded default data: procedural multi-object scenes in the real COCO 2017 and OpenImages V6
on-disk layouts, so that every later stage runs its real loading code on them.

    python -m pipeline.synth --params params.yaml --out data/synth [--images N] [--seed S] [--workers N]

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

import csv
import dataclasses
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import cli, synth_layouts
from pipeline.categories import MANIFESTS, OPENIMAGES_CLASSES_CSV, coco_categories
from pipeline.files import atomic_dir
from pipeline.params import as_dict, load_section, override
from pipeline.synth_scene import (  # noqa: F401 (draw_object: the scene API, importable from here)
    SHAPES, TEXTURE_FREQ, TEXTURES, compose_scene, draw_object,
)

log = logging.getLogger(__name__)

SYNTH_CLASSES_CSV = MANIFESTS / "synth_classes.csv"
SPLITS = ("openimages_train", "coco_train2017", "coco_val2017")


@dataclass(frozen=True)
class SynthConfig:
    """Settings of the `synth` section of params.yaml. The code defaults are COCO-like (2000 images,
    3-15 objects per image, about 7 on average, each 0.14-0.45 of the image side); the embedded
    default set is params.yaml's section (1300 images, 2-8 objects of 0.25-0.6 of the side: what
    the 64 px CPU views can resolve), which the stage passes with `--params params.yaml`."""

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


def _image_names(cfg: SynthConfig, sizes: dict[str, int]) -> dict[str, list]:
    """Per split, the image ids in generation order: 16-hex ImageIDs for OpenImages, distinct
    integer ids for COCO (shared by train2017 and val2017)."""
    coco_ids = _coco_image_ids(cfg, sizes["coco_train2017"] + sizes["coco_val2017"])
    return {
        "openimages_train": _openimages_ids(cfg, sizes["openimages_train"]),
        "coco_train2017": coco_ids[:sizes["coco_train2017"]],
        "coco_val2017": coco_ids[sizes["coco_train2017"]:],
    }


def _render_all(cfg: SynthConfig, classes: list[SynthClass], names: dict[str, list], dirs: dict[str, Path],
                workers: int, progress: bool) -> dict[str, list]:
    """Write every split's JPEGs into `dirs`; per split, (index, width, height, objects) per image."""
    from tqdm import tqdm

    results: dict[str, list] = {}
    ctx = mp.get_context("fork")
    with tqdm(total=sum(len(v) for v in names.values()), desc="synth", unit="img", disable=not progress) as bar, \
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
    return results


def build(cfg: SynthConfig, out: str | Path, workers: int = 0, progress: bool = True) -> dict:
    """Generate the whole embedded data set into `out` (replaced atomically); return the card."""
    classes = load_classes()
    sizes = cfg.split_sizes()
    names = _image_names(cfg, sizes)
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
        results = _render_all(cfg, classes, names, dirs, workers, progress)

        synth_layouts.write_coco(tmp / "coco" / "annotations", results, names, classes)
        for split in ("coco_train2017", "coco_val2017"):
            card["splits"][split] = _split_card(results[split], classes)
        rows = synth_layouts.write_openimages_csv(tmp / "openimages" / "oidv6-train-annotations-bbox.csv", cfg,
                                                  results["openimages_train"], names["openimages_train"], classes)
        card["splits"]["openimages_train"] = _split_card(results["openimages_train"], classes)
        card["splits"]["openimages_train"]["csv_rows"] = len(rows)
        card["splits"]["openimages_train"]["group_of_rows"] = sum(r[10] == "1" for r in rows)
        card["classes"] = [dataclasses.asdict(c) for c in classes]
        (tmp / "synth_card.json").write_text(json.dumps(card, indent=2) + "\n")
    card["seconds"] = time.perf_counter() - t0
    card["images_per_second"] = sum(sizes.values()) / card["seconds"]
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
    p = cli.parser("python -m pipeline.synth", __doc__)
    p.add_argument("--out", required=True, type=Path, help="output folder (replaced)")
    p.add_argument("--images", type=int, help="images over all splits (default: params or 2000)")
    p.add_argument("--seed", type=int, help="random seed (default: params or 0)")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'synth' section from")
    p.add_argument("--workers", type=int, default=0, help="processes (0: all CPUs)")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    cfg = override(load_section(SynthConfig, "synth", args.params), images=args.images, seed=args.seed)
    card = build(cfg, args.out, workers=args.workers)
    for split, s in card["splits"].items():
        log.info("%s: %d images, %d objects (%.1f per image)", split, s["images"], s["objects"],
                 s["objects_per_image"]["mean"])
    log.info("wrote %s (COCO 2017 and OpenImages V6 layouts, synth_card.json): %d images in %.1f s (%.0f images/s)",
             args.out, sum(s["images"] for s in card["splits"].values()), card["seconds"],
             card["images_per_second"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
