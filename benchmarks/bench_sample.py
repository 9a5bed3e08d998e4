"""OpenImage-MINI sampling at the real scale: wall time and peak memory against pyarrow's read.

    python -m benchmarks.bench_sample [--rows 14600000] [--images 1740000] [--workdir /tmp/bench_sample]

Generates, once, an OpenImages box CSV of the real train file's size in the real format (official
header, 16-hex ImageIDs sorted, MIDs of the real class list with a long-tailed frequency,
normalised coordinates, flags) and a COCO instances JSON of COCO train2017's size (118k images,
860k annotations). Then measures, each in a fresh process so peak RSS is its own:
 - baseline: `pyarrow.csv.read_csv` of the whole CSV (all columns, default options);
 - the stage: `pipeline.sample.run` on the same files (no image folder: the selection, statistics
   and image list, as before the images are downloaded).
Targets: stage time <= 3x the baseline, stage peak RSS < 8 GiB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.categories import coco_categories, read_class_mapping, read_openimages_classes
from pipeline.readers import OPENIMAGES_HEADER

COCO_IMAGES, COCO_ANNOTATIONS = 118_287, 860_001


def make_csv(path: Path, rows: int, images: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    mids = np.array(sorted(read_openimages_classes()))
    w = 1.0 / np.arange(1, len(mids) + 1) ** 1.1
    label = mids[rng.permutation(len(mids))][rng.choice(len(mids), size=rows, p=w / w.sum())]
    ids = np.unique(rng.integers(0, 2**63, size=int(images * 1.01), dtype=np.int64))[:images]
    # rows per image: every image at least one, the rest spread at random
    per = 1 + np.bincount(rng.integers(0, images, size=rows - images), minlength=images)
    image = np.repeat(np.arange(images), per)
    x0 = rng.uniform(0, 0.8, rows)
    y0 = rng.uniform(0, 0.8, rows)
    x1 = np.minimum(x0 + rng.uniform(0.01, 0.5, rows), 1.0)
    y1 = np.minimum(y0 + rng.uniform(0.01, 0.5, rows), 1.0)
    hexid = np.char.zfill(np.char.mod("%x", ids), 16)
    flag = lambda p: pa.array(np.where(rng.random(rows) < p, "1", "0"))  # noqa: E731
    table = pa.table({
        "ImageID": pa.array(hexid[image]),
        "Source": pa.array(np.where(rng.random(rows) < 0.85, "xclick", "activemil")),
        "LabelName": pa.array(label),
        "Confidence": pa.array(np.full(rows, "1")),
        "XMin": pa.array(np.round(x0, 6)), "XMax": pa.array(np.round(x1, 6)),
        "YMin": pa.array(np.round(y0, 6)), "YMax": pa.array(np.round(y1, 6)),
        "IsOccluded": flag(0.6), "IsTruncated": flag(0.3), "IsGroupOf": flag(0.05),
        "IsDepiction": flag(0.05), "IsInside": flag(0.01),
    })
    assert table.column_names == list(OPENIMAGES_HEADER)
    with pa.OSFile(str(path), "wb") as f:
        f.write((",".join(OPENIMAGES_HEADER) + "\n").encode())  # the official header, unquoted
        pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False, quoting_style="none"))


def make_coco(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    cats = [c.id for c in coco_categories()]
    w = 1.0 / np.arange(1, 81) ** 1.2
    cat = np.array(cats)[rng.choice(80, size=COCO_ANNOTATIONS, p=w / w.sum())]
    img = rng.integers(1, COCO_IMAGES + 1, size=COCO_ANNOTATIONS)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(1, COCO_IMAGES + 1)]
    anns = [{"id": k + 1, "image_id": int(i), "category_id": int(c), "bbox": [10.0, 20.0, 100.0, 80.0],
             "area": 8000.0, "iscrowd": 0, "segmentation": [[10, 20, 110, 20, 110, 100]]}
            for k, (i, c) in enumerate(zip(img, cat))]
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns,
                                "categories": [{"id": c.id, "name": c.name, "supercategory": c.supercategory}
                                               for c in coco_categories()]}))


def measure(code: str) -> tuple[float, float, str]:
    """Run `code` in a fresh interpreter; return (seconds, peak RSS in GiB, its stdout).

    The RSS is the process's peak plus its largest child's (the stage parses COCO in a child
    process at the same time), an upper bound of what the two hold together."""
    wrapper = (
        "import resource, time\nt0 = time.perf_counter()\n" + code +
        "\nprint('SECONDS', time.perf_counter() - t0)"
        "\nprint('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"
        " + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True).stdout
    vals = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith(("SECONDS", "MAXRSS"))}
    return vals["SECONDS"], vals["MAXRSS"] / 2**20, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=14_600_000)
    p.add_argument("--images", type=int, default=1_740_000)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_sample"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    csv_path = args.workdir / f"oidv6-train-annotations-bbox-{args.rows}.csv"
    coco_path = args.workdir / "instances_train2017.json"
    if not csv_path.exists():
        t0 = time.perf_counter()
        make_csv(csv_path, args.rows, args.images)
        print(f"generated {csv_path} ({csv_path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    if not coco_path.exists():
        make_coco(coco_path)
    read_mapping = read_class_mapping()  # fail early if the manifests are broken
    assert read_mapping.mid_to_coco

    base_s, base_rss, _ = measure(f"import pyarrow.csv as c\nt = c.read_csv({str(csv_path)!r})\nprint('ROWS', t.num_rows)")
    stage_s, stage_rss, out = measure(
        "from pathlib import Path\nfrom pipeline.sample import SampleConfig, run\n"
        "from pipeline.categories import OPENIMAGES_CLASSES_CSV\n"
        f"s = run(Path({str(coco_path)!r}), Path({str(csv_path)!r}), OPENIMAGES_CLASSES_CSV, "
        f"Path({str(args.workdir / 'out')!r}), SampleConfig())\n"
        "print('SELECTED', s['openimage_mini']['num_images'], 'READ', s['run']['seconds']['read'])"
    )
    sel = next(line for line in out.splitlines() if line.startswith("SELECTED")).split()
    print(f"pyarrow read_csv alone : {base_s:6.1f} s, peak RSS {base_rss:.2f} GiB")
    print(f"sample stage           : {stage_s:6.1f} s, peak RSS {stage_rss:.2f} GiB "
          f"(reading COCO + OpenImages {float(sel[3]):.1f} s; {sel[1]} images selected)")
    print(f"ratio stage / read     : {stage_s / base_s:.2f}x (target <= 3x); peak RSS target < 8 GiB")


if __name__ == "__main__":
    main()
