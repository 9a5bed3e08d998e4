"""The report stage: the paper's tables for every model, averaged over seeds.

    python -m eval.report --params params.yaml --reports reports/models --runs reports/models \
        --dataset-stats data/openimage_mini/stats.json --proposals-summary data/proposals/summary.json \
        --out reports/results
    python -m eval.report --reports reports/models --models random d3ssl soco --seeds 0 1 2 ...

Reads, for each model and seed, `REPORTS/<model>/seed<s>/oknn.json`, `probes.json` and
`detect/metrics.json` (where detection ran: `detect_models`), and writes `OUT.md` and `OUT.json` with:
- Table 4: O-KNN and disturbed O-KNN top-1/top-5 per model, and the protocol the runs used
  (region feature, input size, k, the objects' size in C5 cells: `oknn_protocol` in the JSON);
- Table 7: coupling rate and mean cosine similarity (at C5, the layer the paper's Table 7 reports;
  all layers in the JSON) and detection AP for d3ssl against d3ssl_dc, beside the one-pixel
  control each probe run measured at its own settings (1 when the probe measures the network and
  not its RoIAlign sampling; `control_cr_<layer>`, `control_mcs_<layer>` in the JSON, and
  `probe_control_max_deviation` over every run and layer);
- Table 1: detection AP, AP50, AP75 per model;
- Table 2: the OpenImage-MINI statistics against COCO; the selective-search proposals per image
  (from the proposals stage's summary.json: `proposals` in the JSON);
- the paper's orderings, each checked (eval.report_checks): holds when every model was measured and
  the means are ordered as in the paper, and "clear" when it holds and every step is a
  `clear_gap` (at least 3 runs on each side, a gap larger than the two spreads together); besides,
  each SSL method against random (by 5 points) and the supervised ceiling against each SSL method
  on O-KNN;
- the pre-training runs' health (`pretrain.json` beside the results: loss against its chance level,
  rank-1 accuracy, key spread), with a warning for every run that ended at chance or collapsed;
- the curves a reader compares, every method on one plot each (mean line, min-max band over the
  seeds; eval.report_plots): `OUT_loss.png` (pre-training loss against step, from the curves
  under `--runs`: the trainlog stage's copies or the runs' dvclive logs) and `oknn_curve.png`
  beside OUT (the learning curve, O-KNN top-1 against step: the random start, the curve stage's
  snapshots, the final backbones), with their means in `OUT_loss.csv` and `oknn_curve.csv` for
  `dvc plots show`;
- `OUT_cr.png` / `OUT_mcs.png`: the probes over layers, one line per model (mean over seeds);
- `OUT_metrics/<model>.json`: the headline means of each model (`METRICS`: O-KNN, disturbed O-KNN,
  CR and MCS at C5, detection AP where it ran), what `dvc metrics show` prints, one row per model
  (`OUT.json` holds every value, spread and seed).
Every number is mean and sample standard deviation over the seeds (percent for accuracies and AP).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from eval.report_checks import (
    fmt, health_problems, health_section, load, orderings_section, paper_orderings,
)
from eval.report_plots import plot_curves, plot_means
from pipeline import cli
from pipeline.files import write_text
from train.resnet_layout import LAYERS

log = logging.getLogger(__name__)

TABLE4 = ("top1", "top5", "disturbed_top1", "disturbed_top5")
TABLE1 = ("AP", "AP50", "AP75")
METRICS = ("oknn_top1", "oknn_top5", "oknn_disturbed_top1", "cr_C5", "mcs_C5", "det_AP")


def write_metrics(folder: Path, means: dict[str, dict]) -> None:
    """One `<model>.json` per model in `folder` (a model no longer reported loses its file)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        if old.stem not in means:
            old.unlink()
    for model, values in means.items():
        write_text(folder / f"{model}.json", json.dumps(values, indent=2) + "\n")


def headline(results: dict) -> dict:
    """model -> {metric: mean over seeds, 3 decimals} for the `METRICS` each model has."""
    return {m: {k: round(r[k]["mean"], 3) for k in METRICS if k in r} for m, r in results.items()}


