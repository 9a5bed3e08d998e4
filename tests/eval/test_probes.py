"""Coupling rate and mean cosine similarity: exact answers for a network whose receptive field is
one pixel (and the settings where that holds), a drop for a zero-padded one, the synthetic images,
the stage on OpenImage-MINI with its one-pixel control, and its plots."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from eval import plot_probes as plot_cli
from eval.backbone import STRIDES, ResNetStages, build_resnet
from eval.probes import (
    OnePixelStages, ProbesConfig, coupling_images, coupling_rate, grid_image, main, mean_cosine,
    measure_coupling, measure_positional, pick_pairs, read_objects, run_probes, validate,
)
from tests.eval.nets import ConvStages

LAYERS = ("C2", "C3", "C4", "C5")


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
    one, two, box_a, box_b = coupling_images(a, b, 160, a_left=False, step=32)
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
        coupling_images(a, b, 100, a_left=True, step=32)


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
    with pytest.raises(ValueError, match="multiple"):
        validate(ProbesConfig(object_size=200), STRIDES)
    with pytest.raises(ValueError, match="C6"):
        validate(ProbesConfig(layers=("C5", "C6")), STRIDES)


RESNET18_CHANNELS = {"C2": 64, "C3": 128, "C4": 256, "C5": 512}


@pytest.mark.parametrize("object_size,pool_size,canvas", [(224, 7, 448), (96, 3, 192), (64, 2, 128), (128, 1, 256)])
def test_the_control_is_one_at_every_valid_size(object_size, pool_size, canvas):
    cfg = ProbesConfig(object_size=object_size, pool_size=pool_size, canvas=canvas, batch_size=3)
    validate(cfg, STRIDES)
    net = OnePixelStages(STRIDES, RESNET18_CHANNELS).eval()
    crops = _crops(6, size=object_size, seed=4)
    cr = measure_coupling(net, crops[:3], crops[3:], [True, False, True], cfg, "cpu")
    mcs = measure_positional(net, crops[:3], cfg, "cpu")
    for name in LAYERS:
        assert cr[name] == pytest.approx(1.0, abs=1e-6) and mcs[name] == pytest.approx(1.0, abs=1e-6)


def test_off_the_grid_the_control_leaves_one_and_validate_says_why():
    # 96 px with pool_size 7: 3 C5 cells in 7 bins, the outer samples read 29% of the next cell.
    cfg = ProbesConfig(object_size=96, pool_size=7, canvas=192, batch_size=3)
    with pytest.raises(ValueError, match=r"probes\.object_size 96 .*pool_size.*\(7 x 32 = 224 at C5.*Use object_size 224"):
        validate(cfg, STRIDES)
    net = OnePixelStages(STRIDES, RESNET18_CHANNELS).eval()
    a, b = _crops(3, size=96, seed=5, low=180), _crops(3, size=96, seed=6, high=60)
    ramp = np.repeat(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], 96, 0)     # dark left, bright right
    ramp = [np.concatenate([ramp, ramp[:, ::-1], np.full_like(ramp, 128)], axis=2)]
    cr = measure_coupling(net, a, b, [True, False, True], cfg, "cpu")
    mcs = measure_positional(net, ramp, cfg, "cpu")
    assert abs(cr["C5"] - 1) > 1e-3 and mcs["C5"] < 1 - 1e-4        # both far outside the 1e-6 of the grid
    ok = ProbesConfig(object_size=96, pool_size=3, canvas=192, batch_size=3)          # the same on the grid
    assert measure_positional(net, ramp, ok, "cpu")["C5"] == pytest.approx(1.0, abs=1e-6)
    assert measure_coupling(net, a, b, [True, False, True], ok, "cpu")["C5"] == pytest.approx(1.0, abs=1e-6)
    # every probed layer is checked: 96 / (7 x 4) is not whole either
    with pytest.raises(ValueError, match=r"fails at \['C2', 'C3', 'C4', 'C5'\]"):
        validate(cfg, STRIDES)
    # only the coarsest probed stride counts: without C5, 96 = 3 x 32 is fine for pool_size 3 at C2..C4 too
    validate(ProbesConfig(layers=("C2", "C3", "C4"), object_size=96, pool_size=3, canvas=192), STRIDES)
    with pytest.raises(ValueError, match=r"probes\.canvas 200 .*multiple of the coarsest probed stride 32 \(use 224\)"):
        validate(ProbesConfig(object_size=96, pool_size=3, canvas=200), STRIDES)
    with pytest.raises(ValueError, match="at least twice"):
        validate(ProbesConfig(object_size=96, pool_size=3, canvas=160), STRIDES)


def test_the_control_has_the_backbones_interface():
    stages = ResNetStages(build_resnet("resnet18", "random"))
    net = OnePixelStages(stages.strides, stages.channels)
    x = torch.zeros(2, 3, 96, 128)
    out, ref = net(x, ("C3", "C5")), stages(x, ("C3", "C5"))
    assert list(out) == ["C3", "C5"] and all(out[n].shape == ref[n].shape for n in out)
    assert all(m.kernel_size == (1, 1) for m in net.modules() if isinstance(m, nn.Conv2d))


def test_probes_stage_on_openimage_mini_with_its_control_and_plots(tiny_synth, tiny_openimage_mini, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("probes:\n  pairs: 3\n  objects: 2\n  object_size: 64\n  pool_size: 2\n  canvas: 128\n"
                      "  min_object_size: 16\n")
    mini = tiny_openimage_mini
    data = {"r18": ["--images", str(mini / "images.parquet"), "--boxes", str(mini / "boxes.parquet")],
            "r34": ["--coco-root", str(tiny_synth / "coco")]}     # COCO val2017 stays an option
    outs = []
    for name, arch in (("r18", "resnet18"), ("r34", "resnet34")):
        out = tmp_path / f"{name}.json"
        assert main(["--backbone", "random", "--arch", arch, *data[name], "--out", str(out), "--params", str(params),
                     "--name", name, "--device", "cpu", "--plots", str(tmp_path / name)]) == 0
        r = json.loads(out.read_text())
        assert list(r["cr"]) == list(r["mcs"]) == list(LAYERS)
        assert all(np.isfinite(v) and v > 0 for v in [*r["cr"].values(), *r["mcs"].values()])
        assert all(v <= 1 + 1e-9 for v in r["mcs"].values())
        # the one-pixel control, at the run's own settings on its own images
        assert list(r["control"]["cr"]) == list(r["control"]["mcs"]) == list(LAYERS)
        assert all(v == pytest.approx(1.0, abs=1e-6) for m in ("cr", "mcs") for v in r["control"][m].values())
        assert r["settings"]["pool_size"] == 2 and r["categories"] >= 2
        assert (tmp_path / name / "cr.png").stat().st_size > 1000
        outs.append(str(out))
    assert json.loads((tmp_path / "r18.json").read_text())["objects_from"].endswith("boxes.parquet")
    assert "COCO val2017" in json.loads((tmp_path / "r34.json").read_text())["objects_from"]
    assert plot_cli.main([*outs, "--out", str(tmp_path / "both")]) == 0
    for metric in ("cr", "mcs"):
        assert (tmp_path / "both" / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_objects_come_from_openimage_mini_labels_without_group_boxes(tiny_openimage_mini):
    from pipeline import contracts as C

    mini = tiny_openimage_mini
    objs = read_objects(mini / "images.parquet", mini / "boxes.parquet", min_object_size=16)
    boxes = C.read_table(mini / "boxes.parquet", C.BOXES).to_pandas()
    side = np.minimum(boxes.x2 - boxes.x1, boxes.y2 - boxes.y1)
    want = boxes[~boxes.is_group & (side >= 16)]
    assert len(objs) == len(want) > 0 and sorted(objs.label) == sorted(want.label)
    assert all(str(lab).startswith("/m/") for lab in objs.label)          # OpenImages MIDs, not COCO names
    assert all(p.endswith(".jpg") and "/openimages/train/" in p for p in objs.path)
    # the pairs differ in label, the crops come from these objects, and the control runs beside
    cfg = ProbesConfig(pairs=2, objects=2, object_size=64, pool_size=2, canvas=128, layers=("C5",))
    r = run_probes(OnePixelStages(STRIDES, RESNET18_CHANNELS), objs, cfg, "cpu")
    assert r["cr"]["C5"] == pytest.approx(1.0, abs=1e-6) and r["control"]["mcs"]["C5"] == pytest.approx(1.0, abs=1e-6)
    assert r["eligible_objects"] == len(want)


def test_the_cli_needs_one_source_of_objects_and_a_valid_size(tiny_openimage_mini, tmp_path):
    mini = tiny_openimage_mini
    base = ["--backbone", "random", "--arch", "resnet18", "--out", str(tmp_path / "p.json"), "--device", "cpu"]
    for extra in ([], ["--images", str(mini / "images.parquet")],
                  ["--images", str(mini / "images.parquet"), "--boxes", str(mini / "boxes.parquet"),
                   "--coco-root", str(tmp_path)]):
        with pytest.raises(SystemExit):
            main(base + extra)
    params = tmp_path / "params.yaml"
    params.write_text("probes:\n  object_size: 96\n  pool_size: 7\n  canvas: 192\n")
    with pytest.raises(ValueError, match="object_size 96"):
        main(base + ["--images", str(mini / "images.parquet"), "--boxes", str(mini / "boxes.parquet"),
                     "--params", str(params)])
    assert not (tmp_path / "p.json").exists()
