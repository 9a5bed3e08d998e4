"""Object storage for real: a local S3 server (moto, on loopback) holds the images; the proposals
and shards stages read them from the bucket and write into it; the training stream reads one
epoch back from it. Every byte is compared with a run on local files."""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch

from pipeline import contracts as C
from pipeline import proposals, proposalset, raycluster, readers, shards, shardset, storage
from tests.pipeline.test_shards import make_inputs

BUCKET = "d3ssl-test"
CFG = proposals.ProposalsConfig(images_per_part=4, images_per_task=2, max_side=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_s3_clients() -> None:
    """fsspec keeps one S3FileSystem per settings; a test that changes credentials needs a new one."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """A moto S3 server on a free loopback port, the AWS environment pointing at it, one bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)     # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _fresh_s3_clients()
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        _fresh_s3_clients()
        server.stop()


def _upload_inputs(root: Path) -> tuple[Path, str]:
    """Local inputs (JPEGs, a PNG with alpha, a missing file) and the same in the bucket: the
    images under s3://BUCKET/img/, an images table whose paths are those URLs (`readers rebase`)."""
    images, _, _ = make_inputs(root, n=7)
    for p in (root / "img").iterdir():
        storage.write_bytes(f"s3://{BUCKET}/img/{p.name}", p.read_bytes())
    # the README's way to point a table at the bucket's copy of its images
    assert readers.main(["rebase", "--images", str(images), "--prefix", str(root / "img"), "--to",
                         f"s3://{BUCKET}/img", "--out", f"s3://{BUCKET}/images.parquet"]) == 0
    return images, f"s3://{BUCKET}/images.parquet"


def _epoch(folder: str) -> list[dict]:
    from train.stream import LoaderConfig, make_stream
    from train.views import ViewConfig

    found, total = shardset.shards(folder)
    cfg = LoaderConfig(batch_size=2, workers=0, shuffle_buffer=4, resampled=False,
                       views=ViewConfig(size=64, small_size=32))
    return list(make_stream(found, cfg, seed=0))


def _local_paths_as_urls(value, root: Path):
    """index.json of the local run with its image paths written as the bucket's URLs."""
    text = json.dumps(value).replace(str(root / "img") + "/", f"s3://{BUCKET}/img/")
    return json.loads(text.replace(str(root / "images.parquet"), f"s3://{BUCKET}/images.parquet"))


