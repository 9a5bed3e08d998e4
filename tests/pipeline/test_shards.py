"""Shards: a Ray job writing WebDataset tars + proposal tables that read back every which way."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import contracts as C
from pipeline.shards import ShardsConfig, plan_shards, run, split_proposals
from pipeline import shards as shards_module
from pipeline import shardset
from pipeline.shardset import proposals_name


def make_inputs(root: Path, n: int = 23) -> tuple[Path, Path, dict[str, bytes]]:
    """n JPEGs, one PNG with alpha, one missing file; an images table and 1-4 proposals per key but
    key 1 (a JPEG the proposals output does not hold: left out as `proposals_missing`)."""
    rng = np.random.default_rng(0)
    rows, props, sources = [], [], {}
    for i in range(n + 2):
        key = f"openimages_train_{i:016x}"
        w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        path = root / "img" / (f"{i:016x}.png" if i == n else f"{i:016x}.jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        if i == n + 1:
            pass  # listed in the table, missing on disk
        elif i == n:
            Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA").save(path)
        else:
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=85)
            sources[key] = path.read_bytes()
        rows.append({"key": key, "source": "openimages_train", "image_id": f"{i:016x}", "path": str(path),
                     "width": w, "height": h})
        for r in range(0 if i == 1 else 1 + i % 4):
            props.append({"key": key, "x1": float(r), "y1": 1.0, "x2": float(r + 20), "y2": 30.0, "rank": r})
    images = C.write_table(pa.Table.from_pylist(rows), root / "images.parquet", C.IMAGES)
    (root / "props").mkdir()
    C.write_table(pa.Table.from_pylist(props), root / "props" / "part-00000.parquet", C.PROPOSALS)
    return images, root / "props", sources


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    images, props, sources = make_inputs(root)
    index = run(images, props, root / "out", ShardsConfig(samples_per_shard=7, seed=3), num_workers=2, progress=False)
    return root, index, sources


def test_plan_is_a_seeded_shuffle_cut_into_shards():
    keys = [f"k{i}" for i in range(10)]
    plan = plan_shards(keys, 4, seed=1)
    assert [len(s) for s in plan] == [4, 4, 2]
    assert sorted(k for s in plan for k in s) == sorted(keys)
    assert plan == plan_shards(keys, 4, seed=1) and plan != plan_shards(keys, 4, seed=2)
    with pytest.raises(ValueError, match="at least 1"):
        plan_shards(keys, 0, 1)


def test_round_trip_bytes_proposals_and_checksums(built):
    root, index, sources = built
    out = root / "out"
    props = C.read_table(root / "props" / "part-00000.parquet", C.PROPOSALS).to_pylist()
    seen = {}
    for entry in index["shards"]:
        tar_path = out / entry["name"]
        assert hashlib.sha256(tar_path.read_bytes()).hexdigest() == entry["sha256"]
        prop_path = out / entry["proposals"]
        assert entry["proposals"] == proposals_name(entry["name"])
        assert hashlib.sha256(prop_path.read_bytes()).hexdigest() == entry["proposals_sha256"]
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            keys = [n[:-4] for n in names if n.endswith(".jpg")]
            for k in keys:
                seen[k] = tar.extractfile(f"{k}.jpg").read()
                meta = json.loads(tar.extractfile(f"{k}.json").read())
                assert meta["key"] == k and set(meta) == {"key", "source", "image_id", "width", "height"}
        assert entry["samples"] == len(keys)
        table = C.read_table(prop_path, C.PROPOSALS).to_pylist()
        expected = sorted((p for p in props if p["key"] in keys), key=lambda p: (keys.index(p["key"]), p["rank"]))
        assert table == expected                      # exactly that shard's keys, in tar order then rank
    not_proposed = "openimages_train_" + f"{1:016x}"
    for k, data in sources.items():
        if k != not_proposed:
            assert seen[k] == data                    # JPEGs: the original bytes
    png_key = "openimages_train_" + f"{23:016x}"
    assert seen[png_key][:3] == b"\xff\xd8\xff"        # the PNG became a JPEG
    assert Image.open(io.BytesIO(seen[png_key])).mode == "RGB"
    assert index["total_samples"] == 23 and not_proposed not in seen
    failures = {f["key"]: f for f in index["failures"]}
    assert failures[not_proposed]["reason"] == "proposals_missing" and "rerun the proposals stage" in \
        failures[not_proposed]["detail"]
    assert "no failures.csv" in failures[not_proposed]["detail"]       # make_inputs writes none
    assert failures["openimages_train_" + f"{24:016x}"]["reason"] == "missing_file"
    assert index["failure_reasons"] == {"missing_file": 1, "proposals_missing": 1}
    assert json.loads((out / "index.json").read_text()) == index


def test_reads_back_with_webdataset_and_ray_data(built):
    import ray
    import webdataset as wds

    root, index, _ = built
    urls = [str(root / "out" / s["name"]) for s in index["shards"]]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert len(keys) == 23 == len(set(keys))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_webdataset(urls)
        rows = ds.take_all()
        assert len(rows) == 23 and all("jpg" in r and "json" in r for r in rows)
    finally:
        ray.shutdown()


def test_rerun_writes_only_missing_shards_and_a_new_plan_starts_over(tmp_path: Path):
    images, props, _ = make_inputs(tmp_path, n=10)
    out = tmp_path / "out"
    cfg = ShardsConfig(samples_per_shard=4, seed=0)
    first = run(images, props, out, cfg, num_workers=2, progress=False)
    names = [s["name"] for s in first["shards"]]
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}
    # an interrupted run: one shard's tar is gone, another lost its table, a stray temp file is left
    (out / names[1]).unlink()
    (out / proposals_name(names[2])).unlink()
    (out / f".{names[0]}.tmp-deadbeef").write_bytes(b"half")
    (out / "train-000099.tar").write_bytes(b"a shard of a run with more shards")    # no plan names it
    second = run(images, props, out, cfg, num_workers=2, progress=False)
    assert not (out / "train-000099.tar").exists()
    for n in names:
        if n in (names[1], names[2]):
            assert (out / n).exists()
        else:
            assert (out / n).stat().st_mtime_ns == mtimes[n]       # untouched
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]
    assert second == first          # the reused shards' entries (failures, re-encodes) equal fresh ones
    assert not list(out.glob(".*tmp*"))
    # nothing to do: no Ray cluster is started, the index is the same
    third = run(images, props, out, cfg, num_workers=2, progress=False)
    assert third == first
    # another code version of the stage (DVC reruns it after a code edit): every shard is rebuilt
    before = {n: (out / n).stat().st_mtime_ns for n in names}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards_module, "code_version", lambda module: "another version")
        fourth = run(images, props, out, cfg, num_workers=2, progress=False)
    assert fourth == first and all((out / n).stat().st_mtime_ns != before[n] for n in names)
    # another plan: the old shards go
    run(images, props, out, ShardsConfig(samples_per_shard=6, seed=0), num_workers=2, progress=False)
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]


def test_a_store_that_cannot_be_reached_stops_the_rerun_and_keeps_the_set(tmp_path: Path, monkeypatch):
    """Checking a rerun's shards reads every image: when the store itself fails (credentials,
    endpoint), that is the job's error, not "every image changed", which would hide the index and
    rebuild every shard."""
    from pipeline import storage

    images, props, _ = make_inputs(tmp_path, n=4)
    out = tmp_path / "out"
    run(images, props, out, ShardsConfig(samples_per_shard=3), num_workers=1, progress=False)
    before = folder_bytes(out)

    def unreachable(loc):
        raise storage.StorageError(f"cannot read {loc}: NoCredentialsError: Unable to locate credentials")
    monkeypatch.setattr(storage, "sha256", unreachable)
    with pytest.raises(storage.StorageError, match="NoCredentialsError"):
        run(images, props, out, ShardsConfig(samples_per_shard=3), num_workers=1, progress=False)
    assert folder_bytes(out) == before


def test_split_proposals_slices_per_shard():
    t = pa.table({"key": ["b", "a", "c", "a", "z"], "x1": [0.0] * 5, "y1": [0.0] * 5, "x2": [1.0] * 5,
                  "y2": [1.0] * 5, "rank": pa.array([0, 1, 0, 0, 0], pa.int32())})
    parts = split_proposals(t, [["a", "b"], ["c"], ["d"]])
    assert [p.column("key").to_pylist() for p in parts] == [["a", "a", "b"], ["c"], []]
    assert parts[0].column("rank").to_pylist() == [0, 1, 0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_same_inputs_same_bytes(tmp_path: Path):
    """Every file of the output, index.json included (no timing), is byte-identical between two
    runs on other worker counts and another speed-only setting (`max_retries`); so is a run that
    reused shards of a killed one."""
    images, props, _ = make_inputs(tmp_path, n=6)
    a = run(images, props, tmp_path / "a", ShardsConfig(samples_per_shard=4), num_workers=1, progress=False)
    b = run(images, props, tmp_path / "b", ShardsConfig(samples_per_shard=4, max_retries=1), num_workers=2,
            progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert os.listdir(tmp_path / "a") and not list((tmp_path / "a").glob(".*tmp*"))
    assert len(folder_bytes(tmp_path / "a")) == 3 * len(a["shards"]) + 2     # tars, tables, stamps, index, plan
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert "seconds" not in json.loads((tmp_path / "a" / "index.json").read_text())
    # a killed run: the shard holding the failures is gone; the rerun reuses the others
    broken = next(s["name"] for s in a["shards"] if s["failures"])
    (tmp_path / "b" / broken).unlink()
    (tmp_path / "b" / "index.json").unlink()
    run(images, props, tmp_path / "b", ShardsConfig(samples_per_shard=4), num_workers=2, progress=False)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


# ------------------------------------------------------------------ bad inputs, stamps, reruns


def make_battery(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """Good JPEGs, every mode of tests/pipeline/test_images.py, and one of each bad input; a
    proposals folder whose failures.csv lists one good-looking image. -> images, proposals, key -> expected failure."""
    import pyarrow.csv as pacsv

    from tests.pipeline.test_images import H, W, gradient, jpeg, sof_patched, write_modes

    img = root / "img"
    files = {f"mode_{n}": (p, W, H) for n, p in write_modes(img).items()}
    good = jpeg(gradient())
    for i in range(4):
        (img / f"good{i}.jpg").write_bytes(jpeg(np.roll(gradient(), 5 * i, axis=1)))
        files[f"good{i}"] = (img / f"good{i}.jpg", W, H)
    # odd but good: one pixel, and a 48-megapixel photo (under PIL's limit: packed, never an error)
    for name, (w, h) in {"one_pixel": (1, 1), "big_8000x6000": (8000, 6000)}.items():
        (img / f"{name}.jpg").write_bytes(jpeg(gradient(w, h)))
        files[name] = (img / f"{name}.jpg", w, h)
    bad = {
        "zero_bytes": (b"", W, H),
        "truncated": (good[: len(good) // 2], W, H),
        "not_an_image": (b"\xff\xd8\xff" + b"password=hunter2\n" * 20, W, H),
        "size_mismatch": (good, W, H + 3),
        "too_large": (sof_patched(good, 20000, 20000), 20000, 20000),
        "proposals_failed": (good, W, H),
    }
    for name, (data, w, h) in bad.items():
        (img / f"{name}.jpg").write_bytes(data)
        files[name] = (img / f"{name}.jpg", w, h)
    files["missing_file"] = (img / "gone.jpg", W, H)
    rows = [{"key": k, "source": "test", "image_id": k, "path": str(p), "width": w, "height": h}
            for k, (p, w, h) in files.items()]
    images = C.write_table(pa.Table.from_pylist(rows), root / "images.parquet", C.IMAGES)
    props = [{"key": k, "x1": 1.0, "y1": 2.0, "x2": 30.0, "y2": 20.0, "rank": 0} for k in files]
    (root / "props").mkdir()
    C.write_table(pa.Table.from_pylist(props), root / "props" / "part-00000.parquet", C.PROPOSALS)
    pacsv.write_csv(pa.table({"key": ["proposals_failed"], "path": [str(files["proposals_failed"][0])],
                              "reason": ["search_error"], "detail": ["OpenCV raised"]}), root / "props" / "failures.csv")
    expected = {k: k for k in bad} | {"missing_file": "missing_file", "zero_bytes": "not_an_image"}
    return images, root / "props", expected


def shard_samples(out: Path, index: dict) -> dict[str, bytes]:
    got = {}
    for entry in index["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    got[m.name[:-4]] = tar.extractfile(m).read()
    return got


def test_battery_packs_only_what_decodes_and_lists_the_rest(tmp_path: Path):
    """One run over the battery: the job finishes (an image over the pixel limit included), every
    good image is packed with the pixels the proposals stage saw, every bad one is listed once with
    its category. A rerun keeps the failure record; changed bytes or proposals under the same keys
    rebuild exactly the shards they belong to."""
    from pipeline.images import decode
    from pipeline.proposals import decode as proposals_decode

    images, props, expected = make_battery(tmp_path)
    out = tmp_path / "out"
    cfg = ShardsConfig(samples_per_shard=5, seed=1)
    first = run(images, props, out, cfg, num_workers=2, progress=False)
    rows = {r["key"]: r for r in C.read_table(images, C.IMAGES).to_pylist()}
    assert {f["key"]: f["reason"] for f in first["failures"]} == expected
    assert len(first["failures"]) == len(expected)
    assert first["failure_reasons"] == dict(collections.Counter(expected.values()))
    assert all(f["detail"] and "0x" not in f["detail"] for f in first["failures"])
    packed = shard_samples(out, first)
    assert set(packed) == set(rows) - set(expected) and first["total_samples"] == len(packed)
    for k, data in packed.items():     # the shard's pixels = the proposals' pixels (re-encoded ones: within JPEG error)
        seen = proposals_decode(rows[k]["path"], rows[k]["width"], rows[k]["height"])[0]
        stored = decode(data, rows[k]["width"], rows[k]["height"])[0]
        assert np.abs(stored.astype(np.int16) - seen).mean() < 6, k
    assert json.loads((out / "index.json").read_text()) == first

    # One training epoch over these shards: every packed image trains, none is skipped.
    from train.stream import LoaderConfig, make_stream
    from train.views import ViewConfig

    urls, total = shardset.shards(out)
    loader = LoaderConfig(batch_size=1, workers=0, shuffle_buffer=2, resampled=False,
                          views=ViewConfig(size=64, small_size=32))
    batches = list(make_stream(urls, loader, seed=0))
    assert sorted(k for b in batches for k in b["key"]) == sorted(packed) and total == len(packed)
    assert int(batches[-1]["errors"]) == 0

    # A rerun on the same inputs: nothing rebuilt, the same index, failures included.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("train-")}
    again = run(images, props, out, cfg, num_workers=2, progress=False)
    assert again == first and json.loads((out / "index.json").read_text())["failures"] == first["failures"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("train-")} == mtimes

    # Same keys, other inputs: good0's bytes change (same size), good1's proposals change.
    shard_of = {k: s["name"] for s in first["shards"] for k in shard_samples(out, {"shards": [s]})}
    new_bytes = jpeg_of_noise()
    Path(rows["good0"]["path"]).write_bytes(new_bytes)
    t = C.read_table(props / "part-00000.parquet", C.PROPOSALS).to_pylist()
    for p in t:
        if p["key"] == "good1":
            p["x2"] = 40.0
    C.write_table(pa.Table.from_pylist(t), props / "part-00000.parquet", C.PROPOSALS)
    third = run(images, props, out, cfg, num_workers=2, progress=False)
    rebuilt = {shard_of["good0"], shard_of["good1"]}
    for name, before in mtimes.items():
        tar_or_table = name.endswith(".tar") or name.endswith(".parquet")
        if tar_or_table and name.split(".")[0] + ".tar" in rebuilt:
            assert (out / name).stat().st_mtime_ns != before, name
        elif name.split(".")[0] + ".tar" not in rebuilt:
            assert (out / name).stat().st_mtime_ns == before, name
    assert shard_samples(out, third)["good0"] == new_bytes
    table = C.read_table(out / proposals_name(shard_of["good1"]), C.PROPOSALS).to_pylist()
    assert [p["x2"] for p in table if p["key"] == "good1"] == [40.0]
    assert third["failures"] == first["failures"]


def jpeg_of_noise() -> bytes:
    from tests.pipeline.test_images import H, W

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_stamp_covers_every_input_of_a_shard():
    """The stamp a shard is reused by changes with each input: a row's path, size or ids, an image's
    bytes, a proposal, the proposals stage's failures, the setting; and with nothing else."""
    from pipeline.shard_reuse import inputs_stamp

    rows = [{"key": k, "source": "s", "image_id": k, "path": f"img/{k}.jpg", "width": 40, "height": 30} for k in "ab"]
    props = pa.table({"key": ["a", "a", "b"], "x1": [0.0, 1.0, 2.0], "y1": [0.0] * 3, "x2": [9.0] * 3,
                      "y2": [9.0] * 3, "rank": pa.array([0, 1, 0], pa.int32())})
    digests = {"a": "1" * 64, "b": "2" * 64}
    base = inputs_stamp("train-000000.tar", rows, props, {}, digests, 95)
    assert base == inputs_stamp("train-000000.tar", [dict(r) for r in rows], props, {}, dict(digests), 95)
    moved = [dict(rows[0], path="elsewhere/a.jpg"), rows[1]]
    resized = [dict(rows[0], width=41), rows[1]]
    other_props = props.set_column(1, "x1", pa.array([0.0, 1.5, 2.0], pa.float64()))
    variants = [
        inputs_stamp("train-000000.tar", moved, props, {}, digests, 95),
        inputs_stamp("train-000000.tar", resized, props, {}, digests, 95),
        inputs_stamp("train-000000.tar", rows, other_props, {}, digests, 95),
        inputs_stamp("train-000000.tar", rows, props, {}, {**digests, "b": "3" * 64}, 95),
        inputs_stamp("train-000000.tar", rows, props, {"b": "truncated"}, {"a": digests["a"]}, 95),
        inputs_stamp("train-000000.tar", rows, props, {}, digests, 90),
        inputs_stamp("train-000000.tar", rows[::-1], props, {}, digests, 95),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_the_shard_set_reads_back_and_its_validator_catches_what_breaks_it(built, tmp_path):
    """`shardset` reads what `pipeline.shards` wrote (index, shards, sidecars, samples) and its
    validator refuses a shard set whose files disagree with index.json."""
    import shutil

    root, index, sources = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    assert shardset.validate(out, checksums=True) == index
    found, total = shardset.shards(out)
    assert found == [str(out / s["name"]) for s in index["shards"] if s["samples"]] and total == 23
    assert shardset.sidecars(out) == [str(out / proposals_name(s["name"])) for s in index["shards"]]
    with open(found[0], "rb") as f:
        first = list(shardset.samples(f))
    assert [sorted(s) for s in first] == [["__key__", "jpg", "json"]] * index["shards"][0]["samples"]
    assert all(set(json.loads(s["json"])) == set(shardset.META_FIELDS) for s in first)

    tar = out / index["shards"][0]["name"]
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF                                  # one byte of an image flipped
    tar.write_bytes(bytes(data))
    with pytest.raises(shardset.ShardDataError, match=rf"{tar} does not match its sha256"):
        shardset.validate(out, checksums=True)
    shutil.copy(root / "out" / tar.name, tar)
    side = out / index["shards"][1]["proposals"]
    other = C.read_table(out / index["shards"][2]["proposals"], C.PROPOSALS)
    C.write_table(pa.concat_tables([C.read_table(side, C.PROPOSALS), other]), side, C.PROPOSALS)
    with pytest.raises(shardset.ShardDataError, match=rf"{side} holds keys not in the shard"):
        shardset.validate(out)


def test_a_rerun_that_rebuilds_shards_hides_the_index_until_the_set_is_whole(tmp_path: Path, monkeypatch):
    """Changed inputs under the same plan: the old index.json goes before the first shard is
    rewritten, so a reader never takes a mix of old and new shards (or a killed rerun's set) for a
    finished set; the rerun that completes writes it again."""
    from pipeline import shard_jobs

    images, props, _ = make_inputs(tmp_path, n=8)
    out, cfg = tmp_path / "out", ShardsConfig(samples_per_shard=4, seed=0)
    first = run(images, props, out, cfg, num_workers=1, progress=False)
    t = C.read_table(props / "part-00000.parquet", C.PROPOSALS).to_pylist()
    t[0]["x2"] += 5.0
    C.write_table(pa.Table.from_pylist(t), props / "part-00000.parquet", C.PROPOSALS)

    def killed(*args, **kwargs):
        assert not (out / "index.json").exists()      # gone before any shard is rewritten
        raise KeyboardInterrupt
    monkeypatch.setattr(shard_jobs, "run_tasks", killed)
    with pytest.raises(KeyboardInterrupt):
        run(images, props, out, cfg, num_workers=1, progress=False)
    assert not (out / "index.json").exists()
    monkeypatch.undo()
    again = run(images, props, out, cfg, num_workers=1, progress=False)
    assert json.loads((out / "index.json").read_text()) == again != first
    assert [s["name"] for s in again["shards"]] == [s["name"] for s in first["shards"]]


# ------------------------------------------------------------------ a worker that dies


def slow_inputs(root: Path, n: int = 6) -> tuple[Path, Path]:
    """n large PNGs (re-encoding each takes a while, so a task is still running when it is killed)."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        path = root / "img" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8)).save(path, compress_level=1)
        rows.append({"key": f"k{i}", "source": "t", "image_id": str(i), "path": str(path), "width": 1200, "height": 900})
    images = C.write_table(pa.Table.from_pylist(rows), root / "images.parquet", C.IMAGES)
    (root / "props").mkdir()
    C.write_table(pa.Table.from_pylist([{"key": f"k{i}", "x1": 0.0, "y1": 0.0, "x2": 9.0, "y2": 9.0, "rank": 0}
                                        for i in range(n)], schema=C.PROPOSALS_SCHEMA),
                  root / "props" / "part-00000.parquet", C.PROPOSALS)
    return images, root / "props"


@pytest.mark.parametrize("victims", ["shard", "shard_and_an_image"])
def test_a_worker_that_dies_lists_the_image_that_killed_it_and_keeps_the_rest(tmp_path, victims):
    """The worker writing the shard is killed (no Ray retries): each image is then checked alone,
    and the shard written again. `shard`: nothing else dies, and the output equals an undisturbed
    run's, byte for byte. `shard_and_an_image`: the worker checking one image dies too: that image
    is listed once as `worker_crashed`, every other one is packed."""
    from tests.pipeline.test_proposals import WorkerKiller
    images, props = slow_inputs(tmp_path)
    cfg = ShardsConfig(samples_per_shard=8, max_retries=0)
    run(images, props, tmp_path / "ref", cfg, num_workers=2, progress=False)
    tasks = (b"ray::_shard_task",) + ((b"ray::_check_task",) if victims == "shard_and_an_image" else ())
    killer = WorkerKiller(tasks)
    killer.start()
    try:
        index = run(images, props, tmp_path / "out", cfg, num_workers=2, progress=False)
    finally:
        killer.stop.set()
        killer.join()
    assert len(killer.victims) == len(tasks), "a worker to kill was not seen: the job ended first"
    if victims == "shard":
        assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "ref")
    else:
        crashed = [f for f in index["failures"] if f["reason"] == "worker_crashed"]
        assert len(crashed) == 1 and index["failure_reasons"] == {"worker_crashed": 1}
        assert index["total_samples"] == 5
        with tarfile.open(tmp_path / "out" / index["shards"][0]["name"]) as tar:
            keys = {Path(m).stem for m in tar.getnames()}
        assert keys == {f"k{i}" for i in range(6)} - {crashed[0]["key"]}
        # a rerun reuses the shard as it is: its stamp covers the crashed image's bytes, and the
        # record of the crash comes back from it (no worker is killed, nothing is rewritten)
        before = folder_bytes(tmp_path / "out")
        assert run(images, props, tmp_path / "out", cfg, num_workers=2, progress=False) == index
        assert folder_bytes(tmp_path / "out") == before


def test_a_shard_whose_worker_dies_after_every_check_is_an_error_naming_it(tmp_path):
    from tests.pipeline.test_proposals import WorkerKiller
    images, props = slow_inputs(tmp_path, n=3)
    killer = WorkerKiller((b"ray::_shard_task",) * 2)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match="the worker writing shard train-000000.tar died again after each"):
            run(images, props, tmp_path / "out", ShardsConfig(samples_per_shard=8, max_retries=0), num_workers=2,
                progress=False)
    finally:
        killer.stop.set()
        killer.join()
