"""A picture of the views and region augmentations on real samples (like the paper's supplement).

    python -m train.preview --shards data/shards --out reports/preview.png [--samples 4] [--seed 0] [--params params.yaml]

One row per sample, columns: x1 with the K proposals; x2 with the same proposals; x2-s; PRC on
x1; PRM after PRC (eq. 2, x1-hat); RBJ (the jittered boxes, dashed, inside the proposals); the
foreground mask m-hat of the composition; x3 with the shifted boxes that take part in L_dp
(eq. 8), its |t| written on it. The x3 column's title gives the batch's `shift_px` (mean |t| in
pixels), the figure logged during training. PRM and x3 take their backgrounds from different
donor images of the batch, as in training.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from pipeline import cli
from pipeline.files import atomic_path

if TYPE_CHECKING:   # torch and the training modules load inside the functions: `--help` stays fast
    import torch

    from train.augment import AugmentConfig
    from train.stream import LoaderConfig

log = logging.getLogger(__name__)
COLOURS = [(255, 60, 60), (60, 220, 60), (70, 140, 255), (255, 220, 0), (255, 0, 255), (0, 255, 255)]
TITLES = ["x1 + proposals", "x2 + proposals", "x2-s", "PRC(x1)", "PRM(PRC(x1))", "RBJ boxes", "mask m-hat", "x3 + shifted"]


def to_image(x: torch.Tensor) -> Image.Image:
    """A normalised CHW tensor back to a PIL image."""
    import torch

    from train.methods import MEAN, STD

    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    arr = ((x.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def draw_boxes(im: Image.Image, boxes: torch.Tensor, valid: torch.Tensor, scale: float = 1.0, dashed: bool = False) -> Image.Image:
    im = im.copy()
    d = ImageDraw.Draw(im)
    for k, (b, v) in enumerate(zip(boxes.tolist(), valid.tolist())):
        if not v:
            continue
        x0, y0, x1, y1 = (c * scale for c in b)
        if dashed:
            for t in np.arange(0, 1, 0.1):
                d.line([x0 + t * (x1 - x0), y0, x0 + (t + 0.05) * (x1 - x0), y0], fill=COLOURS[k % 6], width=2)
                d.line([x0 + t * (x1 - x0), y1, x0 + (t + 0.05) * (x1 - x0), y1], fill=COLOURS[k % 6], width=2)
                d.line([x0, y0 + t * (y1 - y0), x0, y0 + (t + 0.05) * (y1 - y0)], fill=COLOURS[k % 6], width=2)
                d.line([x1, y0 + t * (y1 - y0), x1, y0 + (t + 0.05) * (y1 - y0)], fill=COLOURS[k % 6], width=2)
        else:
            d.rectangle([x0, y0, x1, y1], outline=COLOURS[k % 6], width=2)
    return im


def preview(shards: Path, out: Path, loader: LoaderConfig, augment: AugmentConfig, samples: int = 4, seed: int = 0) -> Path:
    """Draw the figure (module docstring) of `samples` samples of the shard set `shards` to `out`."""
    import torch

    from train.augment import (
        AugmentConfig, apply_prc, apply_prm, apply_rbj, compose, depositioning_boxes, sample_prc,
        sample_prm, sample_rbj, sample_shift, shift_px,
    )
    from train.backgrounds import backgrounds
    from train.methods import prepare
    from pipeline.shardset import shards as read_index
    from train.stream import LoaderConfig, make_stream

    found, total = read_index(shards)
    cfg = LoaderConfig(**{**loader.__dict__, "batch_size": samples, "workers": 0, "resampled": False})
    batch = prepare(next(iter(make_stream(found, cfg, seed=seed, total_samples=total))), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    aug = AugmentConfig(**{**augment.__dict__, "prc_p": 1.0, "prm_p": 1.0})   # show every augmentation
    x1, x2, valid, b1, b2 = batch["x1"], batch["x2"], batch["valid"], batch["boxes1"], batch["boxes2"]
    bg = backgrounds(x1, 3, g)
    prc1 = apply_prc(x1, b1, sample_prc(b1, valid, aug, g))
    prm1 = apply_prm(prc1, sample_prm(b1, valid, aug, g), bg[0] if aug.prm_fill == "background" else None)
    rbj1 = apply_rbj(b1, sample_rbj(b1, aug, g))
    H, W = x2.shape[-2:]
    t = sample_shift(b2, valid, H, W, g, aug.shift)
    b3, valid3 = depositioning_boxes(b2, valid, t, H, W, aug.shift_min_visible)
    x3, mask = compose(x2, b3, valid3, bg[2], t, sample_prc(b3, valid3, aug, g))
    titles = TITLES[:-1] + [f"x3, shift_px {float(shift_px(t)):.1f}"]

    size = x1.shape[-1]
    tiles = []
    for i in range(x1.shape[0]):
        v = valid[i]
        row = [
            draw_boxes(to_image(x1[i]), b1[i], v),
            draw_boxes(to_image(x2[i]), b2[i], v),
            draw_boxes(to_image(batch["x2s"][i]).resize((size, size), Image.NEAREST), batch["boxes2s"][i], v, scale=2.0),
            to_image(prc1[i]),
            to_image(prm1[i]),
            draw_boxes(draw_boxes(to_image(x1[i]), b1[i], v), rbj1[i], v, dashed=True),
            Image.fromarray((mask[i].numpy() * 255).astype(np.uint8)).convert("RGB"),
            draw_boxes(to_image(x3[i]), b3[i], valid3[i]),
        ]
        ImageDraw.Draw(row[-1]).text((3, size - 12), f"|t| {float(t[i].float().norm()):.0f}px", fill=(255, 255, 255))
        tiles.append(row)
    zoom = max(1, 128 // size)          # small embedded views are drawn at least 128 px wide
    tiles = [[im.resize((size * zoom, size * zoom), Image.NEAREST) for im in row] for row in tiles]
    size *= zoom
    pad, head = 4, 18
    grid = Image.new("RGB", (len(titles) * (size + pad), head + len(tiles) * (size + pad)), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    for c, title in enumerate(titles):
        d.text((c * (size + pad) + 4, 3), title, fill=(0, 0, 0))
    for r, row in enumerate(tiles):
        for c, im in enumerate(row):
            grid.paste(im, (c * (size + pad), head + r * (size + pad)))
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m train.preview", __doc__)
    p.add_argument("--shards", required=True, help="shard set to draw samples from: a folder or URL (e.g. data/shards)")
    p.add_argument("--out", required=True, type=Path, help="PNG to write (e.g. reports/preview.png)")
    p.add_argument("--samples", type=int, default=4, help="samples drawn, one row each")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream and the augmentations")
    p.add_argument("--params", type=Path, help="params.yaml (loader views, methods.d3ssl.augment); "
                   "default: the code's defaults")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    from train.methods import DEFAULTS
    from train.pretrain import load_config, method_config

    loader = load_config(args.params).loader
    augment = method_config("d3ssl", args.params).augment if args.params else DEFAULTS["d3ssl"].augment
    preview(args.shards, args.out, loader, augment, args.samples, args.seed)
    log.info("wrote %s: %d samples x %d columns (views and region augmentations)", args.out, args.samples, len(TITLES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
