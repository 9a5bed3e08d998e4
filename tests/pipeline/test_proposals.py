"""Selective-search proposals: SoCo's filters and fallbacks, bad images, and the Ray job (a killed
worker, a killed driver, reruns)."""
from __future__ import annotations

import ctypes
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest
import ray
import yaml
from PIL import Image

from pipeline import contracts as C
from pipeline.params import ParamsError, load_section
from pipeline.proposals import (
    FAILED, PATHS, ProposalsConfig, nms, propose, propose_file, rule_mask, search_size,
    select_boxes, selective_search,
)
from pipeline.readers import image_size

REPO = Path(__file__).resolve().parents[2]
CFG = ProposalsConfig()


def scene(seed: int, width: int = 128, height: int = 96) -> np.ndarray:
    """An HxWx3 uint8 RGB picture: a noisy gradient with a few flat-coloured objects."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 200 / width, yy * 200 / height, np.full_like(xx, 90)], axis=2).astype(np.float32)
    for _ in range(rng.integers(2, 5)):
        w, h = rng.integers(width // 4, width // 2), rng.integers(height // 4, height // 2)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        img[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def assert_obeys_every_rule(boxes: np.ndarray, width: int, height: int, cfg: ProposalsConfig) -> None:
    assert len(boxes) >= 1
    x1, y1, x2, y2 = boxes.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all()
    w, h = x2 - x1, y2 - y1
    assert (w >= cfg.min_side).all() and (h >= cfg.min_side).all()
    assert (w / h >= 1 / cfg.max_aspect - 1e-6).all() and (w / h <= cfg.max_aspect + 1e-6).all()
    scale = np.sqrt(w * h / (width * height))
    assert (scale >= cfg.scale_range[0] - 1e-6).all() and (scale <= cfg.scale_range[1] + 1e-6).all()
    iou = iou_matrix(boxes, boxes)
    np.fill_diagonal(iou, 0)
    assert iou.max(initial=0) <= cfg.nms_iou + 1e-6
    if cfg.max_boxes:
        assert len(boxes) <= cfg.max_boxes


def raw_boxes(rgb: np.ndarray, cfg: ProposalsConfig) -> np.ndarray:
    """Selective search's own boxes, in original pixels and its order (no filtering)."""
    h, w = rgb.shape[:2]
    sw, sh = search_size(w, h, cfg.max_side)
    bgr = cv2.resize(np.ascontiguousarray(rgb[:, :, ::-1]), (sw, sh), interpolation=cv2.INTER_AREA)
    r = selective_search(bgr, cfg).astype(np.float64)
    return np.stack([r[:, 0] * w / sw, r[:, 1] * h / sh, (r[:, 0] + r[:, 2]) * w / sw,
                     (r[:, 1] + r[:, 3]) * h / sh], axis=1)


# ----------------------------------------------------------------------------- rules, pure compute


@pytest.mark.parametrize("source", ["scene", "astronaut", "chelsea"])
def test_boxes_lie_in_the_image_obey_every_rule_and_keep_the_search_order(source):
    import skimage.data

    rgb = scene(3, 160, 120) if source == "scene" else getattr(skimage.data, source)()
    cfg = dataclasses.replace(CFG, max_side=160)            # real photos are shrunk for the search
    boxes, path, resized = propose(rgb, cfg)
    h, w = rgb.shape[:2]
    assert path == "all_rules" and resized == (max(w, h) > 160)
    assert boxes.dtype == np.float32
    assert_obeys_every_rule(boxes, w, h, cfg)
    # The kept boxes are a subsequence of selective search's output, mapped to original pixels.
    raw = raw_boxes(rgb, cfg)
    pos = [int(np.flatnonzero(np.all(np.isclose(raw, b, atol=1e-3), axis=1))[0]) for b in boxes]
    assert pos == sorted(pos)
    if resized:   # mapped back: boxes reach past the search size, up to the original edges
        assert boxes[:, 2].max() > 160 * w / max(w, h) and boxes[:, 2].max() <= w
    capped, _, _ = propose(rgb, dataclasses.replace(cfg, max_boxes=3))
    np.testing.assert_array_equal(capped, boxes[:3])


