"""Browsing in FiftyOne: the dataset's counts and labels, and the app served offline."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import contracts as C
from pipeline.browse import WORST_VIEW, build_dataset, main


@pytest.fixture
def tiny_tables(tmp_path: Path):
    paths = []
    for i, (w, h) in enumerate([(200, 100), (100, 80)]):
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    images = C.conform(pa.table({
        "key": ["openimages_train_aaaa", "coco_val2017_000000000007"],
        "source": ["openimages_train", "coco_val2017"], "image_id": ["aaaa", "7"],
        "path": paths, "width": [200, 100], "height": [100, 80],
    }), C.IMAGES)
    boxes = C.conform(pa.table({
        "key": ["openimages_train_aaaa"] * 2 + ["coco_val2017_000000000007"],
        "label": ["/m/04yx4", "/m/07j7r", "cup"], "category_id": [1, -1, 47],
        "x1": [20.0, 0.0, 10.0], "y1": [10.0, 0.0, 8.0], "x2": [120.0, 50.0, 60.0], "y2": [60.0, 100.0, 48.0],
        "is_group": [False, True, False],
    }), C.BOXES)
    proposals = C.conform(pa.table({
        "key": ["openimages_train_aaaa"] * 3, "x1": [0.0, 1.0, 2.0], "y1": [0.0, 1.0, 2.0],
        "x2": [50.0, 60.0, 70.0], "y2": [50.0, 60.0, 70.0], "rank": [0, 1, 2],
    }), C.PROPOSALS)
    return images, boxes, proposals, tmp_path


def test_dataset_counts_labels_and_boxes(tiny_tables):
    images, boxes, proposals, _ = tiny_tables
    ds = build_dataset(images, boxes, proposals, name="test-browse")
    try:
        assert len(ds) == 2 and ds.persistent
        assert ds.count("ground_truth.detections") == 3
        assert ds.count("proposals.detections") == 3
        assert sorted(ds.distinct("ground_truth.detections.label")) == ["Man", "Tree", "cup"]  # names, not MIDs
        s = ds.match({"key": "openimages_train_aaaa"}).first()
        man = next(d for d in s.ground_truth.detections if d.label == "Man")
        assert man.bounding_box == pytest.approx([0.1, 0.1, 0.5, 0.5])
        assert man["mid_or_name"] == "/m/04yx4"
        assert [d["rank"] for d in s.proposals.detections] == [0, 1, 2]
        assert s.metadata.width == 200 and s.tags == ["openimages_train"]
        # rebuilding under the same name replaces the dataset
        ds2 = build_dataset(images, boxes, None, name="test-browse")
        assert len(ds2) == 2 and not ds2.has_sample_field("proposals")
    finally:
        import fiftyone as fo
        if fo.dataset_exists("test-browse"):
            fo.delete_dataset("test-browse")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def chromium_dom(url: str, profile: Path, budget_ms: int = 20000) -> str:
    """The DOM of `url` after `budget_ms` of virtual time in Debian's headless Chromium."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium (as .ci/run does)")
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                        f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                       capture_output=True, text=True, timeout=180)
    return r.stdout


def test_app_serves_the_worst_oknn_view_to_a_browser_and_shuts_down(tiny_tables):
    """The app of `python -m pipeline.browse --neighbours ... --launch` answers HTTP 200, a real
    (headless) browser renders the saved view "worst O-KNN queries" with the queries and their
    neighbours listed, and Ctrl-C stops the server."""
    import pyarrow.parquet as pq
    from fiftyone.core.utils import to_slug

    images, boxes, _, tmp = tiny_tables
    C.write_table(images, tmp / "images.parquet", C.IMAGES)
    C.write_table(boxes, tmp / "boxes.parquet", C.BOXES)
    pq.write_table(_neighbours(images.column("path").to_pylist()), tmp / "oknn_neighbours.parquet")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.browse", "--images", str(tmp / "images.parquet"),
         "--boxes", str(tmp / "boxes.parquet"), "--neighbours", str(tmp / "oknn_neighbours.parquet"),
         "--name", "test-app", "--launch", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True,
    )
    status, deadline = None, time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                status = urllib.request.urlopen(f"http://localhost:{port}/", timeout=2).status
                break
            except OSError:
                time.sleep(1)
        assert status == 200, proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "no answer"
        url = f"http://localhost:{port}/datasets/test-app?view={to_slug(WORST_VIEW)}"
        for attempt in range(3):            # the first render may still be compiling on a busy machine
            dom = chromium_dom(url, tmp / "chromium")
            if 'data-cy="entry-count-all"' in dom:
                break
        assert f">{WORST_VIEW}<" in dom, dom[-2000:]
        # 2 queries, each followed by its 3 neighbours (the default --top 5 shows all 3)
        assert '<span data-cy="entry-count-all">8</span> samples' in dom
        for field in ("oknn_rank", "oknn_similarity", "oknn_predicted", "oknn_correct"):
            assert f'data-cy="checkbox-{field}"' in dom
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://localhost:{port}/", timeout=2)

