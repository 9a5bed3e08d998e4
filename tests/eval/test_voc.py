"""PASCAL VOC XML -> COCO format, on hand-written files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from eval.detection.data import CocoDetection
from eval.voc import VOC_CLASSES, main, read_voc_xml, voc_to_coco

XML_000005 = """<annotation>
  <folder>VOC2007</folder>
  <filename>000005.jpg</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  <object>
    <name>chair</name><pose>Rear</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>263</xmin><ymin>211</ymin><xmax>324</xmax><ymax>339</ymax></bndbox>
  </object>
  <object>
    <name>chair</name><pose>Unspecified</pose><truncated>1</truncated><difficult>1</difficult>
    <bndbox><xmin>5</xmin><ymin>244</ymin><xmax>67</xmax><ymax>374</ymax></bndbox>
  </object>
</annotation>
"""

XML_2008 = """<annotation>
  <filename>2008_000008.jpg</filename>
  <size><width>60</width><height>40</height><depth>3</depth></size>
  <object><name>horse</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>60</xmax><ymax>40</ymax></bndbox></object>
  <object><name>person</name><difficult>0</difficult>
    <bndbox><xmin>10.5</xmin><ymin>2</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
</annotation>
"""


def _voc_tree(tmp_path):
    root = tmp_path / "VOCdevkit"
    for year, stem, xml, (w, h) in (("2007", "000005", XML_000005, (500, 375)),
                                    ("2012", "2008_000008", XML_2008, (60, 40))):
        base = root / f"VOC{year}"
        (base / "Annotations").mkdir(parents=True)
        (base / "ImageSets" / "Main").mkdir(parents=True)
        (base / "JPEGImages").mkdir(parents=True)
        (base / "Annotations" / f"{stem}.xml").write_text(xml)
        (base / "ImageSets" / "Main" / "trainval.txt").write_text(f"{stem}\n")
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(base / "JPEGImages" / f"{stem}.jpg")
    return root


def test_read_voc_xml(tmp_path):
    path = tmp_path / "000005.xml"
    path.write_text(XML_000005)
    ann = read_voc_xml(path)
    assert ann["filename"] == "000005.jpg" and (ann["width"], ann["height"]) == (500, 375)
    assert ann["objects"] == [
        {"name": "chair", "difficult": 0, "bbox": (263.0, 211.0, 324.0, 339.0)},
        {"name": "chair", "difficult": 1, "bbox": (5.0, 244.0, 67.0, 374.0)},
    ]
    path.write_text("<annotation><filename>x.jpg</filename></annotation>")
    with pytest.raises(ValueError, match="size"):
        read_voc_xml(path)


def test_voc_to_coco(tmp_path):
    root = _voc_tree(tmp_path)
    coco = voc_to_coco(root, [("2007", "trainval"), ("2012", "trainval")])
    assert [c["name"] for c in coco["categories"]] == list(VOC_CLASSES) and coco["categories"][8]["id"] == 9
    assert coco["images"] == [
        {"id": 1, "file_name": "VOC2007/JPEGImages/000005.jpg", "width": 500, "height": 375},
        {"id": 2, "file_name": "VOC2012/JPEGImages/2008_000008.jpg", "width": 60, "height": 40},
    ]
    a = coco["annotations"]
    assert [x["category_id"] for x in a] == [9, 9, 13, 15]                        # chair, chair, horse, person
    assert a[0]["bbox"] == [262.0, 210.0, 62.0, 129.0] and a[0]["area"] == 62.0 * 129.0
    assert (a[0]["iscrowd"], a[1]["iscrowd"], a[1]["difficult"]) == (0, 0, 1)     # difficult: trained on
    assert a[2]["bbox"] == [0.0, 0.0, 60.0, 40.0]                                 # the whole 60x40 image
    assert a[3]["bbox"] == [9.5, 1.0, 10.5, 29.0] and a[3]["iscrowd"] == 0
    assert [x["id"] for x in a] == [1, 2, 3, 4] and [x["image_id"] for x in a] == [1, 1, 2, 2]


def test_voc_difficult_objects_are_trained_on_in_trainval_and_ignored_in_test(tmp_path):
    root = _voc_tree(tmp_path)
    (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("000005\n")
    crowd = lambda coco: [(x["difficult"], x["iscrowd"]) for x in coco["annotations"]]  # noqa: E731
    assert crowd(voc_to_coco(root, [("2007", "trainval")])) == [(0, 0), (1, 0)]
    assert crowd(voc_to_coco(root, [("2007", "test")])) == [(0, 0), (1, 1)]
    (root / "VOC2007" / "ImageSets" / "Main" / "val.txt").write_text("000005\n")
    assert crowd(voc_to_coco(root, [("2007", "val")])) == [(0, 0), (1, 1)]
    assert crowd(voc_to_coco(root, [("2007", "trainval"), ("2007", "test")])) == [(0, 0), (1, 0)] * 2
    assert crowd(voc_to_coco(root, [("2007", "trainval")], difficult="ignore")) == [(0, 0), (1, 1)]
    assert crowd(voc_to_coco(root, [("2007", "test")], difficult="train")) == [(0, 0), (1, 0)]
    with pytest.raises(ValueError, match="expected one of"):
        voc_to_coco(root, [("2007", "test")], difficult="drop")


def test_voc_cli_output_feeds_the_detector_dataset(tmp_path):
    root = _voc_tree(tmp_path)
    out = tmp_path / "voc.json"
    assert main(["--voc-root", str(root), "--sets", "2007:trainval", "2012:trainval", "--out", str(out)]) == 0
    assert len(CocoDetection(out, root, train=True, with_masks=False)) == 2
    ds = CocoDetection(out, root, train=False, with_masks=False)
    assert len(ds.category_ids) == 20
    x, t = ds[0]
    assert x.shape == (3, 375, 500)
    assert t["boxes"].tolist() == [[262.0, 210.0, 324.0, 339.0], [4.0, 243.0, 67.0, 374.0]]
    assert t["labels"].tolist() == [9, 9]                                          # the difficult chair is trained on
    test = tmp_path / "voc07_test.json"
    (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("000005\n")
    assert main(["--voc-root", str(root), "--sets", "2007:test", "--out", str(test)]) == 0
    _, t = CocoDetection(test, root, train=False, with_masks=False)[0]
    assert t["labels"].tolist() == [9]                                             # ... and ignored in the test set
    with pytest.raises(SystemExit):
        main(["--voc-root", str(root), "--sets", "2010-trainval", "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        voc_to_coco(root, [("2012", "test")])
    assert json.loads(out.read_text())["info"]["description"].startswith("PASCAL VOC 2007 trainval")