def test_each_rule_on_its_own_with_soco_boundaries():
    """One rule broken at a time; SoCo's bounds are inclusive."""
    W = H = 200        # scale = sqrt(w * h / 40000): a square of side 60 is 0.3, of side 160 is 0.8
    cases = [
        ((0, 0, 80, 80), True),          # scale 0.4, aspect 1
        ((0, 0, 150, 50), True),         # aspect exactly 3 (scale 0.43)
        ((0, 0, 152, 50), False),        # aspect 3.04
        ((0, 0, 50, 152), False),        # aspect 1/3.04
        ((0, 0, 58, 58), False),         # scale 0.29
        ((0, 0, 60, 60), True),          # scale exactly 0.3
        ((0, 0, 160, 160), True),        # scale exactly 0.8
        ((0, 0, 162, 162), False),       # scale 0.81
    ]
    boxes = np.array([b for b, _ in cases], dtype=np.float64)
    assert rule_mask(boxes, W, H, CFG).tolist() == [ok for _, ok in cases]
    # The side rule, in a 100x100 image (scales 0.50 and 0.51, aspects 0.39 and 0.4: fine).
    assert rule_mask(np.array([[0, 0, 31, 80], [0, 0, 32, 80.0]]), 100, 100, CFG).tolist() == [False, True]
    # Each switch of rule_mask drops exactly its rule; each setting moves its bound.
    thin, small = np.array([[0, 0, 50, 160.0]]), np.array([[0, 0, 40, 40.0]])
    assert not rule_mask(thin, W, H, CFG)[0] and rule_mask(thin, W, H, CFG, aspect_rule=False)[0]
    assert not rule_mask(small, W, H, CFG)[0] and rule_mask(small, W, H, CFG, scale_rule=False)[0]
    assert rule_mask(thin, W, H, dataclasses.replace(CFG, max_aspect=3.5))[0]
    assert rule_mask(small, W, H, dataclasses.replace(CFG, scale_range=(0.15, 0.8)))[0]
    assert not rule_mask(boxes[:1], W, H, dataclasses.replace(CFG, min_side=81))[0]


def test_fallbacks_loosen_soco_rules_in_order_then_take_the_whole_image():
    W, H = 200, 100
    ok = [20, 10, 100, 90]          # 80x80: every rule
    huge = [0, 0, 190, 95]          # scale 0.95: only without the scale rule
    thin = [0, 0, 190, 40]          # aspect 4.75 and scale 0.62: only the min-side rule
    small = [0, 0, 20, 20]          # under 32 px: nothing
    for boxes, path, expect in (
        ([small, thin, huge, ok], "all_rules", [ok]),
        ([small, thin, huge], "without_scale_rule", [huge]),
        ([thin, small], "min_side_rule_only", [thin]),
        ([small], "whole_image", [[0, 0, W, H]]),
        (np.zeros((0, 4)), "whole_image", [[0, 0, W, H]]),
    ):
        kept, taken = select_boxes(np.array(boxes, dtype=np.float64).reshape(-1, 4), W, H, CFG)
        assert taken == path
        np.testing.assert_array_equal(kept, np.array(expect, dtype=np.float64))
    assert PATHS == ("all_rules", "without_scale_rule", "min_side_rule_only", "whole_image")


def test_near_duplicates_go_in_rank_order_and_the_cap_keeps_the_best_ranked():
    boxes = np.array([[0, 0, 100, 100], [1, 1, 100, 100], [50, 50, 150, 150], [0, 0, 99, 101],
                      [52, 50, 150, 150]], dtype=np.float64)
    assert nms(boxes, 0.9).tolist() == [0, 2]              # 1, 3 ~ 0; 4 ~ 2
    assert nms(boxes, 1.0).tolist() == [0, 1, 2, 3, 4]     # off
    assert nms(boxes[::-1], 0.9).tolist() == [0, 1]        # the better-ranked of a pair stays
    kept, _ = select_boxes(boxes, 200, 200, dataclasses.replace(CFG, max_boxes=1))
    np.testing.assert_array_equal(kept, boxes[:1])


