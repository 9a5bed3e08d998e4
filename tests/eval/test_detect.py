"""Detection fine-tuning: it learns on a tiny generated set (AP far above the untrained heads'),
the data, the schedule, the presets and the C4 structure."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.backbone import build_resnet
from eval.detect import (
    PRESETS, CocoDetection, DetectConfig, Schedule, build_detector, evaluate, lr_factor, main, preset, train,
)

CLASSES = {1: "square", 2: "disc"}


def make_shapes_set(root: Path, split: str, n: int, seed: int, size: int = 128) -> tuple[Path, Path]:
    """n images of red squares (category 1) and blue discs (category 2) on grey noise, with their
    boxes and polygons in a COCO instances file."""
    rng = np.random.default_rng(seed)
    images_dir = root / split
    images_dir.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    images, anns = [], []
    for i in range(n):
        im = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
        taken = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(1, 3))):
            for _try in range(20):
                s = int(rng.integers(28, 52))
                x, y = (int(v) for v in rng.integers(0, size - s, 2))
                if not taken[y:y + s, x:x + s].any():
                    break
            taken[y:y + s, x:x + s] = True
            cat = int(rng.integers(1, 3))
            if cat == 1:
                im[y:y + s, x:x + s] = (220, 30, 30)
                poly = [x, y, x + s, y, x + s, y + s, x, y + s]
            else:
                r = s / 2
                disc = (xx - x - r + 0.5) ** 2 + (yy - y - r + 0.5) ** 2 <= r * r
                im[disc] = (30, 30, 220)
                t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
                poly = np.stack([x + r + r * np.cos(t), y + r + r * np.sin(t)], 1).ravel().tolist()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, s, s],
                         "area": float(s * s), "iscrowd": 0, "segmentation": [poly]})
        Image.fromarray(im).save(images_dir / f"{i:04d}.png")
        images.append({"id": i + 1, "file_name": f"{i:04d}.png", "width": size, "height": size})
    ann_file = root / f"{split}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": k, "name": v} for k, v in CLASSES.items()]}))
    return ann_file, images_dir


TINY = Schedule(min_size_train=(128,), min_size_test=128, max_size=128, ims_per_batch=4, base_lr=0.02,
                max_iter=60, steps=(50,), warmup_iters=10, masks=False, precise_bn_iters=4,
                anchor_sizes=(16, 32, 64), rpn_pre_nms_train=500, rpn_post_nms_train=100,
                rpn_pre_nms_test=300, rpn_post_nms_test=50, roi_per_image=32, pooler_resolution=8)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_set(root, "train", 24, seed=0), make_shapes_set(root, "val", 8, seed=1)


def test_fine_tuning_learns(shapes):
    (train_ann, train_dir), (val_ann, val_dir) = shapes
    torch.manual_seed(0)
    train_set = CocoDetection(train_ann, train_dir, train=True, with_masks=False)
    val_set = CocoDetection(val_ann, val_dir, train=False, with_masks=False, category_ids=train_set.category_ids)
    model = build_detector(build_resnet("resnet18", "random", seed=0), 2, TINY)
    cfg = DetectConfig(workers=0, log_every=20)
    before = evaluate(model, val_set, TINY, torch.device("cpu"))["bbox"]
    rows = train(model, train_set, TINY, cfg, torch.device("cpu"), log=lambda *_: None)
    after = evaluate(model, val_set, TINY, torch.device("cpu"))["bbox"]
    assert [r["iter"] for r in rows] == [20, 40, 60]
    assert before["AP50"] < 5.0
    assert after["AP50"] > before["AP50"] + 30.0, (before, after)
    assert after["AP"] > before["AP"] + 10.0, (before, after)


def test_dataset_targets_flip_and_masks(shapes):
    (train_ann, train_dir), _ = shapes
    plain = CocoDetection(train_ann, train_dir, train=False, with_masks=True)
    coco_anns = plain.coco.imgToAnns[plain.ids[0]]
    x, t = plain[0]
    assert x.shape == (3, 128, 128) and 0.0 <= x.min() and x.max() <= 1.0
    want = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in coco_anns]
    assert t["boxes"].tolist() == want
    assert t["labels"].tolist() == [a["category_id"] for a in coco_anns]       # ids 1, 2 map to labels 1, 2
    assert t["masks"].shape == (len(want), 128, 128) and t["masks"].sum() > 0
    flipping = CocoDetection(train_ann, train_dir, train=True, with_masks=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        xf, tf = flipping[0]
        flipped = not torch.equal(xf, x)
        seen.add(flipped)
        if flipped:
            assert torch.equal(xf, x.flip(-1))
            assert torch.allclose(tf["boxes"][:, [0, 2]], 128 - t["boxes"][:, [2, 0]])
            assert torch.equal(tf["masks"], t["masks"].flip(-1))
    assert seen == {True, False}


def test_crowd_boxes_are_not_trained_on(tmp_path):
    ann, images = make_shapes_set(tmp_path, "s", 2, seed=3)
    data = json.loads(ann.read_text())
    for a in data["annotations"]:
        a["iscrowd"] = int(a["image_id"] == 1)
    ann.write_text(json.dumps(data))
    train_set = CocoDetection(ann, images, train=True, with_masks=False)
    assert train_set.ids == [2]                                   # image 1 has only crowd boxes
    assert len(CocoDetection(ann, images, train=False, with_masks=False)) == 2


def test_c4_structure_and_mask_head_share_res5():
    sch = replace(TINY, masks=True)
    model = build_detector(build_resnet("resnet18", "random"), 5, sch)
    assert model.backbone.out_channels == 256                              # C4 of ResNet-18
    res5 = model.roi_heads.box_head[0]
    assert model.roi_heads.mask_head is res5                               # shared, as detectron2's Res5ROIHeads
    assert isinstance(res5[1], torch.nn.BatchNorm2d)                       # MoCo's extra norm after res5
    assert model.roi_heads.box_predictor.cls_score.out_features == 6
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"}


def test_freeze_at_freezes_stem_and_res2():
    model = build_detector(build_resnet("resnet18", "random"), 2, replace(TINY, freeze_at=2))
    body = model.backbone
    assert not any(p.requires_grad for p in body[0].parameters())          # conv1
    assert not any(p.requires_grad for p in body[4].parameters())          # layer1
    assert all(p.requires_grad for p in body[5].parameters())              # layer2
    assert type(body[1]).__name__ == "FrozenBatchNorm2d"


def test_lr_schedule():
    s = replace(TINY, base_lr=1.0, warmup_iters=10, warmup_factor=0.001, steps=(50, 55), gamma=0.1)
    assert lr_factor(0, s) == pytest.approx(0.001)
    assert lr_factor(5, s) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, s) == 1.0 and lr_factor(49, s) == 1.0
    assert lr_factor(50, s) == pytest.approx(0.1) and lr_factor(59, s) == pytest.approx(0.01)


def test_presets():
    assert PRESETS["coco_1x"].max_iter == 90000 and PRESETS["coco_1x"].steps == (60000, 80000)
    assert PRESETS["coco_1x"].masks and not PRESETS["voc_24k"].masks
    assert PRESETS["voc_24k"].max_iter == 24000 and PRESETS["voc_24k"].steps == (18000, 22000)
    assert all(p.ims_per_batch == 16 and p.base_lr == 0.02 for n, p in PRESETS.items() if n in ("coco_1x", "voc_24k"))
    with pytest.raises(ValueError, match="coco_1x.*short"):
        preset("coco_2x")


def test_unknown_preset_on_the_command_line(tmp_path):
    with pytest.raises(ValueError, match="valid"):
        main(["--backbone", "random", "--arch", "resnet18", "--train-ann", "a.json", "--train-images", ".",
              "--val-ann", "b.json", "--val-images", ".", "--out", str(tmp_path / "d"), "--preset", "long"])


def test_detect_stage_writes_metrics(shapes, tmp_path):
    (train_ann, train_dir), (val_ann, val_dir) = shapes
    params = tmp_path / "params.yaml"
    params.write_text("detect:\n  preset: short\n  workers: 0\n  log_every: 1\n")
    import eval.detect as detect

    tiny = replace(TINY, max_iter=2, precise_bn_iters=1, masks=True)
    old = dict(detect.PRESETS)
    detect.PRESETS["short"] = tiny
    try:
        assert main(["--backbone", "random", "--arch", "resnet18", "--train-ann", str(train_ann),
                     "--train-images", str(train_dir), "--val-ann", str(val_ann), "--val-images", str(val_dir),
                     "--out", str(tmp_path / "det"), "--params", str(params), "--device", "cpu"]) == 0
    finally:
        detect.PRESETS.clear()
        detect.PRESETS.update(old)
    m = json.loads((tmp_path / "det" / "metrics.json").read_text())
    assert set(m["bbox"]) >= {"AP", "AP50", "AP75"} and set(m["segm"]) >= {"AP", "AP50", "AP75"}
    assert m["preset"] == "short" and m["schedule"]["max_iter"] == 2 and m["classes"] == 2
    log = (tmp_path / "det" / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("iter,lr,loss") and len(log) == 3
    assert "time_s" not in m          # seconds are printed: DVC hashes this file


def _ddp_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    import os

    import eval.detect as detect

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    detect.PRESETS["short"] = replace(TINY, max_iter=3, precise_bn_iters=1, ims_per_batch=4)
    detect.main(argv)


def test_two_process_ddp_fine_tuning(shapes, tmp_path):
    """torchrun's environment, 2 CPU processes (gloo): DDP, split batches and the evaluation
    sharded over the processes and gathered on rank 0."""
    import socket

    import torch.multiprocessing as mp

    (train_ann, train_dir), (val_ann, val_dir) = shapes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = tmp_path / "params.yaml"
    params.write_text("detect:\n  preset: short\n  workers: 0\n  log_every: 1\n")
    argv = ["--backbone", "random", "--arch", "resnet18", "--train-ann", str(train_ann), "--train-images",
            str(train_dir), "--val-ann", str(val_ann), "--val-images", str(val_dir), "--out", str(tmp_path / "det"),
            "--params", str(params), "--device", "cpu"]
    mp.spawn(_ddp_worker, args=(2, port, argv), nprocs=2, join=True)
    m = json.loads((tmp_path / "det" / "metrics.json").read_text())
    assert m["processes"] == 2 and m["val_images"] == 8
    assert m["detections"] > 0 and set(m["bbox"]) >= {"AP", "AP50", "AP75"}