def mean_std(values: list[float]) -> dict:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "std": sd, "n": n, "values": values}


def collect(reports: Path, models: list[str], seeds: list[int], detect_models: list[str] | None = None) -> dict:
    """Every metric of every model and seed, as {model: {metric: {values, mean, std, n}}}.
    Detection is read for the models of `detect_models` only (all models when None): a
    `detect/metrics.json` left by an earlier run of a model no longer fine-tuned is ignored, and
    one missing for a listed model is an error."""
    out = {}
    for model in models:
        rows: dict[str, list[float]] = {}
        for s in seeds:
            d = reports / model / f"seed{s}"
            health = (d / "pretrain.json").is_file() and load(d / "pretrain.json").get("health")
            if health:
                for k in ("loss_over_chance", "top1", "key_std"):
                    if health.get(k) is not None:
                        rows.setdefault(f"health_{k}", []).append(float(health[k]))
                rows.setdefault("health_problems", []).append(float(len(health.get("problems", []))))
            oknn = load(d / "oknn.json")
            probes = load(d / "probes.json")
            # detection runs on the models of `detect_models` only (params.yaml); others have none
            det_file = detection_of(d, model, detect_models)
            det = load(det_file) if det_file else None
            for k in TABLE4:
                rows.setdefault(f"oknn_{k}", []).append(float(oknn[k]))
            rows.setdefault("oknn_prior_top1", []).append(float(oknn["prior_top1"]))
            rows.setdefault("oknn_classes", []).append(float(oknn["classes"]))
            if "control" not in probes:
                raise ValueError(f"{d / 'probes.json'} has no one-pixel 'control': rerun its probes stage")
            for layer in LAYERS:
                for metric in ("cr", "mcs"):
                    rows.setdefault(f"{metric}_{layer}", []).append(float(probes[metric][layer]))
                    rows.setdefault(f"control_{metric}_{layer}", []).append(float(probes["control"][metric][layer]))
            for k in TABLE1 if det else ():
                rows.setdefault(f"det_{k}", []).append(float(det["bbox"][k]))
        out[model] = {k: mean_std(v) for k, v in rows.items()}
    return out


def oknn_protocol(reports: Path, models: list[str], seeds: list[int]) -> list[str]:
    """The distinct O-KNN protocols of the runs, in words (one, when every run used the same)."""
    seen = []
    for model in models:
        for s in seeds:
            o = load(reports / model / f"seed{s}" / "oknn.json")
            size, cells = o.get("image_size", {}), o.get("object_c5_cells", {}).get("queries", {})
            text = (f"`{o.get('feature', '?')}`, shorter side {size.get('min_size', '?')} px (longer at most "
                    f"{size.get('max_size', '?')}), k = {o.get('k', '?')}; query objects' shorter side "
                    f"{cells.get('median', '?')} C5 cells (median; 10th percentile {cells.get('p10', '?')})")
            if text not in seen:
                seen.append(text)
    return seen


def detection_of(d: Path, model: str, detect_models: list[str] | None) -> Path | None:
    """The run folder `d`'s detect/metrics.json where detection belongs to the report: for the
    models of `detect_models` (missing: an error), for every model with one when None, else None
    (a file an earlier run left for a model no longer fine-tuned)."""
    f = d / "detect" / "metrics.json"
    if detect_models is None:
        return f if f.is_file() else None
    if model not in detect_models:
        return None
    if not f.is_file():
        raise ValueError(f"{f} is missing but {model} is in detect_models: run its detect stage")
    return f