@pytest.mark.parametrize("size,path", [((100, 80), "without_scale_rule"), ((200, 40), "min_side_rule_only"),
                                       ((20, 24), "whole_image")])
def test_a_flat_image_gets_the_whole_image_box(size, path):
    w, h = size
    boxes, taken, _ = propose(np.full((h, w, 3), 127, np.uint8), CFG)
    np.testing.assert_array_equal(boxes, np.array([[0, 0, w, h]], np.float32))
    assert taken == path


def test_the_rank_order_depends_on_the_image_and_the_seed_only():
    """OpenCV orders by C rand(), a state Ray's threads share; our order ignores that state."""
    libc = ctypes.CDLL(None)
    bgr = np.ascontiguousarray(scene(1)[:, :, ::-1])

    def opencv_order(rand_seed):
        libc.srand(rand_seed)
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(bgr)
        ss.switchToSelectiveSearchFast()
        return ss.process()

    a, b = opencv_order(1), opencv_order(2)
    assert not np.array_equal(a, b) and sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))
    libc.srand(1)
    first = selective_search(bgr, CFG)
    libc.srand(2)
    np.testing.assert_array_equal(selective_search(bgr, CFG), first)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, a.tolist()))
    assert not np.array_equal(selective_search(bgr, dataclasses.replace(CFG, seed=5)), first)


def test_settings_load_from_params_and_reject_mistakes(tmp_path: Path):
    p = tmp_path / "params.yaml"
    p.write_text("proposals:\n  mode: quality\n  max_boxes: 50\n  scale_range: [0.2, 0.9]\n")
    cfg = load_section(ProposalsConfig, "proposals", p)
    assert (cfg.mode, cfg.max_boxes, cfg.scale_range, cfg.min_side) == ("quality", 50, (0.2, 0.9), 32.0)
    p.write_text("proposals:\n  nms_iuo: 0.5\n")
    with pytest.raises(ParamsError, match="nms_iuo"):
        load_section(ProposalsConfig, "proposals", p)
    p.write_text("proposals:\n  mode: slow\n")
    with pytest.raises(ParamsError, match="slow"):
        load_section(ProposalsConfig, "proposals", p)
    with pytest.raises(ValueError, match="scale_range"):
        ProposalsConfig(scale_range=(0.8, 0.3))


# -------------------------------------------------------------------------------------- bad images


