"""GPU readiness (issue 17): one prepared, unattended check of every CUDA path and of throughput.

    python -m benchmarks.gpu_check --out DIR                # one GPU, at most 6 minutes
    python -m benchmarks.gpu_check --cpu-smoke --out DIR    # the same code paths, tiny, on the CPU

Writes DIR/gpu_check.json (every check by name: status "pass", "fail" or "skipped: <why>", its
figures, seconds and error) and DIR/gpu_check.md (a summary table). Exit status 1 if a check failed.

1. cuda_tests: `pytest -m cuda` on tests/**/test_cuda*.py (per-test timeout; one check per test,
   named by its pytest id): the loss falls over 20 steps for every method (bf16, channels_last),
   SyncBN conversion and kernels, shuffle-BN, bf16 autocast with float32 RoIs, channels_last, a
   1-rank NCCL group with a DDP step, pinned-memory transfer, one pre-training epoch with checkpoint,
   resume and an export that loads into torchvision, a few detection iterations.
2. throughput.{eager,compile}.*: ResNet-50, 224/112 views, K = 4, bf16, channels_last, batch 64:
   images/s and peak memory of a bare torchvision ResNet-50 forward + backward + SGD step on 64
   images at 224 px (`baseline`), then of d3ssl, d3ssl_dc, soco and mocov2 on the same 64 images,
   each with its ratio to the baseline of the same process; without and with torch.compile (the
   baseline network whole; the methods' encoders, c4 / res5 / projector / predictor, since the
   methods' forward holds data-dependent Python).
3. loader.workers<N>: samples/s of the streaming loader (train.stream.make_loader, 224/112 views,
   batch 64) on generated shards of 640x480 JPEGs with 1, 4 and 12 workers, against the images/s
   each method consumes (from 2, eager).

Each group runs in its own process with a timeout, each check inside it under its own alarm, so a
hang, an error or an out-of-memory stops only that check; past the total budget (`--budget-s`) the
remaining checks are "skipped: budget". `--cpu-smoke`: ResNet-18, batch 4, 64/32 px views, 2 steps,
loader with 0 and 1 workers, torch.compile with the "eager" backend (Dynamo only, no Inductor),
gloo for NCCL (the tests' D3SSL_CPU_SMOKE=1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHOD_NAMES = ("d3ssl", "d3ssl_dc", "soco", "mocov2")

# Time limits (seconds): the whole run, each group's process, each check in it. On a GPU the groups
# run in this order and the compile group gets what is left (Inductor's first build of ResNet-50 is
# the slowest step); 6 minutes hold the budget plus start-up.
GPU = {"budget_s": 340, "tests_timeout_s": 150, "per_test_timeout_s": 100, "throughput_timeout_s": 80,
       "compile_timeout_s": 300, "loader_timeout_s": 50, "per_check_s": 60, "per_compile_check_s": 110,
       "arch": "resnet50", "batch": 64, "size": 224, "roi_size": 14, "warmup": 2, "steps": 6,
       "loader_workers": (1, 4, 12), "loader_batch": 64, "loader_window_s": 5,
       "images": 96, "image_size": (640, 480), "shards": 4}
SMOKE = {"budget_s": 170, "tests_timeout_s": 100, "per_test_timeout_s": 60, "throughput_timeout_s": 45,
         "compile_timeout_s": 60, "loader_timeout_s": 40, "per_check_s": 30, "per_compile_check_s": 30,
         "arch": "resnet18", "batch": 4, "size": 64, "roi_size": 7, "warmup": 1, "steps": 2,
         "loader_workers": (0, 1), "loader_batch": 4, "loader_window_s": 0.5,
         "images": 16, "image_size": (96, 72), "shards": 2}


def planned_checks(smoke: bool) -> list[str]:
    """Every check this script reports besides the per-test ones of cuda_tests (named from pytest)."""
    s = SMOKE if smoke else GPU
    names = ["cuda_tests"]
    for mode in ("eager", "compile"):
        names += [f"throughput.{mode}.baseline"] + [f"throughput.{mode}.{m}" for m in METHOD_NAMES]
    names += [f"loader.workers{w}" for w in s["loader_workers"]]
    return names


# ------------------------------------------------------------------------------ worker side


class CheckTimeout(Exception):
    pass


@contextmanager
def alarm(seconds: float):
    """Raise CheckTimeout in the main thread after `seconds` (checked when Python code runs)."""
    def handler(signum, frame):
        raise CheckTimeout(f"timeout after {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Emitter:
    """Writes one JSON line per finished check (what a killed worker finished survives)."""

    def __init__(self, path: Path, deadline: float, per_check: float):
        self.path, self.deadline, self.per_check = path, deadline, per_check

    def write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def run(self, name: str, fn, *a, **kw):
        """Run one check under its alarm; record pass / fail / skipped; return its figures or None."""
        left = self.deadline - time.time()
        if left < 3:
            self.write({"name": name, "status": "skipped: budget", "seconds": 0.0, "figures": {}})
            return None
        t0 = time.time()
        by_budget = left < self.per_check
        try:
            with alarm(min(self.per_check, left)):
                figures = fn(*a, **kw)
            self.write({"name": name, "status": "pass", "seconds": round(time.time() - t0, 2), "figures": figures})
            return figures
        except BaseException as e:        # noqa: BLE001 - a failed check must not stop the others
            if isinstance(e, KeyboardInterrupt):
                raise
            err = f"{type(e).__name__}: {e}"[:2000]
            # stopped by the run's budget rather than by its own limit: not a verdict on the code
            status = "skipped: budget" if isinstance(e, CheckTimeout) and by_budget else "fail"
            self.write({"name": name, "status": status, "seconds": round(time.time() - t0, 2), "figures": {},
                        "error": err, "traceback": traceback.format_exc()[-4000:]})
            return None
        finally:
            _free()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_reset(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev):
    import torch

    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None


def _timed_steps(step, warmup: int, steps: int, dev) -> float:
    """Seconds per step after `warmup` steps (compilation happens there)."""
    for _ in range(warmup):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return (time.perf_counter() - t0) / steps


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compiled_graphs(compiled: bool, before: int) -> dict:
    """Graphs Dynamo compiled since `before` (0 where an earlier method's graphs were reused) and in
    the process; with compile on, none at all is a failure (compile did nothing)."""
    if not compiled:
        return {}
    if _graphs() <= 0:
        raise RuntimeError("torch.compile compiled no graph")
    return {"compiled_graphs": _graphs() - before, "compiled_graphs_in_process": _graphs()}


def _compile(module, dev):
    import torch

    # The CPU smoke traces with Dynamo only: Inductor's C++ build would take minutes on 2 cores.
    return torch.compile(module, backend="inductor" if dev.type == "cuda" else "eager")


def throughput_worker(s: dict, compiled: bool, em: Emitter) -> None:
    import torch
    import torch.nn.functional as F
    import torchvision

    from benchmarks.bench_augment import fake_batch
    from train.methods import DEFAULTS, build

    dev = torch.device("cuda" if torch.cuda.is_available() and not s["smoke"] else "cpu")
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True
    mode = "compile" if compiled else "eager"
    B, size = s["batch"], s["size"]
    common = {"arch": s["arch"], "batch": B, "size": size, "small_size": size // 2, "K": 4, "bf16": True,
              "channels_last": cuda, "compile": compiled, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
              "steps": s["steps"]}

    def baseline():
        torch.manual_seed(0)
        _peak_reset(dev)
        net = getattr(torchvision.models, s["arch"])(weights=None).to(dev)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        fwd = _compile(net, dev) if compiled else net
        x = torch.randn(B, 3, size, size, device=dev)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (B,), device=dev)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(fwd(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        graphs = _graphs()
        t = _timed_steps(step, s["warmup"], s["steps"], dev)
        return {**common, "images_per_s": round(B / t, 2), "s_per_step": round(t, 4), "peak_gib": _peak_gib(dev),
                **_compiled_graphs(compiled, graphs)}

    base = em.run(f"throughput.{mode}.baseline", baseline)
    batch = fake_batch(B, size, 4, dev)
    if cuda:
        batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}

    def method(name: str):
        torch.manual_seed(0)
        _peak_reset(dev)
        m = build(name, s["arch"], DEFAULTS[name], roi_size=s["roi_size"], bn_splits=1).to(dev)
        if cuda:
            m = m.to(memory_format=torch.channels_last)
        if compiled:
            for enc in (m.student, m.teacher):
                for part in ("c4", "res5", "projector"):
                    setattr(enc, part, _compile(getattr(enc, part), dev))
            if hasattr(m, "predictor"):
                m.predictor = _compile(m.predictor, dev)
        opt = torch.optim.SGD(m.trainable(), lr=0.01, momentum=0.9)
        g = torch.Generator(device=dev).manual_seed(0)
        losses = []

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss, _ = m(batch, g, 0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        graphs = _graphs()
        t = _timed_steps(step, s["warmup"], s["steps"], dev)
        dynamo = _compiled_graphs(compiled, graphs)
        last = float(losses[-1])
        if last != last:
            raise FloatingPointError(f"{name}: loss is NaN")
        out = {**common, "method": name, "images_per_s": round(B / t, 2), "s_per_step": round(t, 4),
               "peak_gib": _peak_gib(dev), "loss": round(last, 4), **dynamo}
        if base:
            out["ratio_to_baseline"] = round(out["images_per_s"] / base["images_per_s"], 4)
            out["baseline_images_per_s"] = base["images_per_s"]
            if out["peak_gib"] is not None and base["peak_gib"]:
                out["peak_ratio_to_baseline"] = round(out["peak_gib"] / base["peak_gib"], 3)
        return out

    for name in METHOD_NAMES:
        em.run(f"throughput.{mode}.{name}", method, name)


def make_shards(root: Path, s: dict) -> Path:
    """Generated shards through the real writer: smooth colour images (JPEG sizes like photos')."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from pipeline.shards import write_shard
    from pipeline.shardset import SHARD_PATTERN

    rng = np.random.default_rng(0)
    W, H = s["image_size"]
    per = s["images"] // s["shards"]
    entries = []
    schema = pa.schema([("key", pa.string()), ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()),
                        ("y2", pa.float32()), ("rank", pa.int32())])
    for sh in range(s["shards"]):
        rows, props = [], []
        for j in range(per):
            key = f"img_{sh}_{j}"
            path = root / "src" / f"{key}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 255, (H // 16 + 1, W // 16 + 1, 3), dtype=np.uint8)
            im = Image.fromarray(small).resize((W, H), Image.BILINEAR)
            im.save(path, quality=90)
            rows.append({"key": key, "source": "t", "image_id": key, "path": str(path), "width": W, "height": H})
            for r in range(8):
                x0, y0 = float(rng.uniform(0, W * 0.5)), float(rng.uniform(0, H * 0.5))
                props.append({"key": key, "x1": x0, "y1": y0, "x2": x0 + W * 0.4, "y2": y0 + H * 0.4, "rank": r})
        entries.append(write_shard(SHARD_PATTERN.format(sh), rows, pa.Table.from_pylist(props, schema=schema), root, 95))
    (root / "index.json").write_text(json.dumps({"shards": entries, "total_samples": per * s["shards"]}))
    return root


def loader_worker(s: dict, em: Emitter, tmp: Path) -> None:
    from pipeline.shardset import shards as read_index
    from train.stream import LoaderConfig, make_loader
    from train.views import ViewConfig

    shards = make_shards(tmp / "shards", s)
    urls, total = read_index(shards)
    views = ViewConfig(size=s["size"], small_size=s["size"] // 2, num_proposals=4)

    def rate(workers: int):
        """Steady samples/s: skip the batches the workers prefetch while starting (2 per worker),
        then count batches for `loader_window_s` seconds."""
        w = max(workers, 1)
        cfg = LoaderConfig(batch_size=s["loader_batch"], workers=workers, shuffle_buffer=32,
                           epoch_samples=w * 1000 * s["loader_batch"], views=views)
        t_start = time.perf_counter()
        it = iter(make_loader(urls, cfg, seed=0, total_samples=total))
        next(it)
        first = time.perf_counter() - t_start
        for _ in range(2 * workers):
            next(it)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < s["loader_window_s"]:
            n += len(next(it)["key"])
        dt = time.perf_counter() - t0
        del it                                     # stops the workers
        return {"workers": workers, "samples_per_s": round(n / dt, 1),
                "samples_per_s_per_worker": round(n / dt / w, 1), "first_batch_s": round(first, 2),
                "measured_samples": n, "batch": s["loader_batch"], "view_size": s["size"],
                "image_size": list(s["image_size"]), "cpu_count": os.cpu_count()}

    for w in s["loader_workers"]:
        em.run(f"loader.workers{w}", rate, w)


def worker_main(group: str, s: dict, out: Path) -> int:
    import torch

    if s["smoke"]:
        torch.set_num_threads(1)
    em = Emitter(out, s["deadline"], s["per_compile_check_s"] if group == "throughput.compile" else s["per_check_s"])
    if group == "throughput.eager":
        throughput_worker(s, False, em)
    elif group == "throughput.compile":
        throughput_worker(s, True, em)
    elif group == "loader":
        with tempfile.TemporaryDirectory(prefix="gpu_check_loader_") as tmp:
            loader_worker(s, em, Path(tmp))
    else:
        raise SystemExit(f"unknown group {group}")
    return 0


# ------------------------------------------------------------------------------ parent side


def _run(cmd: list[str], timeout: float, env: dict, log: Path) -> tuple[int | None, float]:
    """Run `cmd` in its own process group; kill the group on timeout. (returncode or None, seconds)."""
    t0 = time.time()
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1)), time.time() - t0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, time.time() - t0


