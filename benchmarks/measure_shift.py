"""How far the de-positioning shift t moves the proposals, on real shards (issue: eq. 6's letter
hardly moves anything).

    python -m benchmarks.measure_shift --shards data/shards --params params.yaml --out reports/shift

Streams `--samples` samples of the shards with the stage's loader views (`loader.views` of the
params, and once more at the paper's 224/112 views), draws t for each with both readings of
`train.augment.sample_shift` (`within`: eq. 6's letter; `anchor`: the default) and writes
`OUT/shift_px.json` (per view size and mode: mean, median, p10/p90 of |t| in pixels of the x2
view and as a share of its side, the share of samples that move less than one C4 cell (stride 16
of the view) along both axes, and the share of proposals kept in L_dp) and `OUT/shift_px.png`
(the histograms). Deterministic for a seed.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks import save_png
from eval.report_plots import pyplot
from pipeline import cli, shardset
from pipeline.files import write_text
from train.augment import depositioning_boxes, sample_shift
from train.methods import prepare
from train.pretrain import load_config, method_config
from train.stream import make_stream

log = logging.getLogger("benchmarks.measure_shift")
C4_STRIDE = 16


def measure(shards: Path, params: Path, samples: int, size: int | None, seed: int) -> dict:
    cfg = load_config(params).loader
    if size is not None:
        cfg = replace(cfg, views=replace(cfg.views, size=size, small_size=size // 2))
    cfg = replace(cfg, workers=0, batch_size=32, resampled=True, epoch_samples=samples)
    augment = method_config("d3ssl", params).augment
    paths, total = shardset.shards(shards)
    g = torch.Generator().manual_seed(seed)
    out: dict = {"view_size": cfg.views.size, "num_proposals": cfg.views.num_proposals}
    t_all = {"within": [], "anchor": []}
    kept = {"within": [], "anchor": []}
    for batch in make_stream(paths, cfg, seed=seed, total_samples=total):
        b = prepare(batch, torch.device("cpu"))
        H, W = b["x2"].shape[-2:]
        for mode in t_all:
            t = sample_shift(b["boxes2"], b["valid"], H, W, g, mode)
            _, v3 = depositioning_boxes(b["boxes2"], b["valid"], t, H, W, augment.shift_min_visible)
            t_all[mode].append(t.numpy())
            kept[mode].append((v3.sum(1) / b["valid"].sum(1)).numpy())
    for mode, ts in t_all.items():
        t = np.concatenate(ts)[:samples]
        norm = np.linalg.norm(t.astype(np.float64), axis=1)
        out[mode] = {
            "samples": int(len(t)),
            "shift_px_mean": float(norm.mean()), "shift_px_median": float(np.median(norm)),
            "shift_px_p10": float(np.percentile(norm, 10)), "shift_px_p90": float(np.percentile(norm, 90)),
            "shift_share_of_side_mean": float(norm.mean() / cfg.views.size),
            "under_one_c4_cell_both_axes": float(np.mean((np.abs(t) < C4_STRIDE).all(1))),
            "zero_shift": float(np.mean((t == 0).all(1))),
            "proposals_kept_in_l_dp": float(np.concatenate(kept[mode])[:samples].mean()),
            "abs_t": norm.round(2).tolist(),
        }
    return out


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.2))
    for ax, r in zip(np.atleast_1d(axes), results):
        bins = np.linspace(0, r["view_size"] * 0.8, 33)
        for mode in ("within", "anchor"):
            ax.hist(r[mode]["abs_t"], bins=bins, alpha=0.6,
                    label=f"{mode}: mean {r[mode]['shift_px_mean']:.1f} px")
        ax.axvline(C4_STRIDE, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(f"|t| (px of the {r['view_size']} px x2 view)")
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.measure_shift", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, default=Path("data/shards"), help="shards folder (default: %(default)s)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("reports/shift"), help="output folder (default: %(default)s)")
    p.add_argument("--samples", type=int, default=1024, help="samples per view size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="stream and shift seed (default: %(default)s)")
    args = p.parse_args(argv)
    cli.setup_logging()
    results = [measure(args.shards, args.params, args.samples, None, args.seed),
               measure(args.shards, args.params, args.samples, 224, args.seed)]
    summary = [{k: ({kk: vv for kk, vv in v.items() if kk != "abs_t"} if isinstance(v, dict) else v)
                for k, v in r.items()} for r in results]
    write_text(args.out / "shift_px.json", json.dumps({"settings": vars(args) | {"shards": str(args.shards),
               "params": str(args.params), "out": str(args.out)}, "results": summary}, indent=2) + "\n")
    plot(results, args.out / "shift_px.png")
    for r in summary:
        for mode in ("within", "anchor"):
            m = r[mode]
            log.info("view %d, %s: |t| mean %.1f px, median %.1f, under one C4 cell %.0f%%, proposals kept %.0f%%",
                     r["view_size"], mode, m["shift_px_mean"], m["shift_px_median"],
                     100 * m["under_one_c4_cell_both_axes"], 100 * m["proposals_kept_in_l_dp"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
