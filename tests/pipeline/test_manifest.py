"""Image-folder manifests: the small files DVC hashes instead of the image folders."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import manifest


def make_roots(root: Path) -> Path:
    """A COCO and an OpenImages root with a few files, and a params.yaml pointing at them."""
    for sub, names in (("coco/train2017", ["b.jpg", "a.jpg"]), ("coco/val2017", ["c.jpg"]),
                       ("openimages/train", ["x/1.jpg", "0.jpg"])):
        for n in names:
            f = root / sub / n
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(n.encode() * 3)
    (root / "coco/train2017/.hidden").write_bytes(b"editor swap file")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {
        "coco_root": str(root / "coco"), "openimages_root": str(root / "openimages"),
        "pretrain_images": "openimage_mini", "manifests": str(root / "manifests"), "generate": []}}))
    return params


def test_content_manifest_lists_relative_sorted_paths_with_digests(tmp_path):
    make_roots(tmp_path)
    n = manifest.write(tmp_path / "openimages/train", tmp_path / "m.tsv", mode="content")
    rows = (tmp_path / "m.tsv").read_text().splitlines()
    assert n == 2
    assert rows[0] == "path\tsize\tsha256"
    assert rows[1:] == [f"0.jpg\t15\t{hashlib.sha256(b'0.jpg' * 3).hexdigest()}",
                        f"x/1.jpg\t21\t{hashlib.sha256(b'x/1.jpg' * 3).hexdigest()}"]


def test_content_manifest_does_not_depend_on_where_the_data_is_mounted(tmp_path):
    make_roots(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")      # new mtimes, same bytes
    a = manifest.render(tmp_path / "one/coco/train2017", "content")
    b = manifest.render(tmp_path / "two/coco/train2017", "content")
    assert a == b and str(tmp_path) not in a and ".hidden" not in a


def test_stat_manifest_changes_when_an_image_is_rewritten_added_or_removed(tmp_path):
    make_roots(tmp_path)
    folder = tmp_path / "coco/train2017"
    before = manifest.render(folder, "stat")
    f = folder / "a.jpg"
    st = f.stat()
    f.write_bytes(b"other bytes, same length?")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert manifest.render(folder, "stat") != before
    (folder / "new.jpg").write_bytes(b"n")
    assert "new.jpg\t1\t" in manifest.render(folder, "stat")
    (folder / "b.jpg").unlink()
    assert "b.jpg" not in manifest.render(folder, "stat")


def test_check_names_each_stale_manifest_and_write_makes_it_clean(tmp_path, caplog):
    params = make_roots(tmp_path)
    assert manifest.main(["--params", str(params), "--check"]) == 1       # none written yet
    assert manifest.main(["--params", str(params)]) == 0
    assert sorted(p.name for p in (tmp_path / "manifests").iterdir()) == [
        "coco_train2017.tsv", "coco_val2017.tsv", "openimages_train.tsv"]
    assert manifest.main(["--params", str(params), "--check"]) == 0
    (tmp_path / "coco/val2017/d.jpg").write_bytes(b"d")
    caplog.clear()
    assert manifest.main(["--params", str(params), "--check"]) == 1
    assert any("coco_val2017.tsv does not match" in r.getMessage() for r in caplog.records)
    assert not any("coco_train2017.tsv does not match" in r.getMessage() for r in caplog.records)


def test_a_rewrite_keeps_each_manifests_mode_unless_told(tmp_path):
    """The README's `python -m pipeline.manifest --params params.yaml` run on a checkout whose
    manifests hash content (the embedded data) must not turn them into modification times: that
    changes every stage's deps and reruns the whole graph."""
    params = make_roots(tmp_path)
    assert manifest.main(["--params", str(params), "--mode", "content"]) == 0
    written = {p.name: p.read_text() for p in (tmp_path / "manifests").iterdir()}
    (tmp_path / "manifests" / "coco_val2017.tsv").unlink()                 # a new one: stat
    assert manifest.main(["--params", str(params)]) == 0
    now = {p.name: p.read_text() for p in (tmp_path / "manifests").iterdir()}
    assert {n: t for n, t in now.items() if n != "coco_val2017.tsv"} == {
        n: t for n, t in written.items() if n != "coco_val2017.tsv"}
    assert manifest.mode_of(tmp_path / "manifests" / "coco_val2017.tsv") == "stat"
    assert manifest.main(["--params", str(params), "--mode", "stat"]) == 0
    assert {manifest.mode_of(p) for p in (tmp_path / "manifests").iterdir()} == {"stat"}


def test_a_missing_folder_or_a_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such image folder"):
        manifest.render(tmp_path / "nope")
    bad = tmp_path / "bad.tsv"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="bad.tsv: line 1 is not a manifest header"):
        manifest.mode_of(bad)


def test_the_embedded_manifests_match_the_embedded_folders():
    """What `dvc repro` left in data/synth/manifests describes data/synth (content mode), so the
    stages that depend on a manifest see every change of the embedded images."""
    repo = Path(__file__).resolve().parents[2]
    cfg = manifest.DataConfig(**{k: v for k, v in yaml.safe_load((repo / "params.yaml").read_text())["data"].items()
                                 if k != "generate"})
    cfg = manifest.DataConfig(**{**cfg.__dict__, **{k: str(repo / getattr(cfg, k))
                                                    for k in ("coco_root", "openimages_root", "manifests")}})
    if not Path(cfg.manifests).is_dir():
        pytest.fail(f"{cfg.manifests} missing: run `dvc repro` first (the README's first command does)")
    assert manifest.stale(cfg) == []
