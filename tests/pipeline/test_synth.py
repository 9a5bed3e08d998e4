"""The embedded data: deterministic, and in exactly the real COCO 2017 / OpenImages V6 layouts."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import contracts as C
from pipeline.categories import coco_categories, read_openimages_classes
from pipeline.readers import OPENIMAGES_HEADER, read_coco, read_openimages
from pipeline.synth import SynthConfig, build, draw_object, load_classes
from pipeline.synth_layouts import openimages_rows

REPO = Path(__file__).resolve().parents[2]


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_for_any_worker_count(tmp_path: Path):
    cfg = SynthConfig(images=24, seed=5)
    build(cfg, tmp_path / "a", workers=1, progress=False)
    build(cfg, tmp_path / "b", workers=2, progress=False)
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert len(a) > 24 and a == b
    build(SynthConfig(images=24, seed=6), tmp_path / "c", workers=2, progress=False)
    c = digest(tmp_path / "c")
    assert c["coco/annotations/instances_train2017.json"] != a["coco/annotations/instances_train2017.json"]


def test_coco_layout(tiny_synth: Path):
    from pycocotools.coco import COCO

    ann_dir = tiny_synth / "coco" / "annotations"
    seen_ids = set()
    for split in ("train2017", "val2017"):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_dir / f"instances_{split}.json"))
        doc = coco.dataset
        assert set(doc) >= {"info", "licenses", "images", "annotations", "categories"}
        assert [(c["id"], c["name"], c["supercategory"]) for c in doc["categories"]] == \
            [(c.id, c.name, c.supercategory) for c in coco_categories()]
        ids = [im["id"] for im in doc["images"]]
        assert not seen_ids & set(ids)
        seen_ids |= set(ids)
        per_image = Counter(a["image_id"] for a in doc["annotations"])
        for im in doc["images"]:
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            with Image.open(tiny_synth / "coco" / split / im["file_name"]) as f:
                assert f.format == "JPEG" and f.size == (im["width"], im["height"])
                f.load()  # decodes
            assert 3 <= per_image[im["id"]] <= 15
        for a in doc["annotations"]:
            im = coco.imgs[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= im["width"] and y + h <= im["height"]
            assert a["iscrowd"] == 0 and a["area"] > 0
            assert a["segmentation"] and all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
            mask = coco.annToMask(a)
            ys, xs = np.nonzero(mask)
            # The polygon covers the visible part that the box bounds.
            assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1 and ys.max() <= y + h
            assert abs(mask.sum() - a["area"]) <= 0.35 * a["area"] + 20
            assert a["category_id"] in coco.cats


def test_openimages_layout(tiny_synth: Path):
    oi = tiny_synth / "openimages"
    text = (oi / "oidv6-train-annotations-bbox.csv").read_text()
    assert text.splitlines()[0] == ",".join(OPENIMAGES_HEADER)
    assert (oi / "class-descriptions-boxable.csv").read_bytes() == \
        (REPO / "data_manifests" / "openimages" / "class-descriptions-boxable.csv").read_bytes()
    classes = read_openimages_classes(oi / "class-descriptions-boxable.csv")
    assert len(classes) == 601
    rows = list(csv.DictReader(io.StringIO(text)))
    files = {p.stem for p in (oi / "train").glob("*.jpg")}
    assert {r["ImageID"] for r in rows} == files
    assert [r["ImageID"] for r in rows] == sorted(r["ImageID"] for r in rows)
    for r in rows:
        assert re.fullmatch(r"[0-9a-f]{16}", r["ImageID"])
        assert r["LabelName"] in classes
        x0, x1, y0, y1 = (float(r[k]) for k in ("XMin", "XMax", "YMin", "YMax"))
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert r["Confidence"] == "1" and r["IsGroupOf"] in ("0", "1")
    for stem in list(files)[:10]:
        with Image.open(oi / "train" / f"{stem}.jpg") as f:
            f.load()


def test_openimages_pool_needs_sampling(tiny_synth: Path):
    """Classes COCO lacks, images without any COCO class, and people under several MIDs."""
    synth = load_classes()
    coco_mids = {m for c in synth if c.coco_id is not None for m, _ in c.openimages}
    rows = list(csv.DictReader((tiny_synth / "openimages" / "oidv6-train-annotations-bbox.csv").open()))
    labels = Counter(r["LabelName"] for r in rows)
    assert any(m not in coco_mids for m in labels)
    by_image: dict[str, set] = {}
    for r in rows:
        by_image.setdefault(r["ImageID"], set()).add(r["LabelName"])
    assert any(not (mids & coco_mids) for mids in by_image.values())
    assert sum(m in labels for m in ("/m/01g317", "/m/04yx4", "/m/03bt1vf")) >= 2


def test_class_frequencies_are_long_tailed(tiny_synth: Path):
    card = json.loads((tiny_synth / "synth_card.json").read_text())
    counts = sorted(card["splits"]["openimages_train"]["class_counts"].values(), reverse=True)
    assert counts[0] >= 5 * counts[-1]
    coco = card["splits"]["coco_train2017"]["class_counts"]
    assert max(coco, key=coco.get) == "person"


def test_group_of_rows_enclose_their_instances():
    classes = load_classes()
    person = next(i for i, c in enumerate(classes) if c.name == "person")
    objs = [{"cls": person, "bbox": b, "occluded": False, "truncated": False}
            for b in ([10, 10, 20, 20], [40, 5, 10, 30], [5, 50, 10, 10])]
    rows = openimages_rows(np.random.default_rng(0), "0" * 16, 100, 100, objs, classes,
                           SynthConfig(group_of_probability=1.0))
    assert len(rows) == 1
    r = dict(zip(OPENIMAGES_HEADER, rows[0]))
    assert r["IsGroupOf"] == "1" and r["LabelName"] == "/m/01g317"
    assert [float(r[k]) for k in ("XMin", "XMax", "YMin", "YMax")] == [0.05, 0.5, 0.05, 0.6]
    rows = openimages_rows(np.random.default_rng(0), "0" * 16, 100, 100, objs, classes,
                           SynthConfig(group_of_probability=0.0))
    assert len(rows) == 3 and all(r[10] == "0" for r in rows)


def test_readers_accept_all_of_it(tiny_synth: Path):
    """The embedded data goes through the real readers without a single reject."""
    for split in ("train2017", "val2017"):
        res = read_coco(tiny_synth / "coco" / "annotations" / f"instances_{split}.json", tiny_synth / "coco" / split)
        assert res.rejects.num_rows == 0 and res.boxes.num_rows > 0
        C.check_boxes_in_images(res.boxes, res.images)
    oi = tiny_synth / "openimages"
    res = read_openimages(oi / "oidv6-train-annotations-bbox.csv", oi / "class-descriptions-boxable.csv", oi / "train")
    assert res.rejects.num_rows == 0
    C.check_boxes_in_images(res.boxes, res.images)


def test_split_sizes_follow_the_fractions():
    sizes = SynthConfig(images=100, split_fractions=(0.5, 0.3, 0.2)).split_sizes()
    assert sizes == {"openimages_train": 50, "coco_train2017": 30, "coco_val2017": 20}
    with pytest.raises(ValueError, match="sum to 1"):
        SynthConfig(split_fractions=(0.5, 0.3, 0.3)).split_sizes()


def test_classes_manifest_uses_real_ids():
    coco_ids = {c.id: c.name for c in coco_categories()}
    mids = read_openimages_classes()
    for c in load_classes():
        if c.coco_id is not None:
            assert coco_ids[c.coco_id] == c.name
        assert all(m in mids for m, _ in c.openimages)


def test_classes_are_distinct_shape_texture_combinations(tmp_path: Path):
    classes = load_classes()
    assert len({(c.shape, c.texture) for c in classes}) == len(classes) == 24
    # the 16 COCO classes do not even share a silhouette
    assert len({c.shape for c in classes if c.coco_id is not None}) == 16
    rows = (REPO / "data_manifests" / "synth_classes.csv").read_text().splitlines()
    bad = tmp_path / "classes.csv"
    bad.write_text("\n".join(rows + ["twin,,/m/07j7r:1,ellipse,stripes,3.0,0,1.0,10,,25"]) + "\n")
    with pytest.raises(ValueError, match=r"ellipse \+ stripes is already class 'person'"):
        load_classes(bad)


def sample_objects(per_class: int, seed: int = 0):
    """`per_class` instances of every class, drawn alone on a 160 x 160 canvas: (class, alpha, rgb)."""
    rng = np.random.default_rng(seed)
    cfg = SynthConfig()
    for k, c in enumerate(load_classes()):
        n = 0
        while n < per_class:
            ob = draw_object(rng, c, 160, 160, cfg)
            if ob is not None:
                n += 1
                yield k, ob.alpha, ob.rgb


def test_colour_does_not_name_the_class():
    """Colour is a per-instance nuisance: a classifier that sees only an object's own colours (mean
    and spread of RGB, hue histogram) does no better than chance over the 24 classes."""
    import cv2

    feats, ys = [], []
    for k, alpha, rgb in sample_objects(per_class=30):
        px = rgb[alpha > 0.5]
        hsv = cv2.cvtColor((px[None] * 255).astype(np.uint8), cv2.COLOR_RGB2HSV)[0]
        hist = np.histogram(hsv[:, 0], bins=8, range=(0, 180))[0] / len(hsv)
        feats.append(np.concatenate([px.mean(0), px.std(0), hist]))
        ys.append(k)
    x, y = np.array(feats), np.array(ys)
    x = (x - x.mean(0)) / x.std(0).clip(1e-6)
    train = np.arange(len(y)) % 3 != 0
    centroids = np.stack([x[train & (y == k)].mean(0) for k in range(y.max() + 1)])
    pred = ((x[~train, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    acc = (pred == y[~train]).mean()
    # nearest class mean; chance is 1/24 = 0.042, the former class palettes (4 of 8 hues each) gave 0.125 here
    assert acc < 0.09, acc


def test_patterns_survive_grey_scale():
    """The two tones of every object differ in brightness, whatever the hue, so the texture is
    still there after the SSL grey-scale augmentation."""
    for k, alpha, rgb in sample_objects(per_class=8, seed=1):
        grey = rgb[alpha > 0.5] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        assert np.percentile(grey, 90) - np.percentile(grey, 10) > 0.2, load_classes()[k].name


def test_colour_and_a_random_network_do_not_give_the_classes_away(tmp_path: Path):
    """Learnable but not trivial: kNN on colour stays at the floor (always naming the most frequent
    class), and kNN on a random ResNet-18 far from perfect."""
    from benchmarks.bench_synth import (
        colour_features, floor_rates, knn_accuracy, load_objects, random_resnet_features,
    )

    data = tmp_path / "s"
    build(SynthConfig(images=300, seed=3), data, workers=2, progress=False)
    btr, ptr = load_objects(data, "train2017")
    bva, pva = load_objects(data, "val2017")
    labels = sorted(set(btr.label) | set(bva.label))
    ytr = btr.label.map(labels.index).to_numpy()
    yva = bva.label.map(labels.index).to_numpy()
    colour = knn_accuracy(colour_features(btr, ptr), ytr, colour_features(bva, pva), yva)
    random_net = knn_accuracy(random_resnet_features(btr, ptr), ytr, random_resnet_features(bva, pva), yva)
    assert colour < floor_rates(ytr, yva)["majority"] + 0.05, colour
    assert random_net < 0.5, random_net



# Every class drawn a few times and a few backgrounds, hashed as floats before any rounding to
# pixels: a last-bit difference shows here even where it would flip no JPEG byte.
_DRAW_HASH = """
import hashlib, numpy as np
from pipeline.synth import SynthConfig, load_classes
from pipeline.synth_scene import draw_object, make_background
cfg, h = SynthConfig(), hashlib.sha256()
rng = np.random.default_rng(7)
for c in load_classes():
    for _ in range(3):
        ob = draw_object(rng, c, 160, 128, cfg)
        if ob is not None:
            h.update(ob.alpha.tobytes()); h.update(ob.rgb.tobytes())
