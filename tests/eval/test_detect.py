"""Detection fine-tuning: it learns on a tiny generated set (AP far above the untrained heads'),
the data (the shared COCO box rule), the schedule, the presets and the C4 structure."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.backbone import build_resnet
from eval.detect import main
from eval.detection.coco_eval import evaluate
from eval.detection.data import CocoDetection
from eval.detection.engine import train
from eval.detection.model import build_detector
from eval.detection.schedule import DetectConfig, Schedule, lr_factor, preset, schedule_of

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
                rpn_pre_nms_test=300, rpn_post_nms_test=50, roi_per_image=16, pooler_resolution=8)
# roi_per_image 16 (the images hold 1-2 objects): res5 on the sampled RoIs is most of an iteration's
# CPU cost, so the RoI sample is what sizes these tests' time


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
    rows = train(model, train_set, TINY, cfg, torch.device("cpu"))
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


def test_targets_follow_the_readers_box_rule(tmp_path):
    """The boxes pipeline.readers keeps are the targets, and only they: a box reaching 5 px out
    is left out, one 0.5 px over the edge is clipped, a sub-pixel box is kept, a zero-width one
    is not; the masks stay with their boxes."""
    ann, images = make_shapes_set(tmp_path, "s", 1, seed=4)
    data = json.loads(ann.read_text())
    extra = [([120, 60, 13, 20], 1), ([100.5, 100, 28, 20], 2), ([40, 40, 0.5, 0.5], 1), ([70, 70, 0, 8], 2)]
    for bbox, cat in extra:
        x, y, w, h = bbox
        data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": 1, "category_id": cat,
                                    "bbox": bbox, "area": w * h, "iscrowd": 0,
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    ann.write_text(json.dumps(data))
    n_shapes = len(data["annotations"]) - len(extra)
    ds = CocoDetection(ann, images, train=False, with_masks=True)
    _, t = ds[0]
    assert t["boxes"][n_shapes:].tolist() == [[100.5, 100.0, 128.0, 120.0], [40.0, 40.0, 40.5, 40.5]]
    assert t["labels"][n_shapes:].tolist() == [2, 1]
    assert len(t["masks"]) == n_shapes + 2
    assert t["masks"][n_shapes][110, 110] == 1 and t["masks"][n_shapes][110, 90] == 0   # the clipped box's polygon


def test_a_read_only_decoded_image_is_not_shared_with_torch(shapes, monkeypatch):
    """The decoded image may be a read-only array (np.asarray of a PIL image): torch.from_numpy
    on it warns (once per process) and shares memory torch could write to."""
    import eval.detection.data as data

    (train_ann, train_dir), _ = shapes
    ds = CocoDetection(train_ann, train_dir, train=True, with_masks=True)
    load = data.load_rgb

    def read_only(path):
        a = load(path)
        a.flags.writeable = False
        return a

    from_numpy = torch.from_numpy

    def checked(a):
        assert a.flags.writeable, "torch.from_numpy on a read-only array"
        return from_numpy(a)

    monkeypatch.setattr(data, "load_rgb", read_only)
    monkeypatch.setattr(torch, "from_numpy", checked)
    x, t = ds[0]
    assert x.shape == (3, 128, 128) and len(t["masks"]) == len(t["boxes"])


def test_a_missing_image_file_is_named(tmp_path):
    ann, images = make_shapes_set(tmp_path, "s", 2, seed=5)
    (images / "0001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 listed image.*0001\.png"):
        CocoDetection(ann, images, train=False, with_masks=False)


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


def test_max_iter_cuts_the_schedule():
    cut = schedule_of(DetectConfig(preset="coco_1x", max_iter=500))
    assert (cut.max_iter, cut.steps, cut.warmup_iters) == (500, (), 500)
    cut = schedule_of(DetectConfig(preset="voc_24k", max_iter=20000))
    assert (cut.max_iter, cut.steps, cut.warmup_iters) == (20000, (18000,), 100)
    assert schedule_of(DetectConfig(preset="voc_24k")) == preset("voc_24k")
    with pytest.raises(ValueError, match="coco_1x.*short"):
        preset("coco_2x")


def test_unknown_preset_on_the_command_line(tmp_path):
    with pytest.raises(ValueError, match="valid"):
        main(["--backbone", "random", "--arch", "resnet18", "--train-ann", "a.json", "--train-images", ".",
              "--val-ann", "b.json", "--val-images", ".", "--out", str(tmp_path / "d"), "--preset", "long"])


def test_detect_stage_writes_metrics(shapes, tmp_path):
    (train_ann, train_dir), (val_ann, val_dir) = shapes
    params = tmp_path / "params.yaml"
    params.write_text("detect:\n  preset: short\n  workers: 0\n  log_every: 1\n  max_iter: 2\n")
    import eval.detect as detect

    tiny = replace(TINY, precise_bn_iters=1, masks=True)
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
    assert m["preset"] == "short" and m["classes"] == 2
    assert (m["schedule"]["max_iter"], m["schedule"]["steps"], m["schedule"]["warmup_iters"]) == (2, [], 2)
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
