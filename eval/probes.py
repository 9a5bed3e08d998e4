"""Object-coupling and positional-bias probes: coupling rate (CR) and mean cosine similarity (MCS)
per layer C2..C5 (paper sections 3.1 and 3.2, Figures 3 and 4, Table 7).

    python -m eval.probes --backbone runs/d3ssl/export/backbone.pth --arch resnet50 \
        --images data/openimage_mini/images.parquet --boxes data/openimage_mini/boxes.parquet \
        --out reports/d3ssl/probes.json [--plots reports/d3ssl] [--name d3ssl] [--params params.yaml]
    python -m eval.probes ... --coco-root /datasets/coco ...     # COCO val2017 objects instead
    python -m eval.plot_probes reports/*/probes.json --out reports/probes     # several backbones

Objects: as the paper's Table 7 ("we follow the procedure in Sec. 3 to construct images from
OpenImage-MINI"), the ground-truth boxes of OpenImage-MINI (the `images` and `boxes` tables of
pipeline/contracts.py written by the sample stage; `--coco-root` takes COCO val2017 instead), not
group boxes (`is_group`), shorter side >= `min_object_size`; "different categories" means
different `label`s (the OpenImages MID; the COCO name). Each is cropped and resized to
`object_size` x `object_size` pixels (stretched: the probes compare a crop with itself, so its
aspect does not matter). At every layer an object's feature is RoIAlign of its box on that layer's
map (`pool_size` x `pool_size`, aligned, adaptive sampling) followed by average pooling, as for
O-KNN; cosine similarities are computed in float64.

- CR (section 3.1): `pairs` pairs of objects A, B of different categories. Image 1: A and B side
  by side, touching, on a black `canvas` x `canvas` background (A on the left or the right, at
  random); image 2: A alone at the same place. CR = mean over pairs of cos(A1, B1) divided by the
  mean over pairs of cos(A2, B1). 1 means B does not leak into A; above 1, it does.
- MCS (section 3.2): each of `objects` crops repeated in a 3x3 grid (the image is exactly the
  grid, so the outer cells touch the image border, where zero padding acts); per object the mean
  cosine similarity between the centre cell's feature and the eight others, averaged over objects.
  1 means no positional information.

The precondition, checked by `validate`: `object_size` is a multiple of `pool_size` x the stride
of every probed layer (for C5: pool_size x 32), and the canvas and every box lie on the grid of
the coarsest probed stride. Then every RoIAlign sample falls on a cell centre, so a box's feature
is exactly the mean of the cells it covers, and a network whose receptive field is one pixel gets
CR = MCS = 1: what leaves 1 is the network's. Off the grid (e.g. 96 px with pool_size 7: 3 C5
cells in 7 bins) the outer samples interpolate about 29% of the neighbouring cell, so CR and MCS
leave 1 for every network by construction (the one-pixel network read CR 0.9995 to 1.0003 and
MCS down to 0.9998 per layer on the embedded OpenImage-MINI crops there; exactly 1 on the grid). Every run also measures
that one-pixel network (`OnePixelStages`: 1x1 convolutions with the backbone's strides and
channels, seeded) through the same code on the same images and writes it as `control` (CR and
MCS per layer; 1 up to float rounding at a valid size).

Sizes: the paper gives neither sizes nor counts. Any valid pool_size gives the same feature (the
mean of the covered cells), so the embedded params use pool_size 3 with 96-px objects (3 C5 cells
a side; the crops are near the synthetic objects' size and the embedded pre-training views are
64 px); the default here, 224 with pool_size 7, follows the paper's 224-pixel pre-training views.
"""
from __future__ import annotations

import json
import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn

from eval.backbone import (
    ARCHS, LAYERS, ResNetStages, build_resnet, load_rgb, pool_boxes, resize_rgb, to_input,
)
from pipeline import cli, contracts
from pipeline.files import write_text
from pipeline.params import as_dict, load_section
from pipeline.readers import read_coco
from train.dist import resolve_device

