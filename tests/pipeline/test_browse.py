"""Browsing in FiftyOne: the dataset's counts and labels, and the app served offline."""
from __future__ import annotations

import os
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
from pipeline.browse import build_dataset


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


def test_app_serves_http_200_and_shuts_down(tiny_tables):
    images, boxes, _, tmp = tiny_tables
    C.write_table(images, tmp / "images.parquet", C.IMAGES)
    C.write_table(boxes, tmp / "boxes.parquet", C.BOXES)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.browse", "--images", str(tmp / "images.parquet"),
         "--boxes", str(tmp / "boxes.parquet"), "--name", "test-app", "--launch", "--port", str(port)],
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
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://localhost:{port}/", timeout=2)
