"""Readers on hand-written files in the real COCO / OpenImages formats, good rows and bad."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import contracts as C
from pipeline.readers import (
    ReaderError, attach_images, coco_tables, load_coco, main, read_coco, read_openimages, read_openimages_boxes,
)

REPO = Path(__file__).resolve().parents[2]
OI_CLASSES = REPO / "data_manifests" / "openimages" / "class-descriptions-boxable.csv"
HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"


def _jpeg(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path, quality=80)


# ----------------------------------------------------------------------------------------- COCO

COCO_DOC = {
    "info": {"description": "hand-written fixture", "version": "1.0", "year": 2017},
    "licenses": [{"url": "", "id": 1, "name": "x"}],
    "images": [
        {"license": 1, "file_name": "000000000139.jpg", "height": 480, "width": 640, "id": 139},
        {"license": 1, "file_name": "000000000285.jpg", "height": 50, "width": 100, "id": 285},
        {"license": 1, "file_name": "000000000632.jpg", "height": 50, "width": 100, "id": 632},  # no file
    ],
    "annotations": [
        {"id": 1, "image_id": 139, "category_id": 1, "bbox": [10, 20, 100, 200], "area": 20000.0, "iscrowd": 0,
         "segmentation": [[10, 20, 110, 20, 110, 220, 10, 220]]},
        {"id": 2, "image_id": 139, "category_id": 47, "bbox": [600.5, 400, 39.5, 80], "area": 1.0, "iscrowd": 0,
         "segmentation": [[600.5, 400, 640, 400, 640, 480]]},
        {"id": 3, "image_id": 285, "category_id": 18, "bbox": [0, 0, 100, 50], "area": 5000.0, "iscrowd": 1,
         "segmentation": {"counts": [0, 5000], "size": [50, 100]}},
        {"id": 4, "image_id": 139, "category_id": 1, "bbox": [None, 1, 2, 3], "area": 1.0, "iscrowd": 0, "segmentation": []},
        {"id": 5, "image_id": 139, "category_id": 1, "bbox": [10, 10, -5, 5], "area": 1.0, "iscrowd": 0, "segmentation": []},
        {"id": 6, "image_id": 139, "category_id": 1, "bbox": [10, 10, 0, 5], "area": 0.0, "iscrowd": 0, "segmentation": []},
        {"id": 7, "image_id": 139, "category_id": 1, "bbox": [630, 10, 20, 5], "area": 1.0, "iscrowd": 0, "segmentation": []},
        {"id": 8, "image_id": 139, "category_id": 12, "bbox": [1, 1, 5, 5], "area": 1.0, "iscrowd": 0, "segmentation": []},
        {"id": 9, "image_id": 632, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 1.0, "iscrowd": 0, "segmentation": []},
        {"id": 10, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 1.0, "iscrowd": 0, "segmentation": []},
        {"id": 11, "image_id": 139, "category_id": 3, "bbox": [639.5, 10, 1.2, 5], "area": 1.0, "iscrowd": 0, "segmentation": []},
        {"id": 12, "image_id": 139, "category_id": 3, "bbox": [-0.5, 0, 10, 10], "area": 1.0, "iscrowd": 0, "segmentation": []},
    ],
    "categories": [
        {"supercategory": "person", "id": 1, "name": "person"},
        {"supercategory": "vehicle", "id": 3, "name": "car"},
        {"supercategory": "animal", "id": 18, "name": "dog"},
        {"supercategory": "kitchen", "id": 47, "name": "cup"},
    ],
}


@pytest.fixture
def coco_files(tmp_path: Path) -> tuple[Path, Path]:
    ann = tmp_path / "annotations" / "instances_train2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(COCO_DOC))
    _jpeg(tmp_path / "train2017" / "000000000139.jpg", 640, 480)
    _jpeg(tmp_path / "train2017" / "000000000285.jpg", 100, 50)
    return ann, tmp_path / "train2017"


def test_coco_good_rows_become_tables(coco_files):
    ann, images = coco_files
    res = read_coco(ann, images)
    assert res.images.column("key").to_pylist() == ["coco_train2017_000000000139", "coco_train2017_000000000285"]
    assert res.images.column("width").to_pylist() == [640, 100]
    assert res.images.column("path").to_pylist()[0] == str(images / "000000000139.jpg")
    rows = {(r["label"], r["x1"]): r for r in res.boxes.to_pylist()}
    assert len(res.boxes) == 5  # annotations 1, 2, 3, 11, 12: nothing valid is dropped
    person = rows[("person", 10.0)]
    assert (person["y1"], person["x2"], person["y2"], person["category_id"]) == (20.0, 110.0, 220.0, 1)
    assert rows[("cup", 600.5)]["x2"] == 640.0
    assert rows[("dog", 0.0)]["is_group"] is True
    # within the 1-pixel tolerance: clipped to the image, not rejected
    assert rows[("car", 639.5)]["x2"] == 640.0
    assert rows[("car", 0.0)]["x2"] == pytest.approx(9.5)
    C.check_boxes_in_images(res.boxes, res.images)


def test_coco_bad_rows_are_counted_by_reason(coco_files):
    ann, images = coco_files
    res = read_coco(ann, images)
    assert res.reject_counts() == {
        "nan_box": 1, "inverted_box": 1, "zero_area_box": 1, "out_of_range_box": 1,
        "unknown_label": 1, "missing_image": 3,  # annotations 9 and 10, and image 632's entry
    }
    by_row = {(r["source_file"].rsplit(":", 1)[1], r["row"]): r["reason"] for r in res.rejects.to_pylist()}
    assert by_row[("annotations", 3)] == "nan_box"          # annotation id 4 is list index 3
    assert by_row[("annotations", 7)] == "unknown_label"
    assert by_row[("images", 2)] == "missing_image"
    C.conform(res.rejects, C.REJECTS)


def test_coco_boxes_know_their_annotation(coco_files):
    """Each boxes row names the annotation it came from (what masks need): the kept ones, in order."""
    ann, images = coco_files
    tables = coco_tables(load_coco(ann), ann, images)
    assert tables.annotation_rows.tolist() == [0, 1, 2, 10, 11]
    for row, box in zip(tables.annotation_rows, tables.result.boxes.to_pylist()):
        a = COCO_DOC["annotations"][row]
        assert box["category_id"] == a["category_id"] and box["is_group"] == bool(a["iscrowd"])
        assert box["y1"] == pytest.approx(max(a["bbox"][1], 0.0))


def test_coco_stage_writes_the_tables_and_logs_a_summary(coco_files, tmp_path, caplog):
    ann, images = coco_files
    with caplog.at_level("INFO", logger="pipeline.readers"):
        assert main(["coco", "--annotations", str(ann), "--images", str(images), "--out", str(tmp_path / "t")]) == 0
    assert C.read_table(tmp_path / "t" / "boxes.parquet", C.BOXES).num_rows == 5
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["rejected"] == 8
    assert any("5 boxes" in r.getMessage() and "8 rejected" in r.getMessage() for r in caplog.records)


def test_coco_missing_file_and_key_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        read_coco(tmp_path / "instances_val2017.json", tmp_path)
    doc = {k: v for k, v in COCO_DOC.items() if k != "annotations"}
    p = tmp_path / "instances_x.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ReaderError, match="missing top-level key 'annotations'"):
        read_coco(p, tmp_path)
    p.write_text("{not json")
    with pytest.raises(ReaderError, match="not valid JSON"):
        read_coco(p, tmp_path)


def test_coco_image_entry_without_size_is_named(tmp_path: Path):
    doc = json.loads(json.dumps(COCO_DOC))
    del doc["images"][1]["width"]
    p = tmp_path / "instances_x.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ReaderError, match=r"images\[1\] lacks field\(s\) \['width'\]"):
        read_coco(p, tmp_path)


# ----------------------------------------------------------------------------------- OpenImages

OI_ROWS = [
    "000002b66c9c498e,xclick,/m/01g317,1,0.0125,0.195312,0.148438,0.587500,0,1,0,0,0",   # 2 good
    "000002b66c9c498e,xclick,/m/0k4j,1,0.5,1.0,0.25,0.75,1,0,1,0,0",                     # 3 good, group
    "000002b66c9c498e,activemil,/m/0k4j,1,,0.5,0.1,0.2,0,0,0,0,0",                       # 4 nan
    "000002b66c9c498e,xclick,/m/0k4j,1,0.6,0.5,0.1,0.2,0,0,0,0,0",                       # 5 inverted
    "000002b66c9c498e,xclick,/m/0k4j,1,0.5,0.5,0.1,0.2,0,0,0,0,0",                       # 6 zero area
    "000002b97e5471a0,xclick,/m/0k4j,1,0.5,1.2,0.1,0.2,0,0,0,0,0",                       # 7 out of range
    "000002b97e5471a0,xclick,/m/zzzzzz,1,0.1,0.2,0.1,0.2,0,0,0,0,0",                     # 8 unknown MID
    "000002b97e5471a0,xclick,/m/01g317,1,0.1,0.2,0.1,0.2,0,0,0,0,0",                     # 9 good
    "00000c4f5f8bb2d1,xclick,/m/01g317,1,0.1,0.2,0.1,0.2,0,0,0,0,0",                     # 10 no image file
]


@pytest.fixture
def oi_files(tmp_path: Path) -> tuple[Path, Path]:
    csv = tmp_path / "oidv6-train-annotations-bbox.csv"
    csv.write_text(HEADER + "\n" + "\n".join(OI_ROWS) + "\n")
    _jpeg(tmp_path / "train" / "000002b66c9c498e.jpg", 400, 320)
    _jpeg(tmp_path / "train" / "000002b97e5471a0.jpg", 200, 100)
    return csv, tmp_path / "train"


def test_openimages_good_rows_become_pixel_tables(oi_files):
    csv, images = oi_files
    res = read_openimages(csv, OI_CLASSES, images)
    assert res.images.column("key").to_pylist() == [
        "openimages_train_000002b66c9c498e", "openimages_train_000002b97e5471a0"]
    assert res.images.column("width").to_pylist() == [400, 200]
    b = res.boxes.to_pylist()
    assert len(b) == 3
    first = b[0]
    assert first["label"] == "/m/01g317" and first["category_id"] == -1 and first["is_group"] is False
    assert (first["x1"], first["x2"]) == pytest.approx((0.0125 * 400, 0.195312 * 400))
    assert (first["y1"], first["y2"]) == pytest.approx((0.148438 * 320, 0.5875 * 320))
    assert b[1]["label"] == "/m/0k4j" and b[1]["is_group"] is True
    assert b[2]["key"] == "openimages_train_000002b97e5471a0"
    assert (b[2]["x1"], b[2]["y2"]) == pytest.approx((20.0, 20.0))
    C.check_boxes_in_images(res.boxes, res.images)


def test_openimages_bad_rows_are_counted_with_their_line(oi_files):
    csv, images = oi_files
    res = read_openimages(csv, OI_CLASSES, images)
    assert res.reject_counts() == {
        "nan_box": 1, "inverted_box": 1, "zero_area_box": 1, "out_of_range_box": 1,
        "unknown_label": 1, "missing_image": 1,
    }
    assert {r["row"]: r["reason"] for r in res.rejects.to_pylist()} == {
        4: "nan_box", 5: "inverted_box", 6: "zero_area_box", 7: "out_of_range_box",
        8: "unknown_label", 10: "missing_image",
    }
    assert res.summary()["csv_rows"] == len(OI_ROWS)


def test_openimages_boxes_validate_without_images(oi_files):
    """Step one needs no image: the sampler picks images before they are downloaded."""
    csv, _ = oi_files
    norm, rejects = read_openimages_boxes(csv, OI_CLASSES)
    assert norm.column("row").to_pylist() == [2, 3, 9, 10]
    assert len(rejects) == 5
    only = attach_images(norm, csv.parent / "train", source="openimages_train",
                         image_ids=["000002b97e5471a0"])
    assert only.images.num_rows == 1 and only.boxes.num_rows == 1


def test_openimages_text_in_a_number_column_is_a_bad_row(tmp_path: Path):
    csv = tmp_path / "validation-annotations-bbox.csv"
    csv.write_text(HEADER + "\n" + OI_ROWS[0] + "\n" + OI_ROWS[0].replace("0.0125", "abc") + "\n")
    norm, rejects = read_openimages_boxes(csv, OI_CLASSES)
    assert norm.num_rows == 1
    assert rejects.to_pylist()[0]["row"] == 3 and rejects.to_pylist()[0]["reason"] == "nan_box"


def test_openimages_quoted_header_with_bom_is_read(tmp_path: Path):
    csv = tmp_path / "oidv6-train-annotations-bbox.csv"
    quoted = ",".join(f'"{h}"' for h in HEADER.split(","))
    csv.write_text("\ufeff" + quoted + "\n" + OI_ROWS[0] + "\n", encoding="utf-8")
    norm, rejects = read_openimages_boxes(csv, OI_CLASSES)
    assert norm.num_rows == 1 and rejects.num_rows == 0
    assert norm.column("image_id").to_pylist() == ["000002b66c9c498e"]


def test_openimages_missing_column_and_files_are_named(tmp_path: Path, oi_files):
    csv, images = oi_files
    bad = tmp_path / "no-group.csv"
    bad.write_text(HEADER.replace(",IsGroupOf", "") + "\n")
    with pytest.raises(ReaderError, match=r"missing column\(s\) \['IsGroupOf'\]"):
        read_openimages_boxes(bad, OI_CLASSES)
    with pytest.raises(FileNotFoundError, match="oidv6-test-annotations-bbox.csv"):
        read_openimages_boxes(tmp_path / "oidv6-test-annotations-bbox.csv", OI_CLASSES)
    with pytest.raises(FileNotFoundError, match="classes.csv"):
        read_openimages_boxes(csv, tmp_path / "classes.csv")


def test_result_write_round_trip(tmp_path: Path, oi_files):
    csv, images = oi_files
    res = read_openimages(csv, OI_CLASSES, images)
    res.write(tmp_path / "out")
    assert C.read_table(tmp_path / "out" / "boxes.parquet", C.BOXES).equals(res.boxes)
    assert C.read_table(tmp_path / "out" / "images.parquet", C.IMAGES).equals(res.images)
    assert C.read_table(tmp_path / "out" / "rejects.parquet", C.REJECTS).num_rows == 6
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rejected_by_reason"]["missing_image"] == 1


def test_coco_duplicate_image_id_is_named(tmp_path: Path):
    doc = json.loads(json.dumps(COCO_DOC))
    doc["images"].append(dict(doc["images"][1], file_name="other.jpg"))   # id 285 twice
    p = tmp_path / "instances_x.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ReaderError, match=r"instances_x\.json.*duplicate image id.*\b285\b"):
        read_coco(p, tmp_path)


def test_openimages_unquoted_comma_names_the_line(tmp_path: Path):
    csv = tmp_path / "oidv6-train-annotations-bbox.csv"
    extra = OI_ROWS[1].replace("xclick", "x,click")                        # one field too many
    csv.write_text(HEADER + "\n" + OI_ROWS[0] + "\n" + OI_ROWS[7] + "\n" + extra + "\n")
    with pytest.raises(ReaderError, match=r"oidv6-train-annotations-bbox\.csv: line 4 has 14 fields"):
        read_openimages_boxes(csv, OI_CLASSES)


def test_rebase_moves_every_path_under_the_prefix_and_names_a_row_outside_it(tmp_path, caplog):
    """`readers rebase`: the README's way to point an images table at the copy of its images in a
    bucket. Every path under --prefix moves under --to, nothing else changes; a row outside the
    prefix or a first location that does not exist is an error naming it."""
    from pipeline import readers

    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "a.jpg").write_bytes(b"x")
    table = pa.table({"key": ["k_a", "k_b"], "source": ["t", "t"], "image_id": ["a", "b"],
                      "path": ["/data/train/a.jpg", "/data/train/sub/b.jpg"],
                      "width": pa.array([4, 5], pa.int32()), "height": pa.array([6, 7], pa.int32())})
    src = C.write_table(table, tmp_path / "images.parquet", C.IMAGES)
    out = tmp_path / "rebased.parquet"
    assert readers.main(["rebase", "--images", str(src), "--prefix", "/data/train/", "--to",
                         str(tmp_path / "copy"), "--out", str(out)]) == 0
    got = C.read_table(out, C.IMAGES)
    assert got.column("path").to_pylist() == [f"{tmp_path}/copy/a.jpg", f"{tmp_path}/copy/sub/b.jpg"]
    assert got.drop(["path"]).equals(table.drop(["path"]))
    with pytest.raises(readers.ReaderError, match=r"row 0 \(key k_a\): its path /data/train/a.jpg is not under --prefix /data/train/sub"):
        readers.rebase(table, "/data/train/sub", "s3://b/x")
    assert readers.main(["rebase", "--images", str(src), "--prefix", "/data/train", "--to", str(tmp_path / "missing"),
                         "--out", str(tmp_path / "no.parquet")]) == 1
    assert "missing/a.jpg (row 0 after rebasing) does not exist" in caplog.text
    assert not (tmp_path / "no.parquet").exists()
