"""The supervised ceiling trains the pre-training backbone with labels and exports it like a run."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import contracts
from train.pretrain import PretrainConfig
from train.stream import LoaderConfig
from train.supervised import load_labelled, main, steps_of, train_supervised
from train.views import ViewConfig


def labelled_set(root, n=12):
    """Images with two objects each: a bright square (category 1) and a dark one (category 2)."""
    rng = np.random.default_rng(0)
    images, boxes = [], []
    for i in range(n):
        im = np.full((48, 64, 3), 128, np.uint8)
        x = int(rng.integers(0, 20))
        im[8:24, x:x + 16] = 250
        im[28:44, x + 30:x + 46] = 5
        path = root / f"im{i}.jpg"
        Image.fromarray(im).save(path)
        images.append({"key": f"im{i}", "source": "t", "image_id": str(i), "path": str(path), "width": 64, "height": 48})
        boxes += [{"key": f"im{i}", "label": "a", "category_id": 1, "x1": x, "y1": 8, "x2": x + 16, "y2": 24, "is_group": False},
                  {"key": f"im{i}", "label": "b", "category_id": 2, "x1": x + 30, "y1": 28, "x2": x + 46, "y2": 44, "is_group": False},
                  {"key": f"im{i}", "label": "c", "category_id": -1, "x1": 0, "y1": 0, "x2": 8, "y2": 8, "is_group": False}]
    contracts.write_table(pa.Table.from_pylist(images), root / "images.parquet", contracts.IMAGES)
    contracts.write_table(pa.Table.from_pylist(boxes), root / "boxes.parquet", contracts.BOXES)
    return root / "images.parquet", root / "boxes.parquet"


def test_supervised_learns_the_labels_and_exports_a_torchvision_backbone(tmp_path):
    images, boxes = labelled_set(tmp_path)
    cfg = PretrainConfig(arch="resnet18", roi_size=4, epochs=30, base_lr=2.0, warmup_epochs=0.0,
                         loader=LoaderConfig(batch_size=4, views=ViewConfig(size=64, small_size=32)))
    assert steps_of(cfg, 12) == 90 and steps_of(replace(cfg, max_steps=7), 12) == 7
    net = train_supervised(images, boxes, cfg).eval()
    x = torch.zeros(1, 3, 64, 64)
    x[:, :, 8:24, 0:16], x[:, :, 28:44, 30:46] = 2.0, -2.0
    logits = net.regions(x, torch.tensor([[[0.0, 8, 16, 24], [30, 28, 46, 44]]]), torch.ones(1, 2, dtype=torch.bool))
    assert logits.shape == (2, 2)                               # categories 1 and 2 only (-1 is no class)
    assert logits.argmax(1).tolist() == [0, 1]


def test_the_stage_writes_an_export_that_loads_into_torchvision(tmp_path):
    images, boxes = labelled_set(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  arch: resnet18\n  roi_size: 2\n  epochs: 1\n  max_steps: 2\n"
                      "loader:\n  batch_size: 4\n  views:\n    size: 32\n    small_size: 16\n")
    assert main(["--params", str(params), "--images", str(images), "--boxes", str(boxes), "--seed", "1",
                 "--out", str(tmp_path / "export")]) == 0
    state = torch.load(tmp_path / "export" / "backbone.pth", weights_only=True)
    missing, unexpected = torchvision.models.resnet18(weights=None).load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_an_image_whose_size_disagrees_with_its_table_row_is_an_error_naming_it(tmp_path):
    images, boxes = labelled_set(tmp_path, n=2)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "im1.jpg")     # the table says 64x48
    with pytest.raises(ValueError, match=r"images.parquet: row key 'im1', .*im1.jpg: size_mismatch: file is 40x40, "
                                         r"the images table says 64x48; rebuild the images table"):
        load_labelled(images, boxes, 32)
