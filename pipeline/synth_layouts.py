"""The annotation files of the embedded data (`pipeline.synth`): COCO 2017 instances JSON and the
OpenImages V6 box CSV, written from the rendered scenes' objects in the real formats.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.categories import coco_categories
from pipeline.readers import OPENIMAGES_HEADER

if TYPE_CHECKING:
    from pipeline.synth import SynthClass, SynthConfig


def coco_json(split: str, images: list[dict], annotations: list[dict]) -> str:
    """One split's COCO instances JSON (the 80 real categories), compact."""
    cats = [{"supercategory": c.supercategory, "id": c.id, "name": c.name} for c in coco_categories()]
    doc = {
        "info": {"description": f"D3SSL embedded synthetic data, COCO 2017 layout ({split})",
                 "url": "", "version": "1.0", "year": 2017, "contributor": "pipeline.synth",
                 "date_created": "2017/09/01"},
        "licenses": [{"url": "", "id": 1, "name": "generated procedurally; backgrounds from scikit-image and scikit-learn sample data"}],
        "images": images,
        "annotations": annotations,
        "categories": cats,
    }
    return json.dumps(doc, separators=(",", ":"))


def openimages_rows(rng: np.random.Generator, image_id: str, w: int, h: int, objects: list[dict],
                    classes: list[SynthClass], cfg: SynthConfig) -> list[list[str]]:
    """Rows of the OpenImages box CSV for one image, with MIDs drawn per class and group-of boxes."""
    rows = []
    by_cls: dict[int, list[dict]] = {}
    for ob in objects:
        by_cls.setdefault(ob["cls"], []).append(ob)

    def row(mid, x0, y0, x1, y1, occluded, truncated, group):
        return [image_id, "xclick" if rng.random() < 0.85 else "activemil", mid, "1",
                f"{x0 / w:.6f}", f"{x1 / w:.6f}", f"{y0 / h:.6f}", f"{y1 / h:.6f}",
                str(int(occluded)), str(int(truncated)), str(int(group)), "0", "0"]

    for k in sorted(by_cls):
        c = classes[k]
        mids = [m for m, _ in c.openimages]
        p = np.array([wt for _, wt in c.openimages], dtype=float)
        p /= p.sum()
        obs = by_cls[k]
        if len(obs) >= 3 and rng.random() < cfg.group_of_probability:
            x0 = min(o["bbox"][0] for o in obs)
            y0 = min(o["bbox"][1] for o in obs)
            x1 = max(o["bbox"][0] + o["bbox"][2] for o in obs)
            y1 = max(o["bbox"][1] + o["bbox"][3] for o in obs)
            rows.append(row(mids[0], x0, y0, x1, y1, True, any(o["truncated"] for o in obs), True))
            continue
        for o in obs:
            x, y, bw, bh = o["bbox"]
            rows.append(row(mids[rng.choice(len(mids), p=p)], x, y, x + bw, y + bh,
                            o["occluded"], o["truncated"], False))
    return rows


def write_coco(folder: Path, results: dict[str, list], names: dict[str, list], classes: list[SynthClass]) -> None:
    """instances_train2017.json and instances_val2017.json into `folder` (annotation ids run on
    across the two splits)."""
    ann_id = 1
    for split in ("coco_train2017", "coco_val2017"):
        ims, anns = [], []
        for (j, w, h, objects), image_id in zip(results[split], names[split]):
            ims.append({"license": 1, "file_name": f"{image_id:012d}.jpg", "coco_url": "",
                        "height": h, "width": w, "date_captured": "2017-01-01 00:00:00",
                        "flickr_url": "", "id": image_id})
            for o in objects:
                anns.append({"segmentation": o["segmentation"], "area": float(o["area"]), "iscrowd": 0,
                             "image_id": image_id, "bbox": [float(v) for v in o["bbox"]],
                             "category_id": classes[o["cls"]].coco_id, "id": ann_id})
                ann_id += 1
        sub = split.split("_")[1]
        (folder / f"instances_{sub}.json").write_text(coco_json(split, ims, anns))


def write_openimages_csv(path: Path, cfg: SynthConfig, results: list, ids: list[str],
                         classes: list[SynthClass]) -> list[list[str]]:
    """The OpenImages box CSV (official header, rows in ImageID order); returns its rows."""
    rng = np.random.default_rng([cfg.seed, 1003])
    rows = []
    for (j, w, h, objects), image_id in sorted(zip(results, ids), key=lambda t: t[1]):
        rows.extend(openimages_rows(rng, image_id, w, h, objects, classes, cfg))
    with path.open("w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(OPENIMAGES_HEADER)
        wr.writerows(rows)
    return rows
