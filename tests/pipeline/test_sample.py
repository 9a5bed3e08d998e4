"""OpenImage-MINI sampling: both criteria, maximality, determinism and the statistics."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import contracts as C
from pipeline.categories import (
    COCO_OPENIMAGES_CSV, coco_categories, read_class_mapping, read_openimages_classes,
)
from pipeline.readers import OPENIMAGES_HEADER, ReaderError
from pipeline.sample import SampleConfig, SparseCounts, greedy_select, run, select
from pipeline.synth import load_classes

REPO = Path(__file__).resolve().parents[2]
SHARED_CLASSES = REPO.parent / "shared" / "data" / "openimages" / "class-descriptions-boxable.csv"
OI_CLASSES = REPO / "data_manifests" / "openimages" / "class-descriptions-boxable.csv"
PERSON, MAN, WOMAN, CAR, TREE, MUG = "/m/01g317", "/m/04yx4", "/m/03bt1vf", "/m/0k4j", "/m/07j7r", "/m/02jvh9"


# --------------------------------------------------------------------------------- class mapping


# Independent of the shipped files: the 80 COCO 2017 category ids (1..90 less the ten unused), and
# MID -> (COCO id, OpenImages display name) pairs written out by hand from the OpenImages V6 list.
COCO_IDS = sorted(set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
KNOWN_MIDS = {
    PERSON: (1, "Person"), MAN: (1, "Man"), WOMAN: (1, "Woman"), "/m/01bl7v": (1, "Boy"), "/m/05r655": (1, "Girl"),
    "/m/0199g": (2, "Bicycle"), CAR: (3, "Car"), "/m/04_sv": (4, "Motorcycle"), "/m/0cmf2": (5, "Airplane"),
    "/m/01bjv": (6, "Bus"), "/m/07jdr": (7, "Train"), "/m/07r04": (8, "Truck"), "/m/019jd": (9, "Boat"),
    "/m/015qff": (10, "Traffic light"), "/m/01pns0": (11, "Fire hydrant"), "/m/02pv19": (13, "Stop sign"),
    "/m/015qbp": (14, "Parking meter"), "/m/0cvnqh": (15, "Bench"), "/m/015p6": (16, "Bird"), "/m/01yrx": (17, "Cat"),
    "/m/0bt9lr": (18, "Dog"), "/m/03k3r": (19, "Horse"), "/m/07bgp": (20, "Sheep"), "/m/01xq0k1": (21, "Cattle"),
    "/m/0bwd_0j": (22, "Elephant"), "/m/01dws": (23, "Bear"), "/m/0898b": (24, "Zebra"), "/m/03bk1": (25, "Giraffe"),
    "/m/02p5f1q": (47, "Coffee cup"), MUG: (47, "Mug"), "/m/04bcr3": (67, "Table"), "/m/07c52": (72, "Television"),
    "/m/050k8": (77, "Mobile phone"), "/m/0kmg4": (88, "Teddy bear"),
}


def test_mapping_covers_every_coco_class_with_real_mids():
    mapping = read_class_mapping()
    assert sorted(set(mapping.mid_to_coco.values())) == COCO_IDS
    assert [c.id for c in coco_categories()] == COCO_IDS
    classes = read_openimages_classes(SHARED_CLASSES if SHARED_CLASSES.exists() else OI_CLASSES)
    for mid, (coco_id, name) in KNOWN_MIDS.items():
        assert mapping.mid_to_coco.get(mid) == coco_id, (mid, name)
        assert classes.get(mid) == name, mid
    # a class that is not a COCO category stays out of the mapping
    assert classes[TREE] == "Tree" and TREE not in mapping.mid_to_coco
    # the table's display names are the list's, row by row
    rows = list(csv.DictReader(COCO_OPENIMAGES_CSV.open()))
    assert all(classes.get(r["mid"]) == r["openimages_name"] for r in rows)
    assert len(rows) == len(mapping.mid_to_coco)


def test_embedded_classes_agree_with_the_mapping():
    mapping = read_class_mapping()
    for c in load_classes():
        for mid, _ in c.openimages:
            assert mapping.mid_to_coco.get(mid) == c.coco_id, (c.name, mid)


def test_bad_mapping_rows_are_named(tmp_path: Path):
    p = tmp_path / "m.csv"
    p.write_text("coco_id,coco_name,mid,openimages_name\n1,person,/m/nothere,Ghost\n")
    with pytest.raises(ValueError, match=r"line 2: MID /m/nothere \(Ghost\) is not in"):
        read_class_mapping(p)
    p.write_text(f"coco_id,coco_name,mid,openimages_name\n1,person,{CAR},Car\n3,car,{CAR},Car\n")
    with pytest.raises(ValueError, match="maps to two COCO classes"):
        read_class_mapping(p)
    p.write_text("coco_id,name,mid\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['coco_name', 'openimages_name'\]"):
        read_class_mapping(p)


# ----------------------------------------------------------------------------------- pure parts


def counts_of(per_image: list[dict[int, int]], n_classes: int) -> SparseCounts:
    img = np.array([i for i, d in enumerate(per_image) for _ in d], dtype=np.int64)
    cls = np.array([c for d in per_image for c in d], dtype=np.int32)
    w = np.array([k for d in per_image for k in d.values()], dtype=np.int64)
    return SparseCounts.from_rows(img, cls, w, len(per_image), n_classes)


def test_greedy_in_a_given_order_by_hand():
    # caps: class 0 -> 3, class 1 -> 1
    per = [{0: 2}, {0: 1, 1: 1}, {}, {0: 2}, {1: 1}]
    got = greedy_select(counts_of(per, 2), np.array([3, 1]), np.array([3, 0, 1, 4, 2]))
    # image 3 takes 2 of class 0; image 0 (2 more) does not fit; image 1 fits; image 4 (car) does not
    assert got.tolist() == [3, 1]


def check_criteria(per: list[dict[int, int]], caps: np.ndarray, chosen: np.ndarray) -> None:
    """Independent check of criteria 1, 2 and maximality."""
    used = np.zeros_like(caps)
    for i in chosen:
        assert per[i], "criterion 1: an image without a COCO class was selected"
        for c, k in per[i].items():
            used[c] += k
    assert np.all(used <= caps), "criterion 2 broken"
    for i, d in enumerate(per):
        if d and i not in set(chosen.tolist()):
            assert any(used[c] + k > caps[c] for c, k in d.items()), f"image {i} could still be added"


def test_every_seed_gives_a_valid_maximal_selection():
    rng = np.random.default_rng(0)
    n_cls = 6
    per = []
    for _ in range(400):
        k = rng.integers(0, 4)
        per.append({int(c): int(rng.integers(1, 4)) for c in rng.choice(n_cls, size=k, replace=False)})
    caps = rng.integers(5, 60, size=n_cls)
    counts = counts_of(per, n_cls)
    key = np.arange(len(per))
    results = []
    for seed in range(8):
        chosen = select(counts, caps, key, seed)
        check_criteria(per, caps, chosen)
        results.append(tuple(chosen.tolist()))
        assert select(counts, caps, key, seed).tolist() == list(results[-1])  # deterministic
        assert chosen.tolist() == sorted(chosen.tolist())
    assert len(set(results)) > 1  # the seed matters


def test_unique_answer_when_everything_fits():
    per = [{0: 2}, {0: 1, 1: 1}, {}, {1: 1}]
    chosen = select(counts_of(per, 2), np.array([3, 2]), np.arange(4), seed=3)
    assert chosen.tolist() == [0, 1, 3]


# ------------------------------------------------------------------------------- the stage itself


def write_coco(path: Path, per_image: list[list[tuple[int, bool]]]) -> None:
    """A COCO instances file; each image a list of (category id, iscrowd)."""
    cats = [{"supercategory": c.supercategory, "id": c.id, "name": c.name} for c in coco_categories()]
    images, anns = [], []
    for i, objs in enumerate(per_image, start=1):
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 100, "height": 100})
        for cid, crowd in objs:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cid, "bbox": [1, 1, 10, 10],
                         "area": 100.0, "iscrowd": int(crowd), "segmentation": [[1, 1, 11, 1, 11, 11]]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}))


def write_oi(root: Path, rows: list[tuple[str, str, bool]], images: dict[str, tuple[int, int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    csv_path = root / "oidv6-train-annotations-bbox.csv"
    lines = [",".join(OPENIMAGES_HEADER)]
    for k, (iid, mid, group) in enumerate(rows):
        x = 0.1 + 0.01 * k
        lines.append(f"{iid},xclick,{mid},1,{x:.4f},{x + 0.2:.4f},0.1,0.5,0,0,{int(group)},0,0")
    csv_path.write_text("\n".join(lines) + "\n")
    for iid, (w, h) in images.items():
        (root / "train").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / "train" / f"{iid}.jpg")
    return csv_path


A, B, D, E, F = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "dddddddddddddddd", "eeeeeeeeeeeeeeee", "ffffffffffffffff"
ROWS = [(A, MAN, False), (A, WOMAN, False), (A, TREE, False),
        (B, PERSON, False), (B, CAR, False),
        (D, TREE, False), (D, TREE, False),
        (E, CAR, False), (E, MUG, False)]


@pytest.fixture
def stage_inputs(tmp_path: Path):
    coco = tmp_path / "coco" / "instances_train2017.json"
    # COCO holds 3 people, 2 cars, 1 cup: exactly what A, B and E need together.
    write_coco(coco, [[(1, False), (1, False), (3, False)], [(1, False), (3, False), (47, False)]])
    oi = tmp_path / "oi"
    csv_path = write_oi(oi, ROWS, {A: (200, 100), B: (100, 100), D: (50, 50), E: (80, 60)})
    return coco, csv_path, oi


def test_stage_selects_the_known_answer_and_keeps_every_object(stage_inputs, tmp_path: Path):
    coco, csv_path, oi = stage_inputs
    stats = run(coco, csv_path, OI_CLASSES, tmp_path / "out", SampleConfig(seed=0), openimages_images=oi / "train")
    out = tmp_path / "out"
    assert (out / "image_ids.txt").read_text().splitlines() == [f"train/{A}", f"train/{B}", f"train/{E}"]
    images = C.read_table(out / "images.parquet", C.IMAGES)
    assert images.column("key").to_pylist() == [f"openimages_train_{i}" for i in (A, B, E)]
    assert images.column("width").to_pylist() == [200, 100, 80]
    boxes = C.read_table(out / "boxes.parquet", C.BOXES).to_pylist()
    assert len(boxes) == 7  # the tree in A is kept although COCO has no tree
    cat = {(b["key"][-16:], b["label"]): b["category_id"] for b in boxes}
    assert cat[(A, MAN)] == 1 and cat[(A, TREE)] == -1 and cat[(E, MUG)] == 47 and cat[(B, CAR)] == 3
    assert boxes[0]["x1"] == pytest.approx(0.1 * 200)
    # Table 2 columns, by hand: 7 objects over 3 images; distinct MIDs per image 3, 2, 2.
    mini = stats["openimage_mini"]
    assert (mini["num_images"], mini["num_objects"], mini["num_categories"]) == (3, 7, 6)
    assert mini["objects_per_image"] == pytest.approx(7 / 3)
    assert mini["categories_per_image"] == pytest.approx(7 / 3)
    coco_s = stats["coco"]
    assert (coco_s["num_images"], coco_s["objects_per_image"], coco_s["categories_per_image"]) == (2, 3.0, 2.5)
    assert stats["criteria"] == {"every_image_has_a_coco_class": True, "no_coco_class_over_its_coco_count": True,
                                 "maximal": True}
    assert stats["openimages_pool"] == {"num_images": 4, "num_rows": 9, "eligible_images": 3}
    cc = {r["label"]: r for r in pq.read_table(out / "class_counts.parquet").to_pylist()}
    assert (cc["person"]["coco_count"], cc["person"]["sample_count"]) == (3, 3)
    assert (cc["cup"]["coco_count"], cc["cup"]["sample_count"]) == (1, 1)
    assert cc[TREE]["coco_id"] == -1 and cc[TREE]["sample_count"] == 1 and cc[TREE]["name"] == "Tree"
    assert (out / "class_distribution.png").read_bytes()[:4] == b"\x89PNG"


def test_caps_bind_and_group_boxes_count_as_configured(tmp_path: Path):
    coco = tmp_path / "instances_train2017.json"
    write_coco(coco, [[(1, False), (1, True)]])  # 2 people in COCO, one of them a crowd box
    rows = [(A, PERSON, False), (B, PERSON, True), (D, PERSON, False), (D, PERSON, False)]
    oi = tmp_path / "oi"
    csv_path = write_oi(oi, rows, {})
    # weight 1: A (1) + B (1) fill the cap of 2, or D (2) alone; weight 5: B's group box counts as
    # 5 people, so A (1) + B (5) fill the cap of 6, or A (1) + D (2) leave too little room for B.
    possible = {1: ({A, B}, {D}), 5: ({A, B}, {A, D})}
    for weight, expect_cap in ((1, 2), (5, 6)):
        out = tmp_path / f"o{weight}"
        for seed in range(6):
            stats = run(coco, csv_path, OI_CLASSES, out, SampleConfig(seed=seed, group_weight=weight))
            cc = {r["label"]: r for r in pq.read_table(out / "class_counts.parquet").to_pylist()}
            assert cc["person"]["coco_count"] == expect_cap
            assert cc["person"]["sample_count"] <= expect_cap
            assert stats["criteria"]["maximal"] and not stats["pixel_tables"]
            assert not (out / "images.parquet").exists()
            ids = {line.split("/")[1] for line in (out / "image_ids.txt").read_text().split()}
            assert ids in possible[weight], (weight, seed, ids)


def test_same_seed_same_outputs_whatever_the_row_order(stage_inputs, tmp_path: Path):
    coco, csv_path, oi = stage_inputs
    run(coco, csv_path, OI_CLASSES, tmp_path / "x", SampleConfig(seed=4), openimages_images=oi / "train")
    # the same files twice: every output byte-identical (no timing in stats.json, which DVC hashes)
    again = run(coco, csv_path, OI_CLASSES, tmp_path / "x2", SampleConfig(seed=4), openimages_images=oi / "train")
    def folder_bytes(d):
        return {p.name: p.read_bytes() for p in sorted(d.iterdir())}
    assert folder_bytes(tmp_path / "x") == folder_bytes(tmp_path / "x2") and len(folder_bytes(tmp_path / "x")) == 7
    assert json.loads((tmp_path / "x" / "stats.json").read_text()) == {k: v for k, v in again.items() if k != "run"}
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([lines[0]] + lines[1:][::-1]) + "\n")
    run(coco, csv_path, OI_CLASSES, tmp_path / "y", SampleConfig(seed=4), openimages_images=oi / "train")
    assert (tmp_path / "x" / "image_ids.txt").read_text() == (tmp_path / "y" / "image_ids.txt").read_text()
    assert C.read_table(tmp_path / "x" / "images.parquet", C.IMAGES).equals(
        C.read_table(tmp_path / "y" / "images.parquet", C.IMAGES))
    # boxes keep their CSV order within an image; as a set they are the same
    def box_set(d):
        return sorted(map(tuple, (r.values() for r in C.read_table(d / "boxes.parquet", C.BOXES).to_pylist())))
    assert box_set(tmp_path / "x") == box_set(tmp_path / "y")


def test_bad_rows_and_missing_images_are_reported_not_fatal(stage_inputs, tmp_path: Path):
    coco, csv_path, oi = stage_inputs
    with csv_path.open("a") as f:
        f.write(f"{A},xclick,{PERSON},1,0.5,0.4,0.1,0.2,0,0,0,0,0\n")     # inverted
        f.write(f"{B},xclick,/m/unknown,1,0.1,0.4,0.1,0.2,0,0,0,0,0\n")   # unknown MID
    (oi / "train" / f"{E}.jpg").unlink()                                   # selected, not downloaded
    stats = run(coco, csv_path, OI_CLASSES, tmp_path / "out", SampleConfig(), openimages_images=oi / "train")
    assert stats["rejected_rows"]["inverted_box"] == 1
    assert stats["rejected_rows"]["unknown_label"] == 1
    assert stats["rejected_rows"]["missing_image"] == 2                    # E's two boxes
    assert stats["openimage_mini"]["images_with_file"] == 2
    rejects = C.read_table(tmp_path / "out" / "rejects.parquet", C.REJECTS)
    assert sorted(rejects.column("row").to_pylist()) == [9, 10, 11, 12]


def test_missing_inputs_are_named(stage_inputs, tmp_path: Path):
    coco, csv_path, oi = stage_inputs
    csv_path.write_text(",".join(h for h in OPENIMAGES_HEADER if h != "LabelName") + "\n")
    with pytest.raises(ReaderError, match="LabelName"):
        run(coco, csv_path, OI_CLASSES, tmp_path / "out", SampleConfig())
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        run(tmp_path / "nothere.json", csv_path, OI_CLASSES, tmp_path / "out", SampleConfig())
