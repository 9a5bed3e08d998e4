"""The preview picture: its grid, each row showing its own sample's views, boxes drawn where the
stream put them, the mask column black and white; and the command line."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.train.test_pretrain import write_params
from pipeline import shardset
from train import preview as pv
from train.methods import DEFAULTS
from train.stream import LoaderConfig, make_stream
from train.views import ViewConfig

SIZE, SAMPLES, COLUMNS, PAD, HEAD = 64, 4, 8, 4, 18
TILE = SIZE * 2                                  # 64 px views are drawn 2x (at least 128 px wide)


def tile(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    y, x = HEAD + row * (TILE + PAD), col * (TILE + PAD)
    return grid[y:y + TILE, x:x + TILE]


@pytest.fixture(scope="module")
def picture(shards, tmp_path_factory):
    loader = LoaderConfig(batch_size=8, workers=0, views=ViewConfig(size=SIZE, small_size=SIZE // 2, num_proposals=2))
    out = tmp_path_factory.mktemp("preview") / "sub" / "preview.png"
    assert pv.preview(shards, out, loader, DEFAULTS["d3ssl"].augment, samples=SAMPLES, seed=3) == out
    urls, total = shardset.shards(shards)
    cfg = LoaderConfig(**{**loader.__dict__, "batch_size": SAMPLES, "resampled": False})
    batch = next(iter(make_stream(urls, cfg, seed=3, total_samples=total)))
    return np.asarray(Image.open(out).convert("RGB")).astype(int), batch


def test_the_grid_has_a_row_per_sample_and_a_column_per_step(picture):
    grid, _ = picture
    assert grid.shape == (HEAD + SAMPLES * (TILE + PAD), COLUMNS * (TILE + PAD), 3)
    assert (grid[:HEAD] < 128).any()                               # the column titles are written


def test_each_row_shows_its_samples_views_with_their_boxes(picture):
    grid, batch = picture
    for i in range(SAMPLES):
        for col, key in ((0, "x1"), (1, "x2")):
            want = np.repeat(np.repeat(batch[key][i].permute(1, 2, 0).numpy().astype(int), 2, 0), 2, 1)   # 2x
            got = tile(grid, i, col)
            same = (np.abs(got - want) <= 2).all(-1)
            assert same.mean() > 0.8, (i, key, same.mean())          # the view, less the drawn outlines
            # each proposal's left side is outlined in a proposal colour (later outlines may cover it)
            colours = np.array([pv.COLOURS[k] for k in range(batch["valid"].shape[1]) if batch["valid"][i, k]])
            for k in np.flatnonzero(batch["valid"][i].numpy()):
                x0, y0, x1, y1 = (int(round(float(c) * 2)) for c in batch[f"boxes{col + 1}"][i, k])
                x0, y0 = min(max(x0, 0), TILE - 2), min(max(y0, 0), TILE - 1)
                edge = got[y0:min(y1, TILE), x0:x0 + 2].reshape(-1, 3)
                drawn = (edge[:, None, :] == colours[None]).all(-1).any(-1)
                assert drawn.mean() > 0.8, (i, key, k)
        mask = tile(grid, i, 6)
        assert set(np.unique(mask).tolist()) <= {0, 255} and (mask == 255).any()


def test_the_command_line_writes_the_picture(shards, tmp_path):
    params = write_params(tmp_path / "params.yaml")
    out = tmp_path / "p.png"
    assert pv.main(["--shards", str(shards), "--out", str(out), "--samples", "4", "--params", str(params)]) == 0
    im = Image.open(out)
    assert im.format == "PNG" and im.size == (COLUMNS * (TILE + PAD), HEAD + 4 * (TILE + PAD))
