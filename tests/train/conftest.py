"""Fixtures for the train tests: tiny WebDataset shards made with the real shard writer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.contracts import PROPOSALS_SCHEMA
from pipeline.shardset import SHARD_PATTERN
from pipeline.shards import ShardsConfig, write_index, write_shard

N_SHARDS, PER_SHARD = 6, 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """6 shards x 5 samples of small JPEGs; keys ending in 0 have no proposals."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    entries = []
    for s in range(N_SHARDS):
        rows, props = [], []
        for j in range(PER_SHARD):
            key = f"img_{s}_{j}"
            path = root / "src" / f"{key}.jpg"
            path.parent.mkdir(exist_ok=True)
            w, h = int(rng.integers(48, 96)), int(rng.integers(48, 96))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
            rows.append({"key": key, "source": "t", "image_id": key, "path": str(path), "width": w, "height": h})
            for r in range(j):
                props.append({"key": key, "x1": 0.0, "y1": 0.0, "x2": float(w - r), "y2": float(h - r), "rank": r})
        table = pa.Table.from_pylist(props, schema=PROPOSALS_SCHEMA)
        entries.append(write_shard(SHARD_PATTERN.format(s), rows, table, root, 95))
    write_index(root, entries, ShardsConfig(samples_per_shard=PER_SHARD), "(generated: no images table)")
    return root