def test_stages_and_stream_on_s3_match_a_local_run(s3, tmp_path, caplog):
    images, remote_images = _upload_inputs(tmp_path)
    local_props, local_shards = tmp_path / "local_props", tmp_path / "local_shards"
    remote_props, remote_shards = f"s3://{BUCKET}/run/props", f"s3://{BUCKET}/run/shards"
    raycluster.start(None, 2)      # one local Ray for the four runs; its workers see the AWS settings
    try:
        proposals.run(images, local_props, CFG, progress=False)
        proposals.run(remote_images, remote_props, CFG, progress=False)
        local = shards.run(images, local_props, local_shards, shards.ShardsConfig(samples_per_shard=3), progress=False)
        caplog.set_level(logging.INFO)
        assert shards.main(["--images", remote_images, "--proposals", remote_props, "--out", remote_shards,
                            "--samples-per-shard", "3"]) == 0
    finally:
        raycluster.stop()
    assert any(f"to {remote_shards}" in r.getMessage() for r in caplog.records)

    parts = storage.glob(storage.join(remote_props, "part-*.parquet"))
    assert [storage.name(p) for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for p in parts:
        assert storage.read_bytes(p) == (local_props / storage.name(p)).read_bytes()
    assert proposalset.read_failures(remote_props) == proposalset.read_failures(local_props) != {}

    index = shardset.validate(remote_shards, checksums=True)
    assert index == _local_paths_as_urls(local, tmp_path)
    for entry in local["shards"]:
        for name in (entry["name"], entry["proposals"]):
            assert storage.read_bytes(storage.join(remote_shards, name)) == (local_shards / name).read_bytes(), name
    leftovers = [k for k in storage.glob(f"s3://{BUCKET}/run/*/.*") if ".tmp-" in k]
    assert leftovers == []                    # temporary keys were moved into place

    got, want = _epoch(remote_shards), _epoch(str(local_shards))
    assert [b["key"] for b in got] == [b["key"] for b in want] and sum(len(b["key"]) for b in got) == 8
    for a, b in zip(got, want):
        for k in ("x1", "x2", "x2s", "boxes1", "boxes2", "valid"):
            assert torch.equal(a[k], b[k]), k

    # Pre-training streams the bucket's shards as it streams the local ones: the same weights.
    from tests.train.test_pretrain import final_model, write_params
    from tests.train.test_pretrain import run as pretrain

    params = write_params(tmp_path / "params.yaml", loader={"batch_size": 4, "workers": 1, "epoch_samples": 8},
                          epochs=1, checkpoint_every=1)
    for shard_set, out in ((remote_shards, tmp_path / "run_s3"), (str(local_shards), tmp_path / "run_local")):
        pretrain(["--shards", shard_set, "--out", str(out), "--method", "d3ssl", "--params", str(params)],
                 env={k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    remote_model, local_model = final_model(tmp_path / "run_s3"), final_model(tmp_path / "run_local")
    assert remote_model.keys() == local_model.keys()
    assert all(torch.equal(remote_model[k], local_model[k]) for k in local_model)


def test_bad_url_and_missing_credentials_are_one_line_errors_naming_the_url(s3, tmp_path, monkeypatch, caplog):
    images, remote_images = _upload_inputs(tmp_path)
    listing_urls = storage.write_table(storage.read_table(remote_images, C.IMAGES), tmp_path / "urls.parquet", C.IMAGES)
    caplog.set_level(logging.ERROR)

    def error_of(argv: list[str], stage=shards) -> str:
        caplog.clear()
        assert stage.main(argv) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0] and not any(r.exc_info for r in caplog.records)
        return errors[0]

    base = ["--proposals", f"s3://{BUCKET}/props", "--out", f"s3://{BUCKET}/shards"]
    no_bucket = "s3://no-such-bucket/images.parquet"
    assert no_bucket in error_of(["--images", no_bucket, *base])
    no_out_bucket = "s3://no-such-bucket/props"          # a missing bucket to write into, named too
    assert no_out_bucket in error_of(["--images", remote_images, "--out", no_out_bucket, "--num-workers", "1"], proposals)
    bad_scheme = "nosuchfs://bucket/images.parquet"
    message = error_of(["--images", bad_scheme, *base])
    assert bad_scheme in message and "nosuchfs://" in message
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _fresh_s3_clients()
    message = error_of(["--images", remote_images, *base])
    assert remote_images in message and "credentials" in message.lower()
    # A local images table listing URLs: the Ray task that reads the first image fails, and the
    # stage still ends with one line naming it.
    message = error_of(["--images", listing_urls, "--out", str(tmp_path / "no_props"), "--num-workers", "1"], proposals)
    assert f"s3://{BUCKET}/img/" in message and "credentials" in message.lower()
    with pytest.raises(storage.StorageError, match=f"s3://{BUCKET}/x.bin.*credentials"):
        storage.write_bytes(f"s3://{BUCKET}/x.bin", b"x")


def test_storage_joins_globs_and_writes_atomically_on_both(s3, tmp_path):
    for base in (str(tmp_path / "d"), f"s3://{BUCKET}/d"):
        storage.makedirs(base)
        storage.write_bytes(storage.join(base, "b.bin"), b"2")
        storage.write_text(storage.join(base, "a.txt"), "1")
        assert [storage.name(p) for p in storage.glob(storage.join(base, "*"))] == ["a.txt", "b.bin"]
        assert storage.read_text(storage.join(base, "a.txt")) == "1" and storage.isfile(storage.join(base, "b.bin"))
        with pytest.raises(RuntimeError), storage.atomic_write(storage.join(base, "c.bin")) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
        assert not storage.exists(storage.join(base, "c.bin"))        # a failed write leaves nothing
        assert storage.stale_temporaries(base) == []
        with pytest.raises(FileNotFoundError, match="c.bin"):
            storage.read_bytes(storage.join(base, "c.bin"))
    assert storage.join("s3://b/p/", "x") == "s3://b/p/x" and storage.join("rel", "x") == str(Path("rel/x"))
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x") and not storage.is_url("file:///tmp/x")
