"""O-KNN cost: feature extraction against search, and the chunked search at real COCO sizes.

    python -m benchmarks.bench_eval [--coco-root data/synth/coco] [--arch resnet18] \
        [--bank 860000] [--queries 36781] [--dims 512 2048] [--sample-queries 1024] [--device cpu]

1. The whole O-KNN stage (eval.oknn.run_oknn, a random `--arch`, the default `oknn` settings) on
   `--coco-root`: seconds spent extracting bank / query / disturbed-query features against
   seconds spent searching (`--skip-stage` leaves it out).
2. The search alone at the real sizes, on random features: a bank of `--bank` rows (COCO train2017
   has 860k boxes) and `--queries` queries (val2017: 36.8k boxes) of each dimension in `--dims`
   (512 for ResNet-18, 2048 for ResNet-50), float32 as the stage keeps them. Each dimension runs in
   a fresh process; peak memory is the process's peak resident set (VmHWM, reset just before the
   search) minus what the inputs occupy, i.e. what the search itself adds.
   The search time is linear in the queries (each bank chunk is read once per call), so it is
   measured on `--sample-queries` and twice as many queries and extrapolated to `--queries`
   with the fitted line (t = fixed + per_query x Q).
   Baseline, same process: the unchunked search (one Q x N similarity matrix, then topk) on
   `--sample-queries` // 2 queries, against the chunked one on the same queries.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

GIB = 1024 ** 3


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")      # VmHWM := current RSS (Linux >= 4.0)


def _search_worker(dim: int, bank_rows: int, queries: int, sample: int, device: str, out) -> None:
    import torch

    from eval.knn import knn_search
    from eval.oknn import OknnConfig

    torch.manual_seed(0)
    cfg = OknnConfig()
    bank = torch.randn(bank_rows, dim)                          # N x D float32, as the stage stores it
    q = torch.randn(queries, dim)                               # Q x D
    resident = _status("VmRSS")
    res = {"dim": dim, "bank": bank_rows, "queries": queries, "rss_with_inputs_gib": resident / GIB,
           "bank_chunk": cfg.bank_chunk, "query_chunk": cfg.query_chunk, "k": cfg.k, "device": device}

    def timed(n: int) -> tuple[float, int]:
        _reset_peak()
        t = time.perf_counter()
        knn_search(bank, q[:n], cfg.k, cfg.bank_chunk, cfg.query_chunk, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, _status("VmHWM") - resident

    t1, peak1 = timed(sample)
    t2, peak2 = timed(2 * sample)
    per_query = (t2 - t1) / sample
    fixed = max(t1 - per_query * sample, 0.0)
    res.update({"sample_queries": [sample, 2 * sample], "sample_s": [t1, t2],
                "extrapolated_s": fixed + per_query * queries, "search_peak_extra_gib": max(peak1, peak2) / GIB})

    # Baseline: one unchunked similarity matrix (what chunking avoids) on half the sample.
    half = sample // 2
    tc, peak_c = timed(half)
    _reset_peak()
    t = time.perf_counter()
    with torch.no_grad():
        qn = torch.nn.functional.normalize(q[:half].to(device), dim=1)
        bn = torch.nn.functional.normalize(bank.to(device), dim=1)
        (qn @ bn.T).topk(cfg.k, dim=1)
    tb = time.perf_counter() - t
    res["baseline_unchunked"] = {"queries": half, "s": tb, "peak_extra_gib": (_status("VmHWM") - resident) / GIB,
                                 "chunked_s": tc, "chunked_peak_extra_gib": peak_c / GIB}
    out.put(res)


def bench_search(dim: int, bank: int, queries: int, sample: int, device: str) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_search_worker, args=(dim, bank, queries, sample, device, q))
    p.start()
    res = q.get()
    p.join()
    return res


def bench_stage(coco_root: Path, arch: str, device: str) -> dict:
    import torch

    from eval.backbone import ResNetStages, build_resnet
    from eval.oknn import OknnConfig, run_oknn

    cfg = OknnConfig()
    stages = ResNetStages(build_resnet(arch, "random", seed=cfg.seed))
    r = run_oknn(stages, coco_root, cfg, torch.device(device))
    t = r["time_s"]
    extract = t["extract_bank"] + t["extract_queries"] + t["extract_disturbed"]
    return {"arch": arch, "coco_root": str(coco_root), "bank_objects": r["bank_objects"], "queries": r["queries"],
            "time_s": t, "extract_s": extract, "search_s": t["search"],
            "search_share": t["search"] / (extract + t["search"]),
            "accuracy": {k: r[k] for k in ("top1", "top5", "disturbed_top1", "disturbed_top5")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--coco-root", type=Path, default=Path("data/synth/coco"))
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--skip-stage", action="store_true", help="only the search at the real sizes")
    p.add_argument("--bank", type=int, default=860_000)
    p.add_argument("--queries", type=int, default=36_781)
    p.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--sample-queries", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    if not args.skip_stage:
        s = bench_stage(args.coco_root, args.arch, args.device)
        print(json.dumps(s, indent=2))
        print(f"stage on {s['coco_root']} ({s['bank_objects']} bank objects, {s['queries']} queries): "
              f"extraction {s['extract_s']:.1f} s, search {s['search_s']:.2f} s "
              f"({100 * s['search_share']:.1f}% of the two)", flush=True)
    for dim in args.dims:
        r = bench_search(dim, args.bank, args.queries, args.sample_queries, args.device)
        print(json.dumps(r, indent=2))
        b = r["baseline_unchunked"]
        print(f"search {r['bank']} x {r['queries']} x {dim}: process with inputs {r['rss_with_inputs_gib']:.2f} GiB; "
              f"{r['sample_s'][0]:.1f} s / {r['sample_s'][1]:.1f} s for {r['sample_queries']} queries -> "
              f"{r['extrapolated_s'] / 60:.1f} min for all; search adds {r['search_peak_extra_gib']:.2f} GiB at peak. "
              f"Baseline on {b['queries']} queries: unchunked {b['s']:.1f} s, +{b['peak_extra_gib']:.2f} GiB; "
              f"chunked {b['chunked_s']:.1f} s, +{b['chunked_peak_extra_gib']:.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