def probe_and_detect_settings(reports: Path, models: list[str], seeds: list[int],
                              detect_models: list[str] | None = None) -> dict[str, list[str]]:
    """The distinct probe and detection settings of the runs, in words."""
    out: dict[str, list[str]] = {"probes": [], "detect": []}
    for model in models:
        for s in seeds:
            d = reports / model / f"seed{s}"
            p = load(d / "probes.json").get("settings", {})
            text = (f"objects of {p.get('object_size', '?')} px, RoIAlign {p.get('pool_size', '?')}x"
                    f"{p.get('pool_size', '?')} + average pooling, CR canvas {p.get('canvas', '?')} px, "
                    f"{p.get('pairs', '?')} pairs, {p.get('objects', '?')} grids")
            if text not in out["probes"]:
                out["probes"].append(text)
            det_file = detection_of(d, model, detect_models)
            if det_file:
                det = load(det_file)
                sch, cfg = det.get("schedule", {}), det.get("settings", {})
                text = (f"preset `{det.get('preset', '?')}` ({sch.get('max_iter', cfg.get('max_iter', '?'))} iterations), "
                        f"{det.get('train_images', '?')} train / {det.get('val_images', '?')} val images")
                if text not in out["detect"]:
                    out["detect"].append(text)
    return out


def _oknn_section(results: dict, protocol: list[str]) -> list[str]:
    lines = ["## Object-level kNN (like Table 4)", "",
             "| model | O-KNN top-1 | O-KNN top-5 | disturbed top-1 | disturbed top-5 |", "|---|---|---|---|---|"]
    for m in results:
        lines.append(f"| {m} | " + " | ".join(fmt(results[m][f"oknn_{k}"]) for k in TABLE4) + " |")
    first = next(iter(results.values()))
    lines += ["", f"The floor: answering the label of a random bank object, without looking at the image, "
              f"gives {first['oknn_prior_top1']['mean']:.2f} top-1 ({first['oknn_classes']['mean']:.0f} classes; "
              "the bank is class-balanced, so it holds the queries' frequent classes less often than they occur)."]
    return lines + (["", "Protocol: " + "; ".join(protocol) + "."] if protocol else [])


def _ablation_section(results: dict, settings: dict) -> list[str]:
    lines = ["", "## De-positioning ablation (like Table 7; probes at C5)", "",
             "| model | CR ↓ | MCS ↑ | AP ↑ | control CR | control MCS |", "|---|---|---|---|---|---|"]
    for m in ("d3ssl_dc", "d3ssl"):
        if m in results:
            r = results[m]
            lines.append(f"| {m} | {fmt(r['cr_C5'], 3)} | {fmt(r['mcs_C5'], 3)} | "
                         f"{fmt(r['det_AP']) if 'det_AP' in r else 'not run'} | "
                         f"{fmt(r['control_cr_C5'], 6)} | {fmt(r['control_mcs_C5'], 6)} |")
    lines += ["", "The control is a network whose receptive field is one pixel, probed by the same code on the "
              "same images at the same settings: 1 means the probe measures the network, not its RoIAlign sampling."]
    if settings.get("probes"):
        lines += ["", "Probe settings (OpenImage-MINI objects): " + "; ".join(settings["probes"]) + "."]
    return lines


def _detection_section(results: dict, settings: dict) -> list[str]:
    lines = ["", "## Detection fine-tuning (like Table 1; COCOeval bbox)", ""]
    if not any("det_AP" in r for r in results.values()):
        return lines + ["Not run: no model is in `detect_models` (params.yaml); list models there to fine-tune them."]
    lines += ["| model | AP | AP50 | AP75 |", "|---|---|---|---|"]
    for m in results:
        if "det_AP" in results[m]:
            lines.append(f"| {m} | " + " | ".join(fmt(results[m][f"det_{k}"]) for k in TABLE1) + " |")
    return lines + (["", "Detection: " + "; ".join(settings["detect"]) + "."] if settings.get("detect") else [])


def _layers_section(results: dict, plots: list[str]) -> list[str]:
    lines = ["", "## Probes per layer (Figures 3b, 4b)", "",
             "| model | " + " | ".join(f"CR {x}" for x in LAYERS) + " | " + " | ".join(f"MCS {x}" for x in LAYERS) + " |",
             "|---|" + "---|" * 8]
    for m, r in results.items():
        lines.append(f"| {m} | " + " | ".join(fmt(r[f'cr_{x}'], 3) for x in LAYERS) + " | "
                     + " | ".join(fmt(r[f'mcs_{x}'], 3) for x in LAYERS) + " |")
    first, r = next(iter(results)), next(iter(results.values()))
    lines.append(f"| one-pixel control ({first} runs) | " + " | ".join(fmt(r[f'control_cr_{x}'], 3) for x in LAYERS)
                 + " | " + " | ".join(fmt(r[f'control_mcs_{x}'], 3) for x in LAYERS) + " |")
    for p in plots:
        lines += ["", f"![{Path(p).stem}]({Path(p).name})"]
    return lines


