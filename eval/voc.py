"""PASCAL VOC XML annotations converted to one COCO-format JSON (the VOC07+12 detection protocol).

    python -m eval.voc --voc-root VOCdevkit --sets 2007:trainval 2012:trainval --out data/voc/voc0712_trainval.json
    python -m eval.voc --voc-root VOCdevkit --sets 2007:test --out data/voc/voc07_test.json   # difficult: ignore
    python -m eval.detect ... --train-ann data/voc/voc0712_trainval.json --train-images VOCdevkit \
        --val-ann data/voc/voc07_test.json --val-images VOCdevkit --preset voc_24k

`--voc-root` is the folder holding VOC2007/ and VOC2012/ (each with Annotations/,
ImageSets/Main/<split>.txt, JPEGImages/); `file_name` in the JSON is relative to it
(`VOC2007/JPEGImages/000005.jpg`), so it is also the image folder of eval.detect.

Conversion (detectron2's pascal_voc reader for the coordinates):
- VOC boxes are 1-based inclusive pixel indices; the COCO box is
  [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1] (x, y, w, h in 0-based pixel edges).
- The 20 classes get ids 1..20 in the usual VOC order (`VOC_CLASSES`).
- "difficult" objects keep `difficult: 1` and, by `--difficult`:
  - `train` (the default unless every set is an evaluation split): ordinary boxes (`iscrowd: 0`),
    trained on. This is MoCo's VOC protocol, which the paper follows: detectron2's pascal_voc
    reader keeps difficult objects for training ("they don't hurt accuracy").
  - `ignore` (the default when every set is an evaluation split, `test` or `val`): `iscrowd: 1`,
    so COCOeval neither rewards nor penalises detections of them, as the VOC evaluation ignores
    difficult objects.
  Image ids are 1..n in the order of the split files.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline import cli
from pipeline.files import write_text

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def read_voc_xml(path: str | Path) -> dict:
    """One VOC annotation file -> {'filename', 'width', 'height', 'objects': [{'name', 'difficult',
    'bbox': (xmin, ymin, xmax, ymax) as written}]}; a missing field is an error naming it."""
    path = Path(path)
    root = ET.parse(path).getroot()

    def text(node, tag: str) -> str:
        child = node.find(tag)
        if child is None or child.text is None:
            raise ValueError(f"{path}: <{node.tag}> has no <{tag}>")
        return child.text.strip()

    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: no <size>")
    objects = []
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{path}: an <object> has no <bndbox>")
        d = obj.find("difficult")
        objects.append({
            "name": text(obj, "name"),
            "difficult": int(d.text) if d is not None and d.text else 0,
            "bbox": tuple(float(text(box, t)) for t in ("xmin", "ymin", "xmax", "ymax")),
        })
    return {"filename": text(root, "filename"), "width": int(float(text(size, "width"))),
            "height": int(float(text(size, "height"))), "objects": objects}


DIFFICULT = ("train", "ignore")
EVAL_SPLITS = ("test", "val")


def difficult_policy(sets: list[tuple[str, str]], difficult: str | None = None) -> str:
    """`difficult` if given, else "ignore" when every split of `sets` is an evaluation split
    (`EVAL_SPLITS`), else "train"."""
    if difficult is None:
        return "ignore" if all(split in EVAL_SPLITS for _, split in sets) else "train"
    if difficult not in DIFFICULT:
        raise ValueError(f"difficult={difficult!r}: expected one of {DIFFICULT}")
    return difficult


def voc_to_coco(voc_root: str | Path, sets: list[tuple[str, str]], difficult: str | None = None) -> dict:
    """The images of `sets` ((year, split) pairs, e.g. ('2007', 'trainval')) as a COCO instances dict;
    difficult objects are trained on or ignored (`iscrowd`) by `difficult_policy(sets, difficult)`."""
    crowd = int(difficult_policy(sets, difficult) == "ignore")
    voc_root = Path(voc_root)
    categories = [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(VOC_CLASSES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for year, split in sets:
        base = voc_root / f"VOC{year}"
        list_file = base / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file} does not exist; --voc-root must hold VOC{year}/ImageSets/Main/")
        for stem in list_file.read_text().split():
            ann = read_voc_xml(base / "Annotations" / f"{stem}.xml")
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": f"VOC{year}/JPEGImages/{stem}.jpg",
                           "width": ann["width"], "height": ann["height"]})
            for obj in ann["objects"]:
                if obj["name"] not in cat_id:
                    raise ValueError(f"{base / 'Annotations' / stem}.xml: unknown class {obj['name']!r}")
                x1, y1, x2, y2 = obj["bbox"]
                w, h = x2 - x1 + 1, y2 - y1 + 1
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[obj["name"]],
                    "bbox": [x1 - 1, y1 - 1, w, h], "area": w * h,
                    "iscrowd": crowd * int(obj["difficult"]), "difficult": int(obj["difficult"]),
                })
    return {"info": {"description": "PASCAL VOC " + " + ".join(f"{y} {s}" for y, s in sets)},
            "images": images, "annotations": annotations, "categories": categories}


def parse_set(text: str) -> tuple[str, str]:
    year, sep, split = text.partition(":")
    if not sep or year not in ("2007", "2012") or not split:
        raise argparse.ArgumentTypeError(f"{text!r}: expected YEAR:SPLIT, e.g. 2007:trainval, 2012:trainval, 2007:test")
    return year, split


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m eval.voc", __doc__)
    p.add_argument("--voc-root", required=True, type=Path, help="folder holding VOC2007/ and VOC2012/")
    p.add_argument("--sets", required=True, nargs="+", type=parse_set, help="YEAR:SPLIT ...")
    p.add_argument("--out", required=True, type=Path, help="COCO-format JSON to write")
    p.add_argument("--difficult", choices=DIFFICULT,
                   help="difficult objects: train on them, or ignore them as crowd (default: ignore when "
                        "every set is a test or val split, as for 2007:test; else train, MoCo's protocol)")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    coco = voc_to_coco(args.voc_root, args.sets, args.difficult)
    write_text(args.out, json.dumps(coco) + "\n")
    log.info("wrote %s: %d images, %d boxes of VOC %s in COCO format", args.out, len(coco["images"]),
             len(coco["annotations"]), " ".join(f"{y}:{s}" for y, s in args.sets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
