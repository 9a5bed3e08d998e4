"""The report's figures: what a reader compares across methods, each on one plot.

- `OUT_loss.png`: the pre-training loss against step, one line per method (mean over seeds) with
  the min-max band over seeds, and each method's chance level (the mean over queries of ln(M + 1)
  per InfoNCE term, M the negatives left to the query; dotted, same colour, for the InfoNCE
  methods): methods with more loss terms have a higher chance level, so a loss is read against
  its own.
- `oknn_curve.png` (beside OUT, under this fixed name: the learning curve a reader looks for first):
  O-KNN top-1 against pre-training step, one line per method (mean over the
  seeds measured at that step, min-max band), with the supervised ceiling and the random floor as
  horizontal lines. Step 0 is the randomly initialised backbone of the same seed (`random`), the
  intermediate steps are the snapshots of the curve stage (seed 0), the last step every seed's
  final backbone (`oknn.json`).
- `OUT_loss.csv`, `oknn_curve.csv`: the plotted means, a column per method against `step`, for
  `dvc plots show` (dvc.yaml's top-level plots overlay the methods from them).
- `OUT_cr.png`, `OUT_mcs.png`: the probes over layers, one line per model (mean, std bars).

Every PNG is byte-reproducible: Agg backend, fixed size and dpi, no software tag in the metadata.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.files import atomic_path, write_text
from train.resnet_layout import LAYERS

REFERENCES = ("random", "supervised")   # models that are not pre-training methods
DPI = 120
OKNN_CURVE = "oknn_curve"   # the learning curve's file name (.png, .csv) beside OUT, whatever OUT is


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing result {path}: run its stage first (dvc repro)")
    return json.loads(path.read_text())


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display; byte-reproducible PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """PNG bytes that depend on the figure only (no software tag, no time)."""
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def style_layer_axes(ax, metric: str, title: str, legend_fontsize: int) -> None:
    """The look of a probe metric over layers (CR or MCS): a dashed grey line at 1 (no effect),
    the axis labels, `title` and the legend; then the figure's tight layout."""
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel(metric.upper())
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_fontsize)
    ax.figure.tight_layout()


def methods_of(reports: Path, models: list[str], seeds: list[int]) -> list[str]:
    """The pre-trained models: those with a `pretrain.json` for some seed (not random/supervised)."""
    return [m for m in models if m not in REFERENCES
            and any((reports / m / f"seed{s}" / "pretrain.json").is_file() for s in seeds)]