def _stats_section(stats: dict | None) -> list[str]:
    if not stats:
        return []
    lines = ["", "## OpenImage-MINI (like Table 2)", "", "| | #Imgs | #Obj/Img | #Cat/Img | #Cat |", "|---|---|---|---|---|"]
    for name, key in (("OpenImage-MINI", "openimage_mini"), ("COCO", "coco")):
        s = stats[key]
        lines.append(f"| {name} | {s['num_images']} | {s['objects_per_image']:.2f} | "
                     f"{s['categories_per_image']:.2f} | {s['num_categories']} |")
    return lines


PROPOSAL_FIGURES = ("mean", "median", "p05", "p95", "min", "max")


def proposals_figures(summary: dict) -> dict:
    """What the report keeps of the proposals stage's summary.json: images, boxes, boxes per image
    (PROPOSAL_FIGURES), the fallback paths taken and the failures per reason."""
    return {"images": summary["images"], "boxes": summary["boxes"],
            "boxes_per_image": {k: summary["boxes_per_image"][k] for k in PROPOSAL_FIGURES},
            "paths": summary["paths"], "failures": summary["failures"]}


def _proposals_section(proposals: dict | None) -> list[str]:
    if not proposals:
        return []
    b = proposals["boxes_per_image"]
    return ["", "## Selective-search proposals", "",
            f"{proposals['images']} images, {proposals['boxes']} boxes: per image mean {b['mean']:.1f}, median "
            f"{b['median']:g}, 5-95% {b['p05']:g}-{b['p95']:g}, min {b['min']}, max {b['max']}; paths "
            + ", ".join(f"{k} {v}" for k, v in proposals["paths"].items())
            + "; failures " + (", ".join(f"{k} {v}" for k, v in proposals["failures"].items()) or "none") + "."]


def _curves_section(curves: list[str]) -> list[str]:
    if not curves:
        return []
    return (["", "## Curves (mean line, min-max band over the seeds)", ""]
            + [f"![{Path(c).stem}]({Path(c).name})" for c in curves]
            + ["", "O-KNN: step 0 is the randomly initialised backbone of each seed, the intermediate steps the "
               "snapshots of seed 0, the last step every seed's final backbone. Loss: dotted, each method's "
               "chance level (ln(M + 1) per InfoNCE term, M each query's negatives)."])


def render(results: dict, orderings: list[dict], stats: dict | None, seeds: list[int], plots: list[str],
           protocol: list[str] = (), problems: list[str] = (), curves: list[str] = (),
           settings: dict | None = None, proposals: dict | None = None) -> str:
    """results.md: the tables of the paper on the embedded data, in the paper's order."""
    settings = settings or {}
    if len(seeds) == 1:
        head = f"1 seed: {seeds[0]}; one run per model, so no spread"
    else:
        head = f"{len(seeds)} seeds: {', '.join(map(str, seeds))}; mean ± std"
    lines = [f"# Results on the embedded data ({head})", ""]
    lines += _oknn_section(results, protocol)
    lines += _ablation_section(results, settings)
    lines += _detection_section(results, settings)
    lines += _layers_section(results, plots)
    lines += _stats_section(stats)
    lines += _proposals_section(proposals)
    lines += health_section(results, problems)
    lines += _curves_section(curves)
    lines += orderings_section(orderings, runs=len(seeds))
    return "\n".join(lines) + "\n"


