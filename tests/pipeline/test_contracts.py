from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import contracts as C


def images_table():
    return pa.table({
        "key": ["coco_train2017_000000000001", "openimages_train_00aa11bb22cc33dd"],
        "source": ["coco_train2017", "openimages_train"],
        "image_id": ["1", "00aa11bb22cc33dd"],
        "path": ["a/000000000001.jpg", "b/00aa11bb22cc33dd.jpg"],
        "width": [640, 320],
        "height": [480, 240],
    })


def boxes_table():
    return pa.table({
        "key": ["coco_train2017_000000000001"] * 2 + ["openimages_train_00aa11bb22cc33dd"],
        "label": ["person", "cup", "/m/01g317"],
        "category_id": [1, 47, -1],
        "x1": [0.0, 10.5, 3.0], "y1": [0.0, 20.0, 4.0], "x2": [100.0, 30.0, 320.0], "y2": [50.0, 40.5, 240.0],
        "is_group": [False, True, False],
    })


def proposals_table():
    return pa.table({
        "key": ["k1", "k1", "k2"], "x1": [0.0, 1.0, 2.0], "y1": [0.0, 1.0, 2.0],
        "x2": [5.0, 6.0, 7.0], "y2": [5.0, 6.0, 7.0], "rank": [0, 1, 0],
    })


def rejects_table():
    return pa.table({
        "source_file": ["f.csv"], "row": [7], "image_id": ["abc"], "label": ["/m/x"], "reason": ["unknown_label"],
    })


@pytest.mark.parametrize("contract, make", [
    (C.IMAGES, images_table), (C.BOXES, boxes_table), (C.PROPOSALS, proposals_table), (C.REJECTS, rejects_table),
])
def test_round_trip(tmp_path: Path, contract, make):
    """Write then read gives the same values in the contract's exact types."""
    t = make()
    path = C.write_table(t, tmp_path / f"{contract.name}.parquet", contract)
    back = C.read_table(path, contract)
    assert back.schema == contract.schema
    assert back.to_pylist() == C.conform(t, contract).to_pylist()
    assert pq.read_schema(path).metadata[b"d3ssl.contract"] == contract.name.encode()
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_missing_and_extra_columns_are_named():
    with pytest.raises(C.ContractError, match=r"missing column\(s\) \['height'\]"):
        C.conform(images_table().drop(["height"]), C.IMAGES, "images.parquet")
    with pytest.raises(C.ContractError, match=r"unexpected column\(s\) \['score'\]"):
        C.conform(proposals_table().append_column("score", pa.array([1.0, 2.0, 3.0])), C.PROPOSALS)


def test_unsafe_cast_is_refused():
    t = images_table().set_column(4, "width", pa.array([2**40, 5], pa.int64()))
    with pytest.raises(C.ContractError, match="'width'"):
        C.conform(t, C.IMAGES)


@pytest.mark.parametrize("column, values, fragment", [
    ("x2", [0.0, 30.0, 320.0], "x1 >= x2"),
    ("y1", [float("nan"), 20.0, 4.0], "non-finite value"),
    ("key", ["a.b", "k", "k"], "not matching"),
])
def test_bad_boxes_are_refused(column, values, fragment):
    t = boxes_table()
    t = t.set_column(t.schema.get_field_index(column), column, pa.array(values))
    with pytest.raises(C.ContractError, match=fragment):
        C.conform(t, C.BOXES, "boxes.parquet")


def test_duplicate_image_keys_are_refused():
    t = images_table()
    t = t.set_column(0, "key", pa.array(["same", "same"]))
    with pytest.raises(C.ContractError, match="duplicate keys"):
        C.conform(t, C.IMAGES)


def test_reading_the_wrong_table_is_an_error(tmp_path: Path):
    p = C.write_table(boxes_table(), tmp_path / "x.parquet", C.BOXES)
    with pytest.raises(C.ContractError, match="holds a boxes table, expected a images table"):
        C.read_table(p, C.IMAGES)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        C.read_table(tmp_path / "nope.parquet", C.IMAGES)


def test_boxes_must_lie_in_their_images():
    C.check_boxes_in_images(boxes_table(), images_table())
    wide = boxes_table().set_column(5, "x2", pa.array([100.0, 30.0, 321.0]))
    with pytest.raises(C.ContractError, match="past the right or bottom edge"):
        C.check_boxes_in_images(wide, images_table())
    with pytest.raises(C.ContractError, match="not in the images table"):
        C.check_boxes_in_images(boxes_table(), images_table().slice(0, 1))


def test_unknown_reject_reason_is_refused():
    t = rejects_table().set_column(4, "reason", pa.array(["because"]))
    with pytest.raises(C.ContractError, match="unknown reason"):
        C.conform(t, C.REJECTS)
