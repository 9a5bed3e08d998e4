"""The stream never hangs on bad data, nor dies of one bad image (issue 14 section 4, issue 18 item 2)."""
from __future__ import annotations

import io
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train.stream as stream
from pipeline import shardset
from pipeline.params import ParamsError
from pipeline.shardset import PROPOSALS_SUFFIX, SHARD_PATTERN, ShardDataError
from train.stream import LoaderConfig, batches_per_worker, make_loader, make_stream
from train.views import ViewConfig


def small(**kw) -> LoaderConfig:
    base = dict(batch_size=4, workers=0, shuffle_buffer=8, views=ViewConfig(size=64, small_size=32))
    base.update(kw)
    return LoaderConfig(**base)


def jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def rewrite(tar_path: Path, change: dict[str, bytes]) -> None:
    """Rewrite a shard by hand with some members' bytes replaced (same member names and order)."""
    with tarfile.open(tar_path) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isreg()]
    assert set(change) <= {name for name, _ in members}
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            data = change.get(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def truncated(tar_path: Path, key: str) -> bytes:
    with tarfile.open(tar_path) as t:
        data = t.extractfile(f"{key}.jpg").read()
    return data[: len(data) // 2]


@pytest.fixture
def copy(shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out


# ------------------------------------------------------------------------- shards that cannot be read

@pytest.mark.timeout(20)
def test_missing_shards_stop_the_worker_with_an_error_naming_them(copy, tmp_path):
    """Resampled draws used to retry missing shards for ever (a warning per draw, no batch)."""
    gone = [str(tmp_path / "gone-1.tar"), str(tmp_path / "gone-2.tar")]
    with pytest.raises(ShardDataError) as e:
        next(iter(make_stream(gone, small(max_shard_failures=6), seed=0, total_samples=10)))
    msg = str(e.value)
    assert all(g in msg for g in gone) and "max_shard_failures: 6" in msg and "FileNotFoundError" in msg
    assert "dvc repro shards" in msg
    # through a loader worker (forkserver): the same error reaches the trainer
    junk = copy / SHARD_PATTERN.format(0)
    junk.write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ShardDataError, match="failed to read 8 shards in a row"):
        next(iter(make_loader([str(junk)], small(workers=1), seed=0, total_samples=10)))


def test_one_bad_shard_among_good_ones_is_skipped_not_fatal(copy):
    bad = copy / SHARD_PATTERN.format(2)
    bad.write_bytes(bad.read_bytes()[:700])
    urls, total = shardset.shards(copy)
    batches = list(make_stream(urls, small(max_shard_failures=2, epoch_samples=80), seed=0, total_samples=total))
    assert len(batches) == 20 and int(batches[-1]["errors"]) > 0


def test_missing_or_unreadable_index_and_proposal_tables_are_errors_naming_the_file(copy):
    index = copy / "index.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    with pytest.raises(ShardDataError, match=rf"{index}.*dvc repro shards"):
        shardset.shards(copy)
    index.unlink()
    with pytest.raises(ShardDataError, match=rf"no shard index {index}.*dvc repro shards"):
        shardset.shards(copy)
    index.write_text(text)
    sidecar = copy / SHARD_PATTERN.format(3).replace(".tar", PROPOSALS_SUFFIX)
    sidecar.rename(sidecar.with_suffix(".bak"))
    with pytest.raises(ShardDataError, match=rf"not there: {sidecar}.*dvc repro shards"):
        shardset.shards(copy)
    sidecar.with_suffix(".bak").rename(sidecar)
    urls, _ = shardset.shards(copy)
    sidecar.write_bytes(sidecar.read_bytes()[:100])                 # truncated parquet
    with pytest.raises(ShardDataError, match=rf"proposal table {sidecar}.*dvc repro shards"):
        list(make_stream(urls, small(resampled=False), seed=0))


def test_a_sidecar_that_breaks_the_proposals_contract_is_an_error_naming_it(copy):
    """The stream validates the proposal table it reads: boxes with x2 < x1 (readable parquet, the
    right columns) are refused, not cut into views."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sidecar = copy / SHARD_PATTERN.format(1).replace(".tar", PROPOSALS_SUFFIX)
    t = pq.read_table(sidecar)
    assert t.num_rows > 0
    flipped = t.set_column(t.schema.get_field_index("x2"), "x2", pa.compute.subtract(t.column("x1"), 1.0))
    pq.write_table(flipped, sidecar)
    shards, _ = shardset.shards(copy)
    with pytest.raises(ShardDataError, match=rf"proposal table {sidecar}.*breaks its contract.*dvc repro shards"):
        list(make_stream(shards, small(resampled=False), seed=0))


# ------------------------------------------------------------------------- samples that cannot be decoded

@pytest.mark.parametrize("workers,start", [(0, 3), (0, 7), (2, 5)])
def test_resume_after_an_undecodable_sample_lands_on_the_same_sample(copy, workers, start):
    for s, keys in ((1, ("img_1_1", "img_1_3")), (4, ("img_4_2",))):
        tar = copy / SHARD_PATTERN.format(s)
        rewrite(tar, {f"{k}.jpg": truncated(tar, k) for k in keys})
    urls, total = shardset.shards(copy)
    cfg = small(workers=workers, epoch_samples=48)
    full = list(make_loader(urls, cfg, seed=2, total_samples=total))
    assert any(int(b["errors"]) for b in full[:start])             # a bad sample was skipped before `start`
    rest = list(make_loader(urls, cfg, seed=2, total_samples=total, start_batch=start))
    assert len(rest) == len(full) - start
    for x, y in zip(full[start:], rest):
        assert x["key"] == y["key"] and torch.equal(x["x1"], y["x1"]) and torch.equal(x["boxes2"], y["boxes2"])
        assert int(x["errors"]) == int(y["errors"])


def test_any_decoding_error_skips_the_sample_counted_and_logged_once(copy, monkeypatch, caplog):
    one, four = copy / SHARD_PATTERN.format(1), copy / SHARD_PATTERN.format(4)
    rewrite(one, {"img_1_2.jpg": jpeg(300, 300)})                  # over the pixel limit set below
    rewrite(four, {"img_4_1.jpg": jpeg(77, 33)})                   # make_views raises on this one
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)         # 2x: 40k < 90k px; the others <= 9.2k px
    real = stream.make_views

    def views(im, *a, **kw):
        if im.size == (77, 33):
            raise ZeroDivisionError("a bug on odd sizes")
        return real(im, *a, **kw)

    monkeypatch.setattr(stream, "make_views", views)
    urls = [str(one), str(four)]
    with caplog.at_level(logging.WARNING, logger="train.stream"):
        batches = list(make_stream(urls, small(epoch_samples=48), seed=0, total_samples=10))
    keys = {k for b in batches for k in b["key"]}
    assert len(batches) == 12 and not keys & {"img_1_2", "img_4_1"}
    errors = int(batches[-1]["errors"])
    msgs = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert errors > len(msgs) == 2                                  # every occurrence counted, each logged once
    bomb = next(m for m in msgs if "img_1_2" in m)
    assert str(one) in bomb and "too_large" in bomb                 # pipeline.images' category for PIL's bomb
    assert any(str(four) in m and "img_4_1" in m and "ZeroDivisionError" in m for m in msgs)


@pytest.mark.timeout(20)
def test_a_worker_that_decodes_nothing_stops_with_an_error(shards, monkeypatch):
    def broken(*a, **kw):
        raise TypeError("broken views")

    monkeypatch.setattr(stream, "make_views", broken)
    urls, total = shardset.shards(shards)
    with pytest.raises(ShardDataError, match=r"5 samples in a row \(loader.max_sample_failures: 5\).*TypeError"):
        next(iter(make_stream(urls, small(max_sample_failures=5), seed=0, total_samples=total)))


# ------------------------------------------------------------------------- settings

def test_exact_mode_is_refused_for_several_training_processes(shards):
    urls, total = shardset.shards(shards)
    for world in (2, 8):
        with pytest.raises(ParamsError, match="loader.resampled is false with"):
            make_stream(urls, small(resampled=False), seed=0, world=world)
        with pytest.raises(ParamsError, match="loader.resampled"):
            batches_per_worker(small(resampled=False), total, world)     # pretrain sizes the schedule first
    make_stream(urls, small(), seed=0, total_samples=total, world=2)
    make_stream(urls, small(resampled=False), seed=0, world=1)


@pytest.mark.parametrize("key", ["max_shard_failures", "max_sample_failures"])
def test_failure_limits_must_be_positive(key):
    with pytest.raises(ParamsError, match=f"loader.{key} is 0"):
        small(**{key: 0})