def make_report(reports: Path, models: list[str], seeds: list[int], out: Path, dataset_stats: Path | None,
                detect_models: list[str] | None = None, runs: Path | None = None,
                proposals_summary: Path | None = None) -> dict:
    """Write OUT.md, OUT.json and the figures (module docstring); `runs` holds the pre-training
    runs' dvclive logs (no loss plot without it); `proposals_summary` the proposals stage's
    summary.json (no proposals section without it). Returns the JSON document."""
    results = collect(reports, models, seeds, detect_models)
    orderings = paper_orderings(results, models)
    stats = json.loads(dataset_stats.read_text()) if dataset_stats and dataset_stats.is_file() else None
    proposals = proposals_figures(json.loads(proposals_summary.read_text())) if proposals_summary else None
    plots = plot_means(results, out)
    control = [abs(v - 1.0) for r in results.values() for k, ms in r.items() if k.startswith("control_")
               for v in ms["values"]]
    protocol = oknn_protocol(reports, models, seeds)
    problems = health_problems(reports, models, seeds)
    settings = probe_and_detect_settings(reports, models, seeds, detect_models)
    curves = plot_curves(reports, runs, models, seeds, out)
    pngs = [str(f) for f in curves.pop("files") if f.suffix == ".png"]
    doc = {"seeds": seeds, "models": models, "results": results, "orderings": orderings, "oknn_protocol": protocol,
           "pretrain_problems": problems, "run_settings": settings,
           # the O-KNN curve's points and both legends (the loss means are in OUT_loss.csv)
           "curves": {"oknn": curves["oknn"], "legend": curves["legend"]},
           "figures": [Path(f).name for f in [*plots, *sorted(pngs)]],
           "probe_control_max_deviation": max(control),
           "dataset": {k: stats[k] for k in ("openimage_mini", "coco")} if stats else None,
           "proposals": proposals}
    write_text(out.with_suffix(".json"), json.dumps(doc, indent=2) + "\n")
    write_metrics(out.with_name(out.name + "_metrics"), headline(results))
    write_text(out.with_suffix(".md"), render(results, orderings, stats, seeds, [str(p) for p in plots], protocol,
                                              problems, sorted(pngs), settings, proposals))
    return doc


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m eval.report", __doc__)
    p.add_argument("--reports", type=Path, default=Path("reports/models"), help="folder of <model>/seed<s>/ results")
    p.add_argument("--runs", type=Path, help="folder of <method>/seed<s>/ holding the training curves: the "
                   "trainlog stage's train/ copies (reports/models) or the runs' dvclive logs (runs); "
                   "no loss plot without it")
    p.add_argument("--params", type=Path, help="params.yaml: its top-level `models` and `seeds` lists")
    p.add_argument("--models", nargs="+", help="instead of params: the models to tabulate")
    p.add_argument("--seeds", nargs="+", type=int, help="instead of params: the seeds to average over")
    p.add_argument("--detect-models", nargs="*", help="instead of params: the models fine-tuned for detection "
                   "(default: params' `detect_models`, else every model with a detect/metrics.json)")
    p.add_argument("--dataset-stats", type=Path, help="stats.json of the sample stage (Table 2)")
    p.add_argument("--proposals-summary", type=Path, help="summary.json of the proposals stage (boxes per image)")
    p.add_argument("--out", type=Path, default=Path("reports/results"), help="writes OUT.md, OUT.json, OUT_*.png/csv and oknn_curve.png/csv beside them")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    models, seeds = args.models, args.seeds
    if args.params:
        import yaml

        doc = yaml.safe_load(args.params.read_text()) or {}
        models, seeds = models or doc.get("models"), seeds or doc.get("seeds")
        if args.detect_models is None:
            args.detect_models = doc.get("detect_models")
    if not models or not seeds:
        p.error("give --models and --seeds, or --params with top-level `models` and `seeds` lists")
    doc = make_report(args.reports, list(models), [int(s) for s in seeds], args.out, args.dataset_stats,
                      args.detect_models, args.runs, args.proposals_summary)
    for o in doc["orderings"]:
        log.info("%s%s: %s", "holds" if o["holds"] else "fails", " (clear)" if o["clear"] else "", o["claim"])
    log.info("wrote %s, %s (means: %s_metrics/) and %d figures (%s) for %d models x %d seeds", args.out.with_suffix(".md"),
             args.out.with_suffix(".json"), args.out, len(doc["figures"]), ", ".join(doc["figures"]), len(models), len(seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