GRID_CENTRE = 4   # index of the centre cell among the 3x3 cells, row-major

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbesConfig:
    """The `probes` section of params.yaml."""

    layers: tuple[str, ...] = LAYERS   # feature maps probed (C2..C5)
    pairs: int = 128                   # CR: object pairs (A, B of different categories)
    objects: int = 128                 # MCS: objects, each repeated in a 3x3 grid
    object_size: int = 224             # crops resized to this square; a multiple of pool_size x 32 (C5)
    canvas: int = 512                  # CR: side of the black image holding the pair; a multiple of 32
    min_object_size: float = 32.0      # only objects whose shorter side (original pixels) is at least this
    pool_size: int = 7                 # RoIAlign grid before average pooling
    batch_size: int = 4                # images per forward
    seed: int = 0                      # choice of objects and pairs, the random backbone


# ------------------------------------------------------------------------------ synthetic images


def crop_object(image: np.ndarray, box, size: int) -> np.ndarray:
    """The pixels a box touches, resized to size x size (uint8 HxWx3)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    c = image[max(int(np.floor(y1)), 0):int(np.ceil(y2)), max(int(np.floor(x1)), 0):int(np.ceil(x2))]
    return resize_rgb(c, size, size)


def _snap(v: float, step: int) -> int:
    return int(v // step) * step


def coupling_images(crop_a: np.ndarray, crop_b: np.ndarray, canvas: int, a_left: bool, step: int):
    """(image 1 with A and B side by side, image 2 with A alone, box of A, box of B).

    Both crops are s x s; the pair (2s x s) is centred on a black canvas x canvas image, its
    corner snapped to multiples of `step`."""
    s = crop_a.shape[0]
    if crop_b.shape != crop_a.shape or crop_a.shape[:2] != (s, s):
        raise ValueError("both crops must be the same square size")
    if canvas < 2 * s:
        raise ValueError(f"canvas {canvas} cannot hold two {s}-pixel objects side by side")
    x0, y0 = _snap((canvas - 2 * s) / 2, step), _snap((canvas - s) / 2, step)
    xa, xb = (x0, x0 + s) if a_left else (x0 + s, x0)
    one = np.zeros((canvas, canvas, 3), np.uint8)
    one[y0:y0 + s, xa:xa + s] = crop_a
    one[y0:y0 + s, xb:xb + s] = crop_b
    two = np.zeros_like(one)
    two[y0:y0 + s, xa:xa + s] = crop_a
    box = lambda x: np.array([x, y0, x + s, y0 + s], np.float32)  # noqa: E731
    return one, two, box(xa), box(xb)


def grid_image(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the crop tiled 3x3, the 9 cell boxes in row-major order; index 4 is the centre)."""
    s = crop.shape[0]
    boxes = np.array([[c * s, r * s, (c + 1) * s, (r + 1) * s] for r in range(3) for c in range(3)], np.float32)
    return np.tile(crop, (3, 3, 1)), boxes


# ------------------------------------------------------------------------------ metrics


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def coupling_rate(a1: np.ndarray, a2: np.ndarray, b1: np.ndarray) -> float:
    """mean_pairs cos(A1, B1) / mean_pairs cos(A2, B1); rows are pairs."""
    return float(_cos(a1, b1).mean() / _cos(a2, b1).mean())


def mean_cosine(cells: np.ndarray) -> float:
    """cells: objects x 9 x C (row-major 3x3). Mean over objects of the mean cos(centre, other)."""
    others = [i for i in range(9) if i != GRID_CENTRE]
    return float(_cos(cells[:, GRID_CENTRE:GRID_CENTRE + 1], cells[:, others]).mean())


