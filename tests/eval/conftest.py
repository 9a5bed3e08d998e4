"""Fixtures of the evaluation tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_openimage_mini(tiny_synth, tmp_path_factory) -> Path:
    """OpenImage-MINI of the small embedded data set (the sample stage's outputs), built once."""
    from pipeline import sample

    out = tmp_path_factory.mktemp("openimage_mini") / "openimage_mini"
    oi = tiny_synth / "openimages"
    assert sample.main([
        "--coco-annotations", str(tiny_synth / "coco" / "annotations" / "instances_train2017.json"),
        "--openimages-boxes", str(oi / "oidv6-train-annotations-bbox.csv"),
        "--openimages-classes", str(oi / "class-descriptions-boxable.csv"),
        "--openimages-images", str(oi / "train"), "--out", str(out),
    ]) == 0
    return out
