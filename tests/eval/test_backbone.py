"""Backbone loading (strict, fc ignored, 'random' seeded, nothing downloaded) and region pooling."""
from __future__ import annotations

import pytest
import torch
import torchvision

from eval.backbone import (
    REGION_FEATURES, ResNetStages, build_resnet, pool_boxes, region_feature, resize_shape,
)


def test_random_backbone_is_seeded_and_offline():
    a = build_resnet("resnet18", "random", seed=3).state_dict()
    b = build_resnet("resnet18", "random", seed=3).state_dict()
    c = build_resnet("resnet18", "random", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_state_dict_round_trip_without_fc(tmp_path):
    net = build_resnet("resnet18", "random", seed=1)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "backbone.pth")
    loaded = build_resnet("resnet18", tmp_path / "backbone.pth", seed=9).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_fc_keys_are_ignored_but_everything_else_is_strict(tmp_path):
    state = torchvision.models.resnet18(weights=None, num_classes=7).state_dict()   # fc of another size
    torch.save(state, tmp_path / "with_fc.pth")
    build_resnet("resnet18", tmp_path / "with_fc.pth")
    missing = dict(state)
    del missing["layer2.0.conv1.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="layer2.0.conv1.weight"):
        build_resnet("resnet18", tmp_path / "missing.pth")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "prefixed.pth")
    with pytest.raises(ValueError, match="does not match"):
        build_resnet("resnet18", tmp_path / "prefixed.pth")
    with pytest.raises(ValueError, match="does not match"):
        build_resnet("resnet34", tmp_path / "with_fc.pth")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="plain ResNet state_dict"):
        build_resnet("resnet18", tmp_path / "wrapped.pth")
    with pytest.raises(FileNotFoundError):
        build_resnet("resnet18", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="resnet18"):
        build_resnet("vgg16", "random")


def test_stages_shapes_and_region_features():
    stages = ResNetStages(build_resnet("resnet18", "random")).eval()
    x = torch.randn(2, 3, 128, 96)
    maps = stages(x)
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == {
        "C2": (64, 32, 24), "C3": (128, 16, 12), "C4": (256, 8, 6), "C5": (512, 4, 3)}
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 20.0, 90.0, 120.0]]), torch.tensor([[5.0, 5.0, 50.0, 40.0]])]
    with torch.no_grad():
        for name in REGION_FEATURES:
            assert region_feature(name)(stages, x, boxes).shape == (3, 512)
    with pytest.raises(ValueError, match="c5_roialign7"):
        region_feature("c5_roialign8")


def test_pool_boxes_is_the_cell_mean_on_the_grid():
    # Boxes whose sides are 7 cells and start on a cell edge: every RoIAlign sample is a cell centre.
    fmap = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(1, 2, 16, 16) ** 1.5
    box = torch.tensor([[2 * 32.0, 3 * 32.0, 9 * 32.0, 10 * 32.0]])           # cells x 2..8, y 3..9 at stride 32
    got = pool_boxes(fmap, [box], 32, 7)
    want = fmap[0, :, 3:10, 2:9].mean(dim=(1, 2))
    assert torch.allclose(got[0], want, rtol=1e-6)


def test_resize_shape():
    assert resize_shape(480, 640, 320, 533) == (320, 427)
    assert resize_shape(100, 1000, 320, 533) == (53, 533)


def test_eval_region_head_is_the_pretraining_one():
    """c4_roialign14_res5 of an exported backbone gives the features the pre-training region
    encoder computed (before its projector), box for box."""
    from train.model import RegionEncoder

    torch.manual_seed(0)
    enc = RegionEncoder("resnet18", proj_dim=8).eval()
    enc.projector = torch.nn.Identity()
    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(enc.backbone_state_dict(), strict=False)
    stages = ResNetStages(net).eval()
    x = torch.randn(2, 3, 96, 128)
    boxes = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [10.0, 20.0, 90.0, 80.0]],
                          [[5.0, 5.0, 120.0, 90.0], [0.0, 0.0, 1.0, 1.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        want = enc.regions(x, boxes, valid)
        got = region_feature("c4_roialign14_res5")(stages, x, [boxes[0], boxes[1, :1]])
    assert want.shape == got.shape == (3, 512)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_evaluation_normalises_images_as_training_does():
    """The same pixels reach the backbone as the same input in pre-training and in evaluation."""
    import train.methods
    from eval.backbone import to_input

    pixels = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    trained = train.methods.prepare({"x1": pixels}, torch.device("cpu"))["x1"]
    torch.testing.assert_close(to_input(pixels), trained, rtol=1e-5, atol=1e-5)