@torch.inference_mode()
def layer_features(stages: torch.nn.Module, images: list[np.ndarray], boxes: list[np.ndarray],
                   layers: tuple[str, ...], pool_size: int, batch_size: int,
                   device: torch.device) -> dict[str, np.ndarray]:
    """layer -> (sum of boxes) x C: RoIAlign + average pooling of each image's boxes on that layer.
    All images must have one shape."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.stack(images[i:i + batch_size])).permute(0, 3, 1, 2).to(device)
        maps = stages(to_input(x), tuple(layers))
        b = [torch.from_numpy(bb) for bb in boxes[i:i + batch_size]]
        for name in layers:
            out[name].append(pool_boxes(maps[name], b, stages.strides[name], pool_size).float().cpu().numpy())
    return {name: np.concatenate(v) for name, v in out.items()}


def grid_step(cfg: ProbesConfig, strides: dict[str, int]) -> int:
    """The coarsest stride among the probed layers: boxes and the canvas lie on its grid."""
    return max(strides[n] for n in cfg.layers)


def measure_coupling(stages, crops_a, crops_b, a_left, cfg: ProbesConfig, device) -> dict[str, float]:
    """CR per layer over the pairs (crops_a[i], crops_b[i])."""
    step = grid_step(cfg, stages.strides)
    ones, twos, ba, bb = zip(*(coupling_images(a, b, cfg.canvas, left, step)
                               for a, b, left in zip(crops_a, crops_b, a_left)))
    f1 = layer_features(stages, list(ones), [np.stack([x, y]) for x, y in zip(ba, bb)], cfg.layers,
                        cfg.pool_size, cfg.batch_size, device)      # rows: A1, B1, A1, B1, ...
    f2 = layer_features(stages, list(twos), [x[None] for x in ba], cfg.layers,
                        cfg.pool_size, cfg.batch_size, device)      # rows: A2
    return {name: coupling_rate(f1[name][0::2], f2[name], f1[name][1::2]) for name in cfg.layers}


def measure_positional(stages, crops, cfg: ProbesConfig, device) -> dict[str, float]:
    """MCS per layer over the 3x3 grids of `crops`."""
    grids, boxes = zip(*(grid_image(c) for c in crops))
    f = layer_features(stages, list(grids), list(boxes), cfg.layers, cfg.pool_size, cfg.batch_size, device)
    return {name: mean_cosine(f[name].reshape(len(crops), 9, -1)) for name in cfg.layers}


# ------------------------------------------------------------------------------ objects


def pick_objects(category: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n object indices at random (with replacement only when there are fewer than n)."""
    return rng.choice(len(category), size=n, replace=len(category) < n)