def _neighbours(paths):
    """A neighbours table over the fixture's two images: query 0 right, query 1 wrong."""
    from types import SimpleNamespace

    from eval.neighbours import neighbours_table

    boxes = np.array([[10, 10, 50, 40], [0, 0, 30, 30], [5, 5, 60, 60]], np.float32)
    train = SimpleNamespace(paths=paths, image=np.array([0, 0, 1]), category=np.array([1, 2, 1]), boxes=boxes)
    val = SimpleNamespace(paths=paths[1:], image=np.array([0, 0]), category=np.array([1, 2]), boxes=boxes[:2])
    sims = np.array([[0.9, 0.5, 0.4], [0.8, 0.7, 0.1]], np.float32)
    idx = np.array([[0, 2, 1], [0, 2, 1]])
    return neighbours_table(sims, idx, np.array([1, 1]), train, val, np.arange(3), {1: "cup", 2: "dog"})


def test_ground_truth_shown_proposals_a_toggle_away(tiny_tables):
    images, boxes, proposals, _ = tiny_tables
    ds = build_dataset(images, boxes, proposals, name="test-browse-app")
    try:
        cfg = ds.app_config
        assert cfg.active_fields.paths == ["ground_truth"] and not cfg.active_fields.exclude
        assert cfg.color_scheme.color_by == "value"
        groups = {g.name: g for g in cfg.sidebar_groups}
        assert groups["proposals"].paths == ["proposals"] and groups["proposals"].expanded is False
        assert sum(p == "proposals" for g in cfg.sidebar_groups for p in g.paths) == 1
    finally:
        import fiftyone as fo
        fo.delete_dataset("test-browse-app")


def test_worst_oknn_view_lists_wrong_queries_first_with_their_neighbours(tiny_tables):
    images, boxes, _, _ = tiny_tables
    ds = build_dataset(images, boxes, None, name="test-browse-oknn", neighbours=_neighbours(images.column("path").to_pylist()),
                       top=2)
    try:
        assert WORST_VIEW in ds.list_saved_views()
        view = ds.load_saved_view(WORST_VIEW)
        rows = [(s.oknn_query, s.oknn_rank, s.oknn_correct, s.oknn.detections[0].label, s.oknn_similarity) for s in view]
        assert rows == [(1, 0, False, "dog", None), (1, 1, False, "cup", pytest.approx(0.8)),
                        (1, 2, False, "cup", pytest.approx(0.7)),
                        (0, 0, True, "cup", None), (0, 1, True, "cup", pytest.approx(0.9)),
                        (0, 2, True, "cup", pytest.approx(0.5))]
        first = view.first()
        assert first.oknn_predicted == "cup" and "wrong" in first.tags and "query" in first.tags
        assert first.oknn.detections[0].bounding_box == pytest.approx([0.0, 0.0, 0.3, 0.375])   # 100 x 80 image
        assert len(ds) == 2 + 6 and ds.app_config.active_fields.paths == ["ground_truth", "oknn"]
    finally:
        import fiftyone as fo
        fo.delete_dataset("test-browse-oknn")


def test_main_logs_progress_and_a_summary(tiny_tables, tmp_path, caplog):
    import pyarrow.parquet as pq

    images, boxes, proposals, tmp = tiny_tables
    C.write_table(images, tmp / "images.parquet", C.IMAGES)
    C.write_table(boxes, tmp / "boxes.parquet", C.BOXES)
    (tmp / "props").mkdir()
    pq.write_table(proposals, tmp / "props" / "part-00000.parquet")
    pq.write_table(_neighbours(images.column("path").to_pylist()), tmp / "oknn_neighbours.parquet")
    with caplog.at_level("INFO", logger="pipeline.browse"):
        assert main(["--images", str(tmp / "images.parquet"), "--boxes", str(tmp / "boxes.parquet"),
                     "--proposals", str(tmp / "props"), "--neighbours", str(tmp / "oknn_neighbours.parquet"),
                     "--name", "test-browse-main"]) == 0
    try:
        text = caplog.text
        assert "ground truth: 3 boxes on 2 images" in text and "proposals: 3 boxes on 1 images" in text
        assert "images: 2 of 2 samples added" in text and "O-KNN queries and neighbours: 8 of 8 samples added" in text
        assert "wrote FiftyOne dataset 'test-browse-main': 10 samples, 3 ground-truth boxes, 3 proposals, 2 O-KNN" in text
    finally:
        import fiftyone as fo
        fo.delete_dataset("test-browse-main")


def test_proposals_folder_without_tables_names_the_fix(tmp_path):
    from pipeline.browse import read_proposals

    with pytest.raises(FileNotFoundError, match=r"no proposal tables under .*part-\*\.parquet, e\.g\. data/proposals"):
        read_proposals(tmp_path)