for _ in range(4):
    h.update(make_background(rng, 96, 80, 0.5).tobytes())
print(h.hexdigest())
"""


def _draw_hash(env_extra: dict) -> str:
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPY_DISABLE_CPU_FEATURES", "NPY_ENABLE_CPU_FEATURES", "OPENCV_CPU_DISABLE")}
    env.update(env_extra)
    run = subprocess.run([sys.executable, "-c", _DRAW_HASH], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip()


def test_the_same_objects_whatever_simd_the_cpu_has():
    """The data must not depend on the CPU: NumPy's SIMD paths round its transcendental functions
    differently (arctan2 between AVX-512 and AVX2, float32 sin between AVX2 and the baseline), which
    made an AVX2-only EPYC write 9 of 1300 images other than a Xeon did (the `synth` hash in dvc.lock
    of commit 0448cda against 33b6bbf). Drawn with NumPy's dispatched SIMD extensions and OpenCV's
    (SSE4.1 up) switched off, every object and background must come out bit-identical to the default
    run's. What it catches depends on the CPU: an AVX-512 one sees both functions."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    found = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    if not found:
        pytest.skip("this CPU has no SIMD extension beyond NumPy's baseline: nothing to switch off")
    default = _draw_hash({})
    baseline = _draw_hash({
        "NPY_DISABLE_CPU_FEATURES": " ".join(found),
        "OPENCV_CPU_DISABLE": "SSE4_1,SSE4_2,AVX,AVX2,FMA3,FP16,AVX512F,AVX512_COMMON,AVX512_SKX,AVX512_CNL,AVX512_CLX,AVX512_ICL"})
    assert len(default) == 64 and default == baseline, (default, baseline, found)