def read_tsv(path: Path, column: str) -> dict[int, float]:
    """step -> value of a dvclive series file (`step<TAB>column` rows)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing training log {path}: run its pretrain stage first (dvc repro)")
    rows = list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t"))
    if rows and (column not in rows[0] or "step" not in rows[0]):
        raise ValueError(f"{path} has columns {list(rows[0])}, expected 'step' and '{column}'")
    return {int(r["step"]): float(r[column]) for r in rows}


def loss_series(runs: Path, methods: list[str], seeds: list[int], column: str = "loss",
                required: bool = True) -> dict:
    """method -> step -> [value of every seed] from `runs`/<method>/seed<s>/: the trainlog stage's
    copies (train/<column>.tsv, eval.trainlog) or else the run's own dvclive log
    (dvclive/plots/metrics/train/<column>.tsv); a missing file is an error when `required`, else
    skipped (a BYOL loss has no chance level)."""
    out: dict[str, dict[int, list[float]]] = {}
    for m in methods:
        for s in seeds:
            f = runs / m / f"seed{s}" / "train" / f"{column}.tsv"
            if not f.is_file():
                f = runs / m / f"seed{s}" / "dvclive" / "plots" / "metrics" / "train" / f"{column}.tsv"
            if not required and not f.is_file():
                continue
            for step, v in read_tsv(f, column).items():
                out.setdefault(m, {}).setdefault(step, []).append(v)
    return out


def oknn_series(reports: Path, methods: list[str], seeds: list[int]) -> dict:
    """method -> step -> [O-KNN top-1 of every seed measured at that step]."""
    out: dict[str, dict[int, list[float]]] = {}
    for m in methods:
        steps = out.setdefault(m, {})
        for s in seeds:
            d = reports / m / f"seed{s}"
            if not (d / "pretrain.json").is_file():
                continue
            start = reports / "random" / f"seed{s}" / "oknn.json"
            if start.is_file():
                steps.setdefault(0, []).append(float(_json(start)["top1"]))
            if (d / "oknn_curve.json").is_file():
                for p in _json(d / "oknn_curve.json")["points"]:
                    steps.setdefault(int(p["step"]), []).append(float(p["top1"]))
            steps.setdefault(int(_json(d / "pretrain.json")["steps"]), []).append(float(_json(d / "oknn.json")["top1"]))
    return out


def band(series: dict[int, list[float]]) -> dict[str, list]:
    """Steps in order with the mean, min, max and count of the values at each."""
    steps = sorted(series)
    return {"step": steps, "mean": [sum(series[s]) / len(series[s]) for s in steps],
            "min": [min(series[s]) for s in steps], "max": [max(series[s]) for s in steps],
            "n": [len(series[s]) for s in steps]}


def n_label(band: dict) -> str:
    """Runs behind a band's points: "n=3", or "n=3; 1 at step 84" where a step had fewer (the curve
    stage snapshots seed 0 only), so a reader knows where the band is no band."""
    top = max(band["n"])
    fewer: dict[int, list[int]] = {}
    for step, n in zip(band["step"], band["n"]):
        if n < top:
            fewer.setdefault(n, []).append(step)
    parts = [f"{n} at step{'s' if len(st) > 1 else ''} {', '.join(map(str, st[:3]))}{', ...' if len(st) > 3 else ''}"
             for n, st in sorted(fewer.items())]
    return "; ".join([f"n={top}", *parts])


def overlay(bands: dict[str, dict], path: Path, ylabel: str, title: str,
            dotted: dict[str, dict] | None = None, hlines: dict[str, float] | None = None) -> list[str]:
    """One plot: a mean line and a min-max band per method; `dotted` adds a dotted line per method
    in its colour (e.g. its chance level), `hlines` grey horizontal references. Returns the
    legend's entries, as drawn."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for i, (m, b) in enumerate(bands.items()):
        colour = f"C{i}"
        ax.plot(b["step"], b["mean"], color=colour, lw=1.4, marker="o" if len(b["step"]) < 20 else None,
                label=f"{m} ({n_label(b)})")
        ax.fill_between(b["step"], b["min"], b["max"], color=colour, alpha=0.2, lw=0)
        if dotted and m in dotted:
            ax.plot(dotted[m]["step"], dotted[m]["mean"], color=colour, ls=":", lw=1)
    for (name, y), style in zip((hlines or {}).items(), ("--", ":", "-.")):
        ax.axhline(y, color="grey", ls=style, lw=1, label=name)
    ax.set_xlabel("pre-training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    drawn = ax.get_legend_handles_labels()[1]
    fig.tight_layout()
    _save(fig, path)
    return drawn


def write_means_csv(bands: dict[str, dict], path: Path) -> None:
    """`step,<method>,...` with each method's mean (empty where it was not measured)."""
    steps = sorted({s for b in bands.values() for s in b["step"]})
    lookup = {m: dict(zip(b["step"], b["mean"])) for m, b in bands.items()}
    lines = [",".join(["step", *bands])]
    lines += [",".join([str(s), *(repr(lookup[m][s]) if s in lookup[m] else "" for m in bands)]) for s in steps]
    write_text(path, "\n".join(lines) + "\n")


def plot_curves(reports: Path, runs: Path | None, models: list[str], seeds: list[int], out: Path) -> dict:
    """oknn_curve.png/.csv beside OUT and (with `runs`) OUT_loss.png/.csv; returns the plotted bands as
    {"oknn": {method: band}, "loss": {method: band}}, the legends as drawn under "legend" and the
    written files under "files"."""
    methods = methods_of(reports, models, seeds)
    found: dict = {"oknn": {}, "loss": {}, "legend": {}, "files": []}
    if not methods:
        return found
    found["oknn"] = {m: band(v) for m, v in oknn_series(reports, methods, seeds).items() if v}
    refs = {}
    for ref in REFERENCES:
        vals = [float(_json(f)["top1"]) for s in seeds if (f := reports / ref / f"seed{s}" / "oknn.json").is_file()]
        if ref in models and vals:
            refs[f"{ref} (mean of {len(vals)})"] = sum(vals) / len(vals)
    png, table = out.parent / f"{OKNN_CURVE}.png", out.parent / f"{OKNN_CURVE}.csv"
    found["legend"]["oknn"] = overlay(found["oknn"], png, "O-KNN top-1 (%)",
                                      f"O-KNN against step, mean and min-max over seeds {seeds}", hlines=refs)
    write_means_csv(found["oknn"], table)
    found["files"] += [png, table]
    if runs is not None:
        found["loss"] = {m: band(v) for m, v in loss_series(runs, methods, seeds).items()}
        chance = {m: band(v) for m, v in loss_series(runs, methods, seeds, "loss_chance", False).items()}
        png, table = out.parent / f"{out.name}_loss.png", out.parent / f"{out.name}_loss.csv"
        found["legend"]["loss"] = overlay(found["loss"], png, "training loss (dotted: its chance level)",
                                          f"pre-training loss, mean and min-max over seeds {seeds}", dotted=chance)
        write_means_csv(found["loss"], table)
        found["files"] += [png, table]
    return found


def plot_means(results: dict, out: Path) -> list[Path]:
    """CR and MCS over layers, a line per model (mean over seeds, std as error bars)."""
    plt = pyplot()
    paths = []
    for metric, label in (("cr", "coupling rate (1 = no coupling)"),
                          ("mcs", "mean cosine similarity (1 = no positional bias)")):
        fig, ax = plt.subplots(figsize=(4.8, 3.5))
        for m, r in results.items():
            ax.errorbar(LAYERS, [r[f"{metric}_{x}"]["mean"] for x in LAYERS],
                        yerr=[r[f"{metric}_{x}"]["std"] for x in LAYERS], marker="o", capsize=3, label=m)
        style_layer_axes(ax, metric, label, legend_fontsize=7)
        path = out.parent / f"{out.name}_{metric}.png"
        _save(fig, path)
        paths.append(path)
    return paths
