"""Coupling rate and mean cosine similarity: exact answers for a network whose receptive field is
one pixel, a drop for a zero-padded one, the synthetic images, the stage and its plots."""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from eval import plot_probes as plot_cli
from eval.probes import (
    ProbesConfig, coupling_images, coupling_rate, grid_image, main, mean_cosine, measure_coupling,
    measure_positional, pick_pairs, validate,
)

LAYERS = ("C2", "C3", "C4", "C5")


class ConvStages(nn.Module):
    """C2..C5 at strides 4, 8, 16, 32 from k x k convolutions with zero padding k // 2, so k = 1
    is a network whose receptive field is one pixel (no padding at all)."""

    def __init__(self, k: int, relu: bool = True, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        act = nn.ReLU() if relu else nn.Identity()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, width, k, 4, k // 2), act),
            nn.Sequential(nn.Conv2d(width, width, k, 2, k // 2), act, nn.Conv2d(width, width, k, 1, k // 2), act),
            nn.Sequential(nn.Conv2d(width, width, k, 2, k // 2), act, nn.Conv2d(width, width, k, 1, k // 2), act),
            nn.Sequential(nn.Conv2d(width, width, k, 2, k // 2), act, nn.Conv2d(width, width, k, 1, k // 2), act),
        ])
        self.strides = {"C2": 4, "C3": 8, "C4": 16, "C5": 32}

    def forward(self, x, layers=LAYERS):
        out = OrderedDict()
        for name, block in zip(LAYERS, self.blocks):
            x = block(x)
            if name in layers:
                out[name] = x
        return out


def _crops(n: int, size: int = 224, seed: int = 0, low: int = 0, high: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, (size, size, 3), dtype=np.uint8) for _ in range(n)]


CFG = ProbesConfig(batch_size=2)


def test_one_pixel_receptive_field_gives_cr_and_mcs_exactly_one():
    net = ConvStages(1).eval()
    crops = _crops(6)
    cr = measure_coupling(net, crops[:3], crops[3:], [True, False, True], CFG, "cpu")
    mcs = measure_positional(net, crops[:3], CFG, "cpu")
    assert set(cr) == set(mcs) == set(LAYERS)
    for name in LAYERS:
        assert cr[name] == pytest.approx(1.0, abs=1e-12)
        assert mcs[name] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_zero_padding_lowers_mcs_more_with_depth(seed):
    # Bright objects: the zero padding at the image border differs most from them.
    crops = _crops(3, seed=1, low=180)
    mcs = measure_positional(ConvStages(5, relu=False, seed=seed).eval(), crops, CFG, "cpu")
    assert all(mcs[n] < 1 - 1e-5 for n in LAYERS)
    assert mcs["C2"] > mcs["C3"] > mcs["C4"] > mcs["C5"]
    assert mcs["C5"] < 0.995


def test_a_wide_receptive_field_couples_neighbours():
    # 5x5 convolutions see across the A|B border: CR leaves 1, where the 1x1 network stays at 1.
    a, b = _crops(3, seed=2, low=180), _crops(3, seed=3, high=60)
    cr = measure_coupling(ConvStages(5, relu=False).eval(), a, b, [True, False, True], CFG, "cpu")
    assert max(abs(v - 1.0) for v in cr.values()) > 1e-2
    cr1 = measure_coupling(ConvStages(1, relu=False).eval(), a, b, [True, False, True], CFG, "cpu")
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in cr1.values())


def test_coupling_images_place_a_identically_and_b_beside_it():
    a, b = _crops(2, size=64)
    one, two, box_a, box_b = coupling_images(a, b, 160, a_left=False)
    x1, y1, x2, y2 = box_a.astype(int)
    assert np.array_equal(one[y1:y2, x1:x2], a) and np.array_equal(two[y1:y2, x1:x2], a)
    bx1, by1, bx2, by2 = box_b.astype(int)
    assert np.array_equal(one[by1:by2, bx1:bx2], b) and bx2 == x1 and by1 == y1     # B touches A's left side
    rest = np.ones(one.shape[:2], bool)
    rest[y1:y2, x1:x2] = False
    assert not two[rest].any()                                       # image 2: black outside A
    rest[by1:by2, bx1:bx2] = False
    assert not one[rest].any()                                       # image 1: black outside A and B
    assert x1 % 32 == 0 and y1 % 32 == 0 and bx1 % 32 == 0
    with pytest.raises(ValueError, match="canvas"):
        coupling_images(a, b, 100, a_left=True)


def test_grid_image_cells_are_the_crop():
    crop = _crops(1, size=32)[0]
    grid, boxes = grid_image(crop)
    assert grid.shape == (96, 96, 3) and boxes.shape == (9, 4)
    assert boxes[4].tolist() == [32, 32, 64, 64]
    for x1, y1, x2, y2 in boxes.astype(int):
        assert np.array_equal(grid[y1:y2, x1:x2], crop)


def test_metric_formulas():
    a1 = np.array([[1.0, 0.0], [1.0, 1.0]])
    b1 = np.array([[1.0, 1.0], [0.0, 1.0]])
    a2 = np.array([[1.0, 0.0], [0.0, 1.0]])
    # cos(A1, B1) = (0.7071, 0.7071); cos(A2, B1) = (0.7071, 1): CR = 0.7071 / 0.8536
    assert coupling_rate(a1, a1, b1) == pytest.approx(1.0)
    assert coupling_rate(a1, a2, b1) == pytest.approx(np.sqrt(0.5) / np.mean([np.sqrt(0.5), 1.0]))
    cells = np.ones((2, 9, 3))
    assert mean_cosine(cells) == pytest.approx(1.0)
    cells[0, 0] = [1.0, -1.0, 0.0]           # one of 16 (object, cell) pairs orthogonal to the centre
    assert mean_cosine(cells) == pytest.approx(1 - 1 / 16)


def test_pairs_have_different_categories_and_config_is_checked():
    category = np.array([1, 1, 1, 2, 3])
    a, b = pick_pairs(category, 50, np.random.default_rng(0))
    assert (category[a] != category[b]).all()
    with pytest.raises(ValueError):
        pick_pairs(np.array([4, 4]), 3, np.random.default_rng(0))
    strides = {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
    with pytest.raises(ValueError, match="multiple"):
        validate(ProbesConfig(object_size=200), strides)
    with pytest.raises(ValueError, match="C6"):
        validate(ProbesConfig(layers=("C5", "C6")), strides)


def test_probes_stage_and_plots(tiny_synth, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("probes:\n  pairs: 3\n  objects: 2\n  object_size: 64\n  canvas: 160\n  min_object_size: 16\n")
    outs = []
    for name, seed_arch in (("r18", "resnet18"), ("r34", "resnet34")):
        out = tmp_path / f"{name}.json"
        assert main(["--backbone", "random", "--arch", seed_arch, "--coco-root", str(tiny_synth / "coco"),
                     "--out", str(out), "--params", str(params), "--name", name, "--device", "cpu",
                     "--plots", str(tmp_path / name)]) == 0
        r = json.loads(out.read_text())
        assert list(r["cr"]) == list(r["mcs"]) == list(LAYERS)
        assert all(np.isfinite(v) and v > 0 for v in [*r["cr"].values(), *r["mcs"].values()])
        assert all(v <= 1 + 1e-9 for v in r["mcs"].values())
        assert (tmp_path / name / "cr.png").stat().st_size > 1000
        outs.append(str(out))
    assert plot_cli.main([*outs, "--out", str(tmp_path / "both")]) == 0
    for metric in ("cr", "mcs"):
        assert (tmp_path / "both" / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
