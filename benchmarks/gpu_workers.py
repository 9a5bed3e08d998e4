"""The worker side of `benchmarks.gpu_check`: one process per group of checks (throughput eager,
throughput compiled, the loader), each check under its own alarm, one JSON line per finished check
(what a killed worker finished survives). The parent (`benchmarks.gpu_check`) starts

    python -m benchmarks.gpu_workers GROUP SPEC_JSON OUT_JSONL

with the settings of `gpu_check.GPU` or `gpu_check.SMOKE` plus a deadline, and reads OUT_JSONL.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from benchmarks.gpu_check import METHOD_NAMES


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


def _setting(s: dict, compiled: bool):
    """(device, the figures every throughput check records)."""
    import torch

    from train.trainer import cpu_bf16

    dev = torch.device("cuda" if torch.cuda.is_available() and not s["smoke"] else "cpu")
    cuda = dev.type == "cuda"
    # bf16 on a GPU, and in the CPU smoke where `pretrain.bf16_cpu: auto` would use it (a native
    # oneDNN bf16 path): emulated on an AVX2-only CPU, 24-36x slower, the smoke ran past its budget
    bf16 = cuda or cpu_bf16("auto")
    common = {"arch": s["arch"], "batch": s["batch"], "size": s["size"], "small_size": s["size"] // 2, "K": 4,
              "bf16": bf16, "channels_last": cuda, "compile": compiled,
              "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "steps": s["steps"]}
    return dev, common


def baseline_check(s: dict, compiled: bool) -> dict:
    """A bare torchvision ResNet forward + backward + SGD step on `batch` images at `size` px, bf16
    (channels_last on a GPU): the images/s every method is compared with."""
    import torch
    import torch.nn.functional as F
    import torchvision

    dev, common = _setting(s, compiled)
    B, size, cuda = s["batch"], s["size"], dev.type == "cuda"
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
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=common["bf16"]):
            loss = F.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    graphs = _graphs()
    t = _timed_steps(step, s["warmup"], s["steps"], dev)
    return {**common, "images_per_s": round(B / t, 2), "s_per_step": round(t, 4), "peak_gib": _peak_gib(dev),
            **_compiled_graphs(compiled, graphs)}


def _method(name: str, s: dict, dev, compiled: bool):
    """Method `name` on the device, its encoders compiled part by part when `compiled` (the methods'
    forward holds data-dependent Python)."""
    import torch

    from train.methods import DEFAULTS, build

    m = build(name, s["arch"], DEFAULTS[name], roi_size=s["roi_size"], bn_splits=1).to(dev)
    if dev.type == "cuda":
        m = m.to(memory_format=torch.channels_last)
    if compiled:
        for enc in (m.student, m.teacher):
            for part in ("c4", "res5", "projector"):
                setattr(enc, part, _compile(getattr(enc, part), dev))
        if hasattr(m, "predictor"):
            m.predictor = _compile(m.predictor, dev)
    return m


def method_check(name: str, s: dict, compiled: bool, batch: dict, base: dict | None) -> dict:
    """Training steps of method `name` on `batch` (the baseline's images with their views and
    boxes): images/s, peak memory, the last loss, and the ratios to `base`."""
    import torch

    dev, common = _setting(s, compiled)
    torch.manual_seed(0)
    _peak_reset(dev)
    m = _method(name, s, dev, compiled)
    opt = torch.optim.SGD(m.trainable(), lr=0.01, momentum=0.9)
    g = torch.Generator(device=dev).manual_seed(0)
    losses = []

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=common["bf16"]):
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
    out = {**common, "method": name, "images_per_s": round(s["batch"] / t, 2), "s_per_step": round(t, 4),
           "peak_gib": _peak_gib(dev), "loss": round(last, 4), **dynamo}
    if base:
        out["ratio_to_baseline"] = round(out["images_per_s"] / base["images_per_s"], 4)
        out["baseline_images_per_s"] = base["images_per_s"]
        if out["peak_gib"] is not None and base["peak_gib"]:
            out["peak_ratio_to_baseline"] = round(out["peak_gib"] / base["peak_gib"], 3)
    return out


def throughput_worker(s: dict, compiled: bool, em: Emitter) -> None:
    """The baseline, then every method on the same images, each one check."""
    import torch

    from benchmarks.bench_augment import fake_batch

    torch.backends.cudnn.benchmark = True
    mode = "compile" if compiled else "eager"
    dev, _ = _setting(s, compiled)
    base = em.run(f"throughput.{mode}.baseline", baseline_check, s, compiled)
    batch = fake_batch(s["batch"], s["size"], 4, dev)
    if dev.type == "cuda":
        batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}
    for name in METHOD_NAMES:
        em.run(f"throughput.{mode}.{name}", method_check, name, s, compiled, batch, base)


def make_shards(root: Path, s: dict) -> Path:
    """Generated shards through the real writer: smooth colour images (JPEG sizes like photos')."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from pipeline.contracts import PROPOSALS_SCHEMA
    from pipeline.shards import ShardsConfig, write_index, write_shard
    from pipeline.shardset import SHARD_PATTERN

    rng = np.random.default_rng(0)
    W, H = s["image_size"]
    per = s["images"] // s["shards"]
    entries = []
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
        entries.append(write_shard(SHARD_PATTERN.format(sh), rows, pa.Table.from_pylist(props, schema=PROPOSALS_SCHEMA),
                                   root, 95))
    write_index(root, entries, ShardsConfig(samples_per_shard=per), "(generated: no images table)")
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


def main(argv: list[str] | None = None) -> int:
    """python -m benchmarks.gpu_workers GROUP SPEC_JSON OUT_JSONL (what gpu_check starts per group)."""
    group, spec, out = (argv if argv is not None else sys.argv[1:])
    return worker_main(group, json.loads(spec), Path(out))


if __name__ == "__main__":
    sys.exit(main())