def pick_pairs(category: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n pairs (a, b) of object indices whose categories differ."""
    if len(np.unique(category)) < 2:
        raise ValueError("coupling pairs need objects of at least two categories")
    a = rng.choice(len(category), size=n)
    b = np.empty(n, np.int64)
    for i, ai in enumerate(a):
        others = np.flatnonzero(category != category[ai])
        b[i] = others[rng.integers(len(others))]
    return a, b


def validate(cfg: ProbesConfig, strides: dict[str, int]) -> None:
    """Raise ValueError unless a one-pixel receptive field gives CR = MCS = 1 at these settings:
    object_size a multiple of pool_size x the stride of every probed layer (every RoIAlign sample
    on a cell centre), the canvas a multiple of the coarsest probed stride and large enough."""
    unknown = [n for n in cfg.layers if n not in strides]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; valid: {list(strides)}")
    if cfg.pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {cfg.pool_size}")
    name = max(cfg.layers, key=lambda n: strides[n])
    unit = cfg.pool_size * strides[name]
    bad = [n for n in cfg.layers if cfg.object_size % (cfg.pool_size * strides[n])]
    if bad:
        fix = max(unit, round(cfg.object_size / unit) * unit)
        raise ValueError(
            f"probes.object_size {cfg.object_size} must be a multiple of probes.pool_size x the stride of "
            f"every probed layer ({cfg.pool_size} x {strides[name]} = {unit} at {name}; fails at {bad}): "
            "otherwise the outer RoIAlign samples read the neighbouring cells and CR, MCS leave 1 even for "
            f"a network with a one-pixel receptive field. Use object_size {fix} (or another multiple of "
            f"{unit}), or a pool_size that divides object_size / {strides[name]}")
    step = strides[name]
    if cfg.canvas % step:
        raise ValueError(f"probes.canvas {cfg.canvas} must be a multiple of the coarsest probed stride {step} "
                         f"(use {-(-cfg.canvas // step) * step}) so that the boxes lie on its grid")
    if cfg.canvas < 2 * cfg.object_size:
        raise ValueError(f"probes.canvas {cfg.canvas} must be at least twice object_size {cfg.object_size}")


class OnePixelStages(nn.Module):
    """The control: a network whose receptive field is one pixel (1x1 convolutions and ReLU, strided
    to `strides`, `channels` wide, seeded weights), with ResNetStages' interface. At settings that
    pass `validate` it gives CR = MCS = 1 exactly (up to float rounding): nothing of a neighbour or
    of the position can reach a box's feature."""

    def __init__(self, strides: dict[str, int], channels: dict[str, int], seed: int = 0):
        super().__init__()
        self.strides, self.channels = dict(strides), dict(channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            blocks, c, s = {}, 3, 1
            for name in LAYERS:
                if strides[name] % s:
                    raise ValueError(f"stride {strides[name]} of {name} is not a multiple of the previous {s}")
                blocks[name] = nn.Sequential(nn.Conv2d(c, channels[name], 1, strides[name] // s), nn.ReLU())
                c, s = channels[name], strides[name]
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, x: torch.Tensor, layers: tuple[str, ...] = LAYERS) -> "OrderedDict[str, torch.Tensor]":
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in LAYERS[: max(LAYERS.index(n) for n in layers) + 1]:
            x = self.blocks[name](x)
            if name in layers:
                out[name] = x
        return out


@dataclass
class Objects:
    """Eligible objects: image path, box (x1y1x2y2, original pixels) and category label of each."""

    path: np.ndarray       # object
    boxes: np.ndarray      # float32 n x 4
    label: np.ndarray      # object (str)
    source: str

    def __len__(self) -> int:
        return len(self.label)


def eligible_objects(images: pa.Table, boxes: pa.Table, min_object_size: float, source: str) -> Objects:
    """The boxes (contract tables) that are not group boxes and whose shorter side is at least
    `min_object_size` pixels."""
    paths = dict(zip(images.column("key").to_pylist(), images.column("path").to_pylist()))
    xyxy = np.stack([boxes.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1).astype(np.float32)
    side = np.minimum(xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1])
    ok = np.flatnonzero(~boxes.column("is_group").to_numpy(zero_copy_only=False) & (side >= min_object_size))
    if len(ok) == 0:
        raise ValueError(f"{source}: no object (not a group box) with a shorter side of at least {min_object_size} px")
    keys = boxes.column("key").to_pylist()
    return Objects(path=np.array([paths[keys[i]] for i in ok], dtype=object), boxes=xyxy[ok],
                   label=np.array(boxes.column("label").to_pylist(), dtype=object)[ok], source=source)


def read_objects(images: Path | None = None, boxes: Path | None = None, coco_root: Path | None = None,
                 min_object_size: float = 32.0) -> Objects:
    """Objects of OpenImage-MINI (`images` and `boxes` parquet tables) or of COCO val2017."""
    if coco_root is not None:
        res = read_coco(coco_root / "annotations" / "instances_val2017.json", coco_root / "val2017")
        return eligible_objects(res.images, res.boxes, min_object_size, f"COCO val2017 of {coco_root}")
    if images is None or boxes is None:
        raise ValueError("give the images and boxes tables (OpenImage-MINI), or a COCO root")
    return eligible_objects(contracts.read_table(images, contracts.IMAGES), contracts.read_table(boxes, contracts.BOXES),
                            min_object_size, str(boxes))


def run_probes(stages: torch.nn.Module, objects: Objects, cfg: ProbesConfig, device: torch.device) -> dict:
    """CR and MCS per layer of `stages` on crops of `objects`, and of the one-pixel control on the
    same crops at the same settings; the JSON-ready result."""
    validate(cfg, stages.strides)
    label = objects.label
    rng = np.random.default_rng(cfg.seed)
    pa_, pb_ = pick_pairs(label, cfg.pairs, rng)
    a_left = rng.random(cfg.pairs) < 0.5
    objs = pick_objects(label, cfg.objects, rng)
    cache: dict[str, np.ndarray] = {}

    def crop(i: int) -> np.ndarray:
        if objects.path[i] not in cache:
            cache[objects.path[i]] = load_rgb(objects.path[i])
        return crop_object(cache[objects.path[i]], objects.boxes[i], cfg.object_size)

    crops_a, crops_b, crops = [crop(i) for i in pa_], [crop(i) for i in pb_], [crop(i) for i in objs]
    control = OnePixelStages(stages.strides, stages.channels, seed=cfg.seed)
    out = {}
    for key, net in (("probed", stages), ("control", control)):
        net = net.to(device).eval()
        out[key] = {"cr": measure_coupling(net, crops_a, crops_b, a_left, cfg, device),
                    "mcs": measure_positional(net, crops, cfg, device)}
    return {**out["probed"], "control": out["control"], "objects_from": objects.source,
            "pairs": int(cfg.pairs), "objects": int(cfg.objects), "eligible_objects": int(len(objects)),
            "categories": int(len(np.unique(label))), "settings": as_dict(cfg)}


# ------------------------------------------------------------------------------ plots


METRICS = {"cr": "coupling rate (CR; 1 = no coupling)", "mcs": "mean cosine similarity (MCS; 1 = no positional bias)"}


def plot_probes(results: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per metric (cr.png, mcs.png): the metric over layers, a line per result (its
    'name'), like the paper's Figures 3b and 4b."""
    from eval.report_plots import pyplot, style_layer_axes
    from pipeline.files import atomic_path

    plt = pyplot()
    written = []
    for metric, title in METRICS.items():
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        for r in results:
            layers = list(r[metric])
            ax.plot(layers, [r[metric][n] for n in layers], marker="o", label=r.get("name", r.get("backbone", "?")))
        style_layer_axes(ax, metric, title, legend_fontsize=8)
        path = Path(out_dir) / f"{metric}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m eval.probes", __doc__)
    p.add_argument("--backbone", required=True, help="ResNet state_dict file, or 'random'")
    p.add_argument("--arch", required=True, choices=sorted(ARCHS), help="the backbone's ResNet")
    p.add_argument("--images", type=Path, help="OpenImage-MINI images table (data/openimage_mini/images.parquet)")
    p.add_argument("--boxes", type=Path, help="OpenImage-MINI boxes table (data/openimage_mini/boxes.parquet)")
    p.add_argument("--coco-root", type=Path, help="instead of --images/--boxes: COCO 2017 layout (val2017 is used)")
    p.add_argument("--out", required=True, type=Path, help="result JSON")
    p.add_argument("--name", help="label of this backbone in plots (default: the --backbone value)")
    p.add_argument("--plots", type=Path, help="folder for cr.png and mcs.png of this backbone alone")
    p.add_argument("--params", type=Path, help="params.yaml to read the 'probes' section from")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    tables = (args.images, args.boxes)
    if not (all(tables) and args.coco_root is None or args.coco_root and not any(tables)):
        p.error("give either --images and --boxes (OpenImage-MINI) or --coco-root")
    cfg = load_section(ProbesConfig, "probes", args.params)
    device = resolve_device(args.device)
    stages = ResNetStages(build_resnet(args.arch, args.backbone, seed=cfg.seed))
    validate(cfg, stages.strides)  # a bad size fails before any image is read
    objects = read_objects(args.images, args.boxes, args.coco_root, cfg.min_object_size)
    result = {"name": args.name or str(args.backbone), "backbone": str(args.backbone), "arch": args.arch,
              **run_probes(stages, objects, cfg, device), "device": str(device)}
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    if args.plots:
        plot_probes([result], args.plots)
    for m in ("cr", "mcs"):
        log.info("%s per layer: %s; one-pixel control: %s", m.upper(),
                 ", ".join(f"{n} {result[m][n]:.3f}" for n in cfg.layers),
                 ", ".join(f"{n} {result['control'][m][n]:.3f}" for n in cfg.layers))
    log.info("wrote %s%s: CR and MCS of %s over %d layers", args.out,
             f" and {args.plots}/cr.png, mcs.png" if args.plots else "", result["name"], len(cfg.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