def write_cases(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Every bad-image case as a file: name -> (file, table width, table height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = scene(7, 120, 80)
    jpg = jpeg_bytes(rgb)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    png = png.getvalue()
    files = {
        "good": ("good.jpg", jpg),
        "truncated": ("truncated.jpg", jpg[: len(jpg) // 2]),
        "corrupt": ("corrupt.png", png[:200] + bytes(b ^ 0xFF for b in png[200:400]) + png[400:]),
        "text": ("text.jpg", b"this is not an image\n"),
        "empty": ("empty.jpg", b""),
    }
    for name, (f, data) in files.items():
        (folder / f).write_bytes(data)
    Image.fromarray(rgb).convert("L").save(folder / "gray.jpg", quality=95)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    rgba = np.dstack([rgb, np.where(np.arange(120)[None, :] < 60, 0, 255).repeat(80, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray((rgb[:, :, 1].astype(np.uint16) * 257)).save(folder / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6      # "rotate 90 CW to display": stored 120x80, shown 80x120
    (folder / "exif_rotated.jpg").write_bytes(jpeg_bytes(rgb, exif=exif.tobytes()))
    (folder / "plain_twin.jpg").write_bytes(jpeg_bytes(rgb))
    return {
        **{n: (str(folder / f), 120, 80) for n, (f, _) in files.items()},
        "missing": (str(folder / "missing.jpg"), 120, 80),
        "size_mismatch": (str(folder / "good.jpg"), 80, 120),
        **{n: (str(folder / f"{n}.{'png' if n in ('alpha', 'gray16') else 'jpg'}"), 120, 80)
           for n in ("gray", "cmyk", "alpha", "gray16", "exif_rotated", "plain_twin")},
    }


def test_each_bad_image_is_handled_or_failed_with_its_reason(tmp_path: Path):
    cases = write_cases(tmp_path)
    res = {n: propose_file(n, p, w, h, CFG) for n, (p, w, h) in cases.items()}
    failed = {n: r.reason for n, r in res.items() if r.path == FAILED}
    assert failed == {"truncated": "truncated", "corrupt": "corrupt", "text": "not_an_image",
                      "empty": "not_an_image", "missing": "missing_file", "size_mismatch": "size_mismatch"}
    assert all(len(r.boxes) == 0 and r.detail for n, r in res.items() if n in failed)

    def boxes_of(path):   # what the stage must give: the pixels a later `.convert("RGB")` sees
        with Image.open(path) as im:
            return propose(np.asarray(im.convert("RGB")), CFG)[0]

    for n in ("good", "gray", "cmyk", "alpha"):
        assert res[n].path in PATHS and len(res[n].boxes) >= 1, n
        np.testing.assert_array_equal(res[n].boxes, boxes_of(cases[n][0]))
    assert (res["gray"].notes["mode"], res["cmyk"].notes["mode"], res["alpha"].notes["mode"]) == ("L", "CMYK", "RGBA")
    # 16-bit grayscale is scaled to 8 bits, not clipped at 255 (which would make it flat).
    gray8 = np.repeat(scene(7, 120, 80)[:, :, 1:2], 3, axis=2)
    np.testing.assert_array_equal(res["gray16"].boxes, propose(gray8, CFG)[0])
    assert res["gray16"].path == "all_rules"
    # EXIF rotation: boxes stay in the stored frame that the images table describes.
    assert image_size(Path(cases["exif_rotated"][0])) == (120, 80)
    assert res["exif_rotated"].notes["exif_orientation"] == 6
    np.testing.assert_array_equal(res["exif_rotated"].boxes, res["plain_twin"].boxes)
    assert res["exif_rotated"].boxes[:, 2].max() <= 120 and res["exif_rotated"].boxes[:, 3].max() <= 80


# ---------------------------------------------------------------------------------- the Ray stage


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray runtime (2 CPUs) for the module: a start costs seconds."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    """An images table of 16 scenes (160x120 JPEGs) and the bad-image cases."""
    root = tmp_path_factory.mktemp("proposals_data")
    cases = write_cases(root / "cases")
    rows = []
    for i in range(16):
        p = root / f"scene{i:02d}.jpg"
        p.write_bytes(jpeg_bytes(scene(100 + i, 160, 120)))
        rows.append((f"scene_{i:02d}", str(p), 160, 120))
    rows[5:5] = [(f"case_{n}", p, w, h) for n, (p, w, h) in cases.items()]
    images = pa.table({"key": [r[0] for r in rows], "source": ["test"] * len(rows),
                       "image_id": [r[0] for r in rows], "path": [r[1] for r in rows],
                       "width": pa.array([r[2] for r in rows], pa.int32()),
                       "height": pa.array([r[3] for r in rows], pa.int32())})
    path = root / "images.parquet"
    C.write_table(images, path, C.IMAGES)
    return path, {r[0]: r for r in rows}


STAGE_CFG = dataclasses.replace(CFG, images_per_part=6, images_per_task=2)


def read_parts(out: Path) -> pa.Table:
    return C.read_tables(sorted(out.glob("part-*.parquet")), C.PROPOSALS)


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, dataset, tmp_path_factory) -> tuple[Path, dict]:
    images, _ = dataset
    out = tmp_path_factory.mktemp("undisturbed")
    return out, run_stage(images, out, STAGE_CFG)


def run_stage(images: Path, out: Path, cfg: ProposalsConfig, **kw) -> dict:
    from pipeline.proposals import run

    return run(images, out, cfg, num_workers=2, progress=False, **kw)


def test_stage_writes_the_contract_in_parts_with_summary_and_failures(dataset, undisturbed):
    images_path, rows = dataset
    out, summary = undisturbed
    n = len(rows)
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-{i:05d}.parquet" for i in range(-(-n // 6))]
    props = read_parts(out)
    images = C.read_table(images_path, C.IMAGES)
    C.check_boxes_in_images(props, images, where="proposals")
    # Every handled image is exactly what the pure function gives; failed ones have no rows.
    for key, (_, path, w, h) in rows.items():
        mine = props.filter(pc.equal(props.column("key"), key))
        ref = propose_file(key, path, w, h, STAGE_CFG)
        got = np.stack([mine.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
        np.testing.assert_array_equal(got, ref.boxes.reshape(-1, 4), err_msg=key)
        assert mine.column("rank").to_pylist() == list(range(len(ref.boxes)))
    expected_failures = {"missing_file": 1, "not_an_image": 2, "truncated": 1, "corrupt": 1, "size_mismatch": 1}
    assert summary["failures"] == expected_failures
    assert summary["paths"]["failed"] == 6 and sum(summary["paths"].values()) == summary["images"] == n
    assert summary["images_with_boxes"] == n - 6
    assert summary["boxes"] == props.num_rows
    assert summary["boxes_per_image"]["min"] >= 1 and summary["boxes_per_image"]["max"] <= 500
    assert sum(summary["boxes_per_image"]["histogram"].values()) == n - 6
    assert summary["decoded_from_mode"] == {"CMYK": 1, "I;16": 1, "L": 1, "RGBA": 1}
    assert summary["exif_orientation_ignored"] == 1
    assert summary["parts"] == -(-n // 6)
    assert summary["run"]["parts_written"] == -(-n // 6) and summary["run"]["parts_skipped"] == 0
    assert json.loads((out / "summary.json").read_text()) == {k: v for k, v in summary.items() if k != "run"}
    fails = pacsv.read_csv(out / "failures.csv")
    assert fails.column_names == ["key", "path", "reason", "detail"]
    assert dict(zip(fails.column("key").to_pylist(), fails.column("reason").to_pylist())) == {
        "case_truncated": "truncated", "case_corrupt": "corrupt", "case_text": "not_an_image",
        "case_empty": "not_an_image", "case_missing": "missing_file", "case_size_mismatch": "size_mismatch"}
    assert fails.column("path").to_pylist()[0] == rows[fails.column("key").to_pylist()[0]][1]


def _our_task_workers(task: bytes = b"ray::_propose_task") -> list[int]:
    """PIDs of Ray workers of this test process's cluster that are running `task` (a proposals task)."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(task):
                continue
            p = int(pid)
            while p > 1:       # one of ours: a descendant of this process (worker < raylet < us)
                p = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if p == me:
                    found.append(int(pid))
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) the first worker it sees running each task of `tasks` in turn (default: one
    proposals task worker, once)."""

    def __init__(self, tasks: tuple[bytes, ...] = (b"ray::_propose_task",)):
        super().__init__(daemon=True)
        self.tasks, self.victims = list(tasks), []
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set() and self.tasks:
            for pid in _our_task_workers(self.tasks[0]):
                os.kill(pid, signal.SIGKILL)
                self.killed = pid
                self.victims.append(pid)
                self.tasks.pop(0)
                break
            time.sleep(0.005)


@pytest.mark.parametrize("max_retries,per_task", [(3, 3), (0, 3), (0, 1)])
def test_a_killed_worker_changes_nothing(dataset, undisturbed, tmp_path, max_retries, per_task):
    """(3, 3): Ray retries the task. (0, 3): the stage retries the chunk's images one by one.
    (0, 1): the image whose worker died on every try is listed as `worker_crashed`, nothing else."""
    images, _ = dataset
    ref_out, ref = undisturbed
    cfg = dataclasses.replace(STAGE_CFG, max_retries=max_retries, images_per_task=per_task)
    killer = WorkerKiller()
    killer.start()
    try:
        summary = run_stage(images, tmp_path, cfg)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no worker was killed: the job ended first"
    got, want = read_parts(tmp_path), read_parts(ref_out)
    if per_task > 1:
        assert got.equals(want)
        assert summary["failures"] == ref["failures"] and summary["paths"] == ref["paths"]
    else:
        rows = [r for r in pacsv.read_csv(tmp_path / "failures.csv").to_pylist() if r["reason"] == "worker_crashed"]
        crashed = [r["key"] for r in rows]
        assert len(crashed) == 1 and summary["failures"]["worker_crashed"] == 1
        # a fixed one-line reason, the same as the shards stage's, not Ray's pages of process details
        # (no count of tries in it: max_retries is a speed setting, and the output must not depend on it)
        assert rows[0]["detail"] == "its worker died on every try (WorkerCrashedError: a crash in a decoder, or " \
                                    "memory exhausted)"
        keep = pc.invert(pc.equal(want.column("key"), crashed[0]))
        assert got.equals(want.filter(keep))


def test_a_killed_run_leaves_only_finished_parts_and_a_rerun_writes_the_rest(dataset, undisturbed, tmp_path,
                                                                              ray_cluster):
    """The command, joined to a running cluster through RAY_ADDRESS, killed mid-job (SIGKILL)."""
    images, rows = dataset
    ref_out, _ = undisturbed
    params = tmp_path / "params.yaml"
    cfg = dataclasses.replace(STAGE_CFG, images_per_part=2, images_per_task=1)
    params.write_text(yaml.safe_dump({"proposals": {"images_per_part": 2, "images_per_task": 1}}))
    out = tmp_path / "out"
    n_parts = -(-len(rows) // 2)
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.proposals", "--images", str(images), "--out", str(out),
                             "--num-workers", "1", "--params", str(params)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    finished = {p.name: p.stat() for p in out.glob("part-*.parquet")}
    assert 3 <= len(finished) < n_parts, "the run ended before it was killed"
    for name in finished:    # nothing that looks finished is half-written
        C.read_table(out / name, C.PROPOSALS)
        assert (out / name).with_suffix(".json").is_file()
    (out / ".part-00009.parquet.tmp-0123abcd").write_bytes(b"half a part")   # as a kill leaves them

    summary = run_stage(images, out, cfg)
    assert summary["parts"] == n_parts
    assert (summary["run"]["parts_written"], summary["run"]["parts_skipped"]) == (n_parts - len(finished), len(finished))
    for name, st in finished.items():    # finished parts were not rewritten
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    assert not list(out.glob(".*tmp-*"))
    assert read_parts(out).equals(read_parts(ref_out))
    again = run_stage(images, out, cfg)       # all finished: nothing is written, same summary
    assert again["run"]["parts_written"] == 0 and again["paths"] == summary["paths"]
    run_stage(images, tmp_path / "fresh", cfg)              # a resumed run writes what an undisturbed one does
    assert folder_bytes(out) == folder_bytes(tmp_path / "fresh")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_inputs_same_bytes_in_another_folder(ray_cluster, tmp_path):
    """Two runs of the same images (the same table, copied to another folder with relative paths,
    run from there, on other task sizes and worker counts) write byte-identical outputs: no
    timing, worker count or absolute path in what DVC hashes. Failed images included."""
    rows = []
    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "img").mkdir(parents=True)
        for i in range(3):
            (root / "img" / f"s{i}.jpg").write_bytes(jpeg_bytes(scene(200 + i, 96, 72)))
        (root / "img" / "text.jpg").write_bytes(b"not an image")
    names = [("s0", 96, 72), ("s1", 96, 72), ("missing", 96, 72), ("s2", 96, 72), ("text", 96, 72)]
    images = pa.table({"key": [n for n, _, _ in names], "source": ["test"] * 5, "image_id": [n for n, _, _ in names],
                       "path": [f"img/{n}.jpg" for n, _, _ in names],
                       "width": pa.array([w for _, w, _ in names], pa.int32()),
                       "height": pa.array([h for _, _, h in names], pa.int32())})
    outs = []
    for root, per_task, workers in ((tmp_path / "a", 1, 2), (tmp_path / "b", 3, 1)):
        C.write_table(images, root / "images.parquet", C.IMAGES)
        cwd = os.getcwd()
        os.chdir(root)
        try:
            from pipeline.proposals import run
            run(Path("images.parquet"), Path("out"), dataclasses.replace(STAGE_CFG, images_per_part=2,
                images_per_task=per_task), num_workers=workers, progress=False)
        finally:
            os.chdir(cwd)
        outs.append(folder_bytes(root / "out"))
    assert sorted(outs[0]) == ["failures.csv", "part-00000.json", "part-00000.parquet", "part-00001.json",
                               "part-00001.parquet", "part-00002.json", "part-00002.parquet", "summary.json"]
    assert outs[0] == outs[1]
    summary = json.loads(outs[0]["summary.json"])
    assert summary["failures"] == {"missing_file": 1, "not_an_image": 1}
    assert not {"seconds", "workers", "ray_address", "run"} & set(summary)
    assert str(tmp_path) not in outs[0]["failures.csv"].decode() + outs[0]["part-00001.json"].decode()


def test_parts_of_another_run_are_replaced_never_mixed_in(dataset, undisturbed, tmp_path, caplog):
    """DVC keeps the folder (persist): a rerun with other settings starts clean, logs it, removes
    only the stage's own files, and ends byte-identical to a fresh run of those settings."""
    images, _ = dataset
    src, _ = undisturbed
    other = dataclasses.replace(STAGE_CFG, nms_iou=0.5, images_per_part=8)   # 2 parts, not 3: part 2 must go
    fresh = tmp_path / "fresh"
    run_stage(images, fresh, other)
    out = tmp_path / "reused"
    shutil.copytree(src, out)
    (out / "notes.txt").write_text("not the stage's")
    shutil.copy(out / "part-00000.parquet", out / "part-old.parquet")     # a table read_parts would read
    with caplog.at_level(logging.WARNING, logger="pipeline.proposalset"):
        run_stage(images, out, other)
    assert "of a different run" in caplog.text and "starting clean" in caplog.text
    assert (out / "notes.txt").read_text() == "not the stage's"
    (out / "notes.txt").unlink()
    assert folder_bytes(out) == folder_bytes(fresh)
    assert folder_bytes(out) != folder_bytes(src)


def test_a_new_code_version_starts_clean(dataset, undisturbed, tmp_path, caplog, monkeypatch):
    """DVC reruns the stage when its code changes, and keeps the folder (persist): parts of the old
    code must not be reused, even with the same settings and images."""
    from pipeline import proposals

    images, _ = dataset
    src, _ = undisturbed
    out = tmp_path / "reused"
    shutil.copytree(src, out)
    monkeypatch.setattr(proposals, "code_version", lambda module: "another version")
    with caplog.at_level(logging.WARNING, logger="pipeline.proposalset"):
        run_stage(images, out, STAGE_CFG)
    assert "of a different run" in caplog.text and "starting clean" in caplog.text
    parts = sorted(out.glob("part-*.json"))
    assert parts and all(json.loads(p.read_text())["fingerprint"] != json.loads((src / p.name).read_text())["fingerprint"]
                         for p in parts)



def test_a_part_whose_image_bytes_changed_is_proposed_again(ray_cluster, tmp_path, caplog):
    """The fingerprint covers keys, paths and sizes; an image fixed or replaced in place (same key,
    path and size: DVC reruns the stage through the manifest) must not keep the proposals of its
    old bytes or its old failure. Only its part is redone, and the output equals a fresh run."""
    paths = [tmp_path / f"s{i}.jpg" for i in range(8)]
    for i, p in enumerate(paths):
        p.write_bytes(jpeg_bytes(scene(300 + i, 160, 120)))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpeg_bytes(scene(399, 160, 120))[:200])          # truncated: a failure
    keys = [f"k{i}" for i in range(8)] + ["kb"]
    locs = [str(p) for p in paths] + [str(broken)]
    table = pa.table({"key": keys, "source": ["test"] * 9, "image_id": keys, "path": locs,
                      "width": pa.array([160] * 9, pa.int32()), "height": pa.array([120] * 9, pa.int32())})
    images = tmp_path / "images.parquet"
    C.write_table(table, images, C.IMAGES)
    cfg = dataclasses.replace(STAGE_CFG, images_per_part=3)         # parts: k0-k2, k3-k5, k6-k8
    out = tmp_path / "out"
    first = run_stage(images, out, cfg)
    assert first["failures"] == {"truncated": 1}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}

    paths[4].write_bytes(jpeg_bytes(scene(500, 160, 120)))             # replaced in place, same size
    broken.write_bytes(jpeg_bytes(scene(399, 160, 120)))               # fixed in place
    with caplog.at_level(logging.INFO, logger="pipeline.proposalset"):
        second = run_stage(images, out, cfg)
    assert "2 finished part(s) hold images whose bytes changed" in caplog.text
    assert second["failures"] == {} and second["images_with_boxes"] == 9
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert [n for n in sorted(now) if now[n] != mtimes[n]] == [
        "part-00001.json", "part-00001.parquet", "part-00002.json", "part-00002.parquet"]
    fresh = tmp_path / "fresh"
    run_stage(images, fresh, cfg)
    assert folder_bytes(out) == folder_bytes(fresh)


def test_opencv_without_selective_search_stops_the_stage_and_each_node_check(dataset, tmp_path, monkeypatch):
    """fiftyone's opencv-python-headless owns the same cv2 without `ximgproc`: on the driver, or on
    any Ray node (`raycluster.check_nodes` runs the stage's `check_node` there), that is one clear
    error naming the fix before any task, not a traceback per image."""
    from pipeline import raycluster

    images, _ = dataset
    monkeypatch.delattr(cv2, "ximgproc")
    pin = re.search(r'"opencv-contrib-python-headless==([^"]+)"', (Path(__file__).parents[2] / "pyproject.toml")
                    .read_text()).group(1)                        # the command must install what exists
    fix = rf"no cv2\.ximgproc.*pip install --no-deps --force-reinstall opencv-contrib-python-headless=={re.escape(pin)} "
    with pytest.raises(RuntimeError, match=fix):
        run_stage(images, tmp_path / "out", STAGE_CFG)
    assert not (tmp_path / "out").exists()
    with pytest.raises(RuntimeError, match=fix):
        raycluster._import_here("pipeline.proposals")
    monkeypatch.undo()
    raycluster._import_here("pipeline.proposals")                       # the contrib build passes


def test_a_store_that_cannot_be_reached_stops_the_rerun_and_keeps_every_part(dataset, undisturbed, tmp_path,
                                                                            monkeypatch):
    """Checking a rerun's finished parts reads every image: when the store itself fails (credentials,
    endpoint), that is the job's error, not "every image changed", which would delete all the parts."""
    from pipeline import proposals, storage

    images, _ = dataset
    src, _ = undisturbed
    out = tmp_path / "reused"
    shutil.copytree(src, out)

    def unreachable(loc):
        raise storage.StorageError(f"cannot read {loc}: NoCredentialsError: Unable to locate credentials")
    monkeypatch.setattr(proposals.storage, "sha256", unreachable)
    with pytest.raises(storage.StorageError, match="NoCredentialsError"):
        run_stage(images, out, STAGE_CFG)
    assert folder_bytes(out) == folder_bytes(src)