def cuda_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_cuda*.py"))


def parse_junit(path: Path) -> list[dict]:
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        mod = case.get("classname", "").replace(".", "/") + ".py"
        name = f"{mod}::{case.get('name')}"
        rec = {"name": name, "seconds": round(float(case.get("time", 0)), 2), "figures": {}}
        fail = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if fail is not None:
            rec.update(status="fail", error=(fail.get("message") or "")[:2000], traceback=(fail.text or "")[-4000:])
        elif skip is not None:
            rec["status"] = f"skipped: {(skip.get('message') or '').strip()[:300]}"
        else:
            rec["status"] = "pass"
        out.append(rec)
    return out


def parse_verbose_log(log: Path, secs: float) -> list[dict]:
    """Per-test results from `pytest -v` output, for a pytest killed before it wrote its JUnit file:
    the test it was running when killed is a failure (timeout)."""
    import re

    out = []
    text = log.read_text(errors="replace") if log.is_file() else ""
    for m in re.finditer(r"^(tests/\S+::\S+)(?: (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b)?", text, re.M):
        name, verdict = m.group(1), m.group(2)
        if any(t["name"] == name for t in out):
            continue
        status = {"PASSED": "pass", "XFAIL": "pass", "SKIPPED": "skipped: (see pytest_cuda.log)"}.get(verdict, "fail")
        rec = {"name": name, "seconds": 0.0, "figures": {}, "status": status}
        if verdict is None:
            rec["error"] = f"pytest was killed while this test ran (group timeout, {secs:.0f} s)"
        elif status == "fail":
            rec["error"] = f"{verdict} (see pytest_cuda.log)"
        out.append(rec)
    return out


