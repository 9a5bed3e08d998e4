"""The whole battery of bad inputs through the real jobs, chained as `dvc repro` chains them:
the proposals job (Ray), the shards job on its output, and one training epoch.

Every job finishes; each bad image is listed once by the first stage that meets it, with its
category (`failures.csv` of proposals), and the shards stage lists it once more as
`proposals_failed` with that category in the detail; every good image reaches training with the
pixels the proposals stage searched."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from pipeline import contracts as C
from pipeline import shardset
from pipeline.images import decode
from pipeline.proposals import ProposalsConfig
from pipeline.proposals import run as run_proposals
from pipeline.proposalset import read_failures, read_parts
from pipeline.shards import ShardsConfig
from pipeline.shards import run as run_shards
from tests.pipeline.test_shards import make_battery, shard_samples


def test_battery_through_proposals_shards_and_one_epoch(tmp_path):
    images, _, expected = make_battery(tmp_path)
    expected.pop("proposals_failed")           # a good image the fake failures.csv listed: not here
    rows = {r["key"]: r for r in C.read_table(images, C.IMAGES).to_pylist()}

    summary = run_proposals(images, tmp_path / "ss", ProposalsConfig(max_side=64, images_per_part=4),
                            num_workers=1, progress=False)
    failed = read_failures(tmp_path / "ss")
    assert failed == expected                                # each bad image once, with its category
    assert summary["failures"] == dict(collections.Counter(expected.values()))
    searched = set(read_parts(tmp_path / "ss").column("key").to_pylist())
    assert searched <= set(rows) - set(expected)

    index = run_shards(images, tmp_path / "ss", tmp_path / "shards", ShardsConfig(samples_per_shard=4, seed=0),
                       num_workers=1, progress=False)
    listed = {f["key"]: f for f in index["failures"]}
    assert set(listed) == set(expected) and len(index["failures"]) == len(expected)
    for key, reason in expected.items():
        assert listed[key]["reason"] == "proposals_failed" and reason in listed[key]["detail"], listed[key]
    packed = shard_samples(tmp_path / "shards", index)
    good = set(rows) - set(expected)
    assert set(packed) == good
    jpeg = 0
    for key, data in packed.items():       # what training decodes = what the proposals stage searched:
        seen = decode(rows[key]["path"], rows[key]["width"], rows[key]["height"])[0]
        stored = decode(data, rows[key]["width"], rows[key]["height"])[0]
        if Path(rows[key]["path"]).read_bytes().startswith(data):      # a JPEG stored as its own bytes:
            jpeg += 1                                                   # the very same pixels
            assert np.array_equal(stored, seen), key
        else:                                                           # re-encoded once (PNG, ...): close
            assert np.abs(stored.astype(np.int16) - seen).mean() < 6, key
    assert 0 < jpeg < len(packed)

    from train.stream import LoaderConfig, make_stream
    from train.views import ViewConfig

    shards, total = shardset.shards(tmp_path / "shards")
    loader = LoaderConfig(batch_size=1, workers=0, shuffle_buffer=2, resampled=False,
                          views=ViewConfig(size=64, small_size=32))
    batches = list(make_stream(shards, loader, seed=0))
    assert sorted(k for b in batches for k in b["key"]) == sorted(good) == sorted(packed) and total == len(good)
    assert int(batches[-1]["errors"]) == 0