def run_cuda_tests(s: dict, out: Path, env: dict, timeout: float) -> list[dict]:
    xml = out / "pytest_cuda.xml"
    xml.unlink(missing_ok=True)
    basetemp = Path(tempfile.mkdtemp(prefix="gpu_check_pytest_"))
    log = out / "pytest_cuda.log"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}",
           f"--timeout={s['per_test_timeout_s']}", f"--basetemp={basetemp}", *cuda_test_files()]
    try:
        rc, secs = _run(cmd, timeout, env, log)
    finally:
        shutil.rmtree(basetemp, ignore_errors=True)
    tests = parse_junit(xml) if xml.is_file() else parse_verbose_log(log, secs)
    failed = [t["name"] for t in tests if t["status"] == "fail"]
    ok = rc == 0 and tests and not failed
    summary = {"name": "cuda_tests", "seconds": round(secs, 1), "status": "pass" if ok else "fail",
               "figures": {"tests": len(tests), "passed": sum(t["status"] == "pass" for t in tests),
                           "failed": len(failed), "skipped": sum(t["status"].startswith("skipped") for t in tests),
                           "pytest_returncode": rc, "device": "cpu" if s["smoke"] else "cuda"}}
    if not ok:
        summary["error"] = ("timeout after %.0f s" % secs if rc is None else
                            f"pytest exit {rc}; failed: {failed}" if failed or tests else
                            f"pytest exit {rc}, no results (see pytest_cuda.log)")
    if not s["smoke"] and tests and all(t["status"].startswith("skipped") for t in tests):
        summary.update(status="fail", error="every CUDA test skipped: no GPU visible to pytest")
    return [summary] + tests


def run_group(group: str, names: list[str], s: dict, out: Path, env: dict, timeout: float) -> list[dict]:
    lines = out / f"{group}.jsonl"
    lines.unlink(missing_ok=True)
    spec = {**s, "deadline": time.time() + timeout - 2}
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", group, "--worker-spec", json.dumps(spec),
           "--worker-out", str(lines)]
    rc, secs = _run(cmd, timeout, env, out / f"{group}.log")
    got = [json.loads(x) for x in lines.read_text().splitlines()] if lines.is_file() else []
    seen = {r["name"] for r in got}
    why = (f"the {group} process timed out after {secs:.0f} s" if rc is None else
           f"the {group} process exited with {rc} before this check (see {group}.log)")
    for n in names:
        if n not in seen:
            got.append({"name": n, "status": "fail", "seconds": 0.0, "figures": {}, "error": why})
    return got


def machine(smoke: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "host": platform.node(), "mode": "cpu-smoke" if smoke else "gpu"}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: E731
        info["git"] = {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except Exception:             # noqa: BLE001 - a copy without git
        pass
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


def add_loader_vs_trainer(checks: list[dict]) -> None:
    """Loader samples/s against what each method consumes (images/s, eager, same run)."""
    eager = {c["figures"]["method"]: c["figures"]["images_per_s"] for c in checks
             if c["name"].startswith("throughput.eager.") and c["status"] == "pass" and "method" in c["figures"]}
    for c in checks:
        if c["name"].startswith("loader.") and c["status"] == "pass":
            sps = c["figures"]["samples_per_s"]
            c["figures"]["trainer_images_per_s"] = eager
            c["figures"]["loader_over_trainer"] = {m: round(sps / v, 3) for m, v in eager.items() if v}
            c["figures"]["keeps_up"] = {m: sps >= v for m, v in eager.items()}


def loader_summary(checks: list[dict]) -> dict:
    """Per method: the fewest loader workers measured whose samples/s reach its images/s (None: none did)."""
    rows = sorted((c["figures"]["workers"], c["figures"]) for c in checks
                  if c["name"].startswith("loader.") and c["status"] == "pass")
    out = {}
    for m in METHOD_NAMES:
        enough = [w for w, f in rows if f.get("keeps_up", {}).get(m)]
        if rows and m in rows[0][1].get("keeps_up", {}):
            out[m] = enough[0] if enough else None
    return out


def fmt_figures(c: dict) -> str:
    f = c.get("figures") or {}
    if c["name"] == "cuda_tests":
        if "tests" not in f:
            return ""
        return f"{f.get('passed')} passed, {f.get('failed')} failed, {f.get('skipped')} skipped of {f.get('tests')}"
    if c["name"].startswith("throughput."):
        if "images_per_s" not in f:
            return ""
        parts = [f"{f['images_per_s']} img/s"]
        if "ratio_to_baseline" in f:
            parts.append(f"{f['ratio_to_baseline']:.2f}x baseline")
        if f.get("peak_gib") is not None:
            parts.append(f"peak {f['peak_gib']} GiB")
        return ", ".join(parts)
    if c["name"].startswith("loader."):
        if "samples_per_s" not in f:
            return ""
        over = f.get("loader_over_trainer") or {}
        return f"{f['samples_per_s']} samples/s" + (
            "; vs trainer " + ", ".join(f"{m} {r:.2f}x" for m, r in over.items()) if over else "")
    return ""


def write_markdown(path: Path, report: dict) -> None:
    m = report["machine"]
    lines = [f"# GPU check ({m['mode']}), {report['started']}", "",
             f"Machine: {m.get('gpu', 'no GPU')}, {m['cpu_count']} CPU cores, torch {m['torch']}"
             f"{', CUDA ' + m['cuda'] if m.get('cuda') else ''}. Total {report['elapsed_s']} s of a "
             f"{report['budget_s']} s budget; {report['counts']['pass']} pass, {report['counts']['fail']} fail, "
             f"{report['counts']['skipped']} skipped.", "",
             "| check | status | figures | s |", "|---|---|---|---|"]
    tail = []
    if report.get("loader_workers_to_keep_up"):
        tail = ["", "Loader workers that keep one process's trainer fed (fewest measured; none: no count did): "
                + ", ".join(f"{m} {w if w is not None else 'none'}" for m, w in report["loader_workers_to_keep_up"].items())
                + f" (of {', '.join(map(str, report['settings']['loader_workers']))} measured)."]
    for c in report["checks"]:
        status = c["status"] + (f" ({c['error'][:120]})" if c.get("error") else "")
        lines.append(f"| `{c['name']}` | {status.replace('|', '/')} | {fmt_figures(c).replace('|', '/')} | {c['seconds']} |")
    path.write_text("\n".join(lines + tail) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for gpu_check.json, gpu_check.md and the logs")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (the test of this script)")
    p.add_argument("--budget-s", type=float, help=f"total seconds (default {GPU['budget_s']} on a GPU, {SMOKE['budget_s']} for the smoke)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.worker_spec), args.worker_out)
    if args.out is None:
        p.error("--out is required")
    t_start = time.time()
    smoke = args.cpu_smoke
    s = {**(SMOKE if smoke else GPU), "smoke": smoke}
    budget = args.budget_s or s["budget_s"]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if smoke:
        env.update(D3SSL_CPU_SMOKE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    else:
        env.pop("D3SSL_CPU_SMOKE", None)
    groups = [
        ("cuda_tests", ["cuda_tests"], s["tests_timeout_s"]),
        ("throughput.eager", [f"throughput.eager.{n}" for n in ("baseline", *METHOD_NAMES)], s["throughput_timeout_s"]),
        ("loader", [f"loader.workers{w}" for w in s["loader_workers"]], s["loader_timeout_s"]),
        ("throughput.compile", [f"throughput.compile.{n}" for n in ("baseline", *METHOD_NAMES)], s["compile_timeout_s"]),
    ]
    checks: list[dict] = []
    groups_s: dict[str, float] = {}
    import torch

    if not smoke and not torch.cuda.is_available():
        checks += [{"name": n, "status": "fail", "seconds": 0.0, "figures": {},
                    "error": "no CUDA device visible (torch.cuda.is_available() is false); --cpu-smoke runs on the CPU"}
                   for _, names, _ in groups for n in names]
        groups = []
    for group, names, cap in groups:
        left = budget - (time.time() - t_start)
        if left < 10:
            checks += [{"name": n, "status": "skipped: budget", "seconds": 0.0, "figures": {}} for n in names]
            continue
        timeout = min(cap, left)
        print(f"[gpu_check] {group} (up to {timeout:.0f} s)", flush=True)
        t_group = time.time()
        try:
            if group == "cuda_tests":
                checks += run_cuda_tests(s, out, env, timeout)
            else:
                checks += run_group(group, names, s, out, env, timeout)
        except Exception as e:          # noqa: BLE001 - the parent itself must always write its report
            have = {c["name"] for c in checks}
            checks += [{"name": n, "status": "fail", "seconds": 0.0, "figures": {}, "error": f"{type(e).__name__}: {e}"}
                       for n in names if n not in have]
        groups_s[group] = round(time.time() - t_group, 1)
    add_loader_vs_trainer(checks)
    counts = {"pass": sum(c["status"] == "pass" for c in checks), "fail": sum(c["status"] == "fail" for c in checks),
              "skipped": sum(c["status"].startswith("skipped") for c in checks),
              "out_of_budget": sum(c["status"] == "skipped: budget" for c in checks)}
    report = {"issue": 17, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t_start)),
              "elapsed_s": round(time.time() - t_start, 1), "budget_s": budget, "machine": machine(smoke),
              "settings": {k: v for k, v in s.items() if k != "deadline"}, "planned": planned_checks(smoke),
              "counts": counts, "passed": counts["fail"] == counts["out_of_budget"] == 0, "loader_workers_to_keep_up": loader_summary(checks),
              "groups_s": groups_s, "checks": checks}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(out / "gpu_check.md", report)
    for c in checks:
        print(f"[gpu_check] {c['status']:<8} {c['name']}  {fmt_figures(c)}", flush=True)
    print(f"[gpu_check] {counts} in {report['elapsed_s']} s -> {out / 'gpu_check.json'}", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
