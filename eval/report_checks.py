"""The report's checks on the results: the paper's orderings and the pre-training runs' health.

- `clear_gap` is the one definition of a "clear" lead of one model over another, shared by the
  report's orderings (`ordering`, `paper_orderings`) and the experiment harness's test against
  random (`benchmarks.harness.seed_summary`), so that the two can never disagree on the same numbers.
- `health_problems` / `health_section`: the runs that ended at chance or collapsed, as a warning.

Nothing here imports torch: the harness's `--seed-summary` and the report's `--help` stay fast.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

MIN_RUNS = 3
"""Runs a side needs before its lead can be clear. Three, not two: with two runs the sample
standard deviation has one degree of freedom, and two runs that land close together by chance
(a std under a third of the true one happens about one time in four) would make a gap look larger
than the spread; with three that happens about one time in ten. Three is also the issue's own
test for the harness ("at least 3 distinct seeds") and the pipeline's `seeds`, so the report and
the harness judge the committed numbers alike."""

RANDOM_MARGIN = 5.0
"""Points of O-KNN top-1 an SSL method must beat `random` by (the issue's "5 points")."""


def clear_gap(ahead: Mapping | None, behind: Mapping | None, higher_is_better: bool = True,
              margin: float = 0.0) -> bool:
    """Is `ahead` clearly ahead of `behind`? Each side is {"mean", "std", "n"} over its runs (the
    report's `mean_std`; `n` the runs, for the harness the distinct seeds), None when the model was
    not measured. Clear: both sides have at least `MIN_RUNS` runs, and the gap is larger than
    `margin` and than the two standard deviations together.

    Why each condition: a missing side or a side without a recorded run count cannot be judged (never
    clear); one run has no spread, so any positive gap would pass the spread test; a gap exactly at
    the margin has not beaten it. A NaN anywhere fails every comparison, so it is never clear either."""
    if ahead is None or behind is None:
        return False
    if min(int(ahead.get("n") or 0), int(behind.get("n") or 0)) < MIN_RUNS:
        return False
    gap = ahead["mean"] - behind["mean"] if higher_is_better else behind["mean"] - ahead["mean"]
    return bool(gap > margin and gap > ahead["std"] + behind["std"])


def ordering(results: dict, metric: str, chain: list[str], higher_is_better: bool, what: str,
             margin: float = 0.0) -> dict:
    """Does `chain[0]` beat `chain[1]` beat ... on `metric` (by more than `margin`)? Holds: every
    model of the chain was measured and every step goes the claimed way; clear: it holds and every
    step is a `clear_gap` (enough runs on both sides, a gap above the margin and the two standard
    deviations together). A model without results makes the claim neither hold nor clear."""
    present = [m for m in chain if m in results and metric in results[m]]
    means = [results[m][metric]["mean"] for m in present]
    sds = [results[m][metric]["std"] for m in present]
    pairs = list(zip(range(len(present) - 1), range(1, len(present))))
    gaps = [(means[i] - means[j]) if higher_is_better else (means[j] - means[i]) for i, j in pairs]
    holds = len(present) == len(chain) and len(chain) > 1 and all(g > margin for g in gaps)
    side = {m: results[m][metric] for m in present}
    clear = holds and all(clear_gap(side.get(a), side.get(b), higher_is_better, margin)
                          for a, b in zip(chain, chain[1:]))
    return {"claim": what, "metric": metric, "models": present, "means": means, "stds": sds,
            "missing": [m for m in chain if m not in present], "holds": bool(holds), "clear": bool(clear)}


def paper_orderings(results: dict, models: list[str]) -> list[dict]:
    """The claims the report checks, in its order: the paper's orderings, each SSL method against
    random by `RANDOM_MARGIN`, the supervised ceiling against each SSL method, and detection AP
    against random for every model fine-tuned."""
    out = [
        ordering(results, "oknn_top1", ["d3ssl", "soco", "random"], True, "O-KNN top-1: d3ssl > soco > random"),
        ordering(results, "oknn_disturbed_top1", ["d3ssl", "soco", "random"], True,
                 "disturbed O-KNN top-1: d3ssl > soco > random"),
        ordering(results, "cr_C5", ["d3ssl", "d3ssl_dc"], False, "CR at C5: d3ssl < d3ssl_dc"),
        ordering(results, "mcs_C5", ["d3ssl", "d3ssl_dc"], True, "MCS at C5: d3ssl > d3ssl_dc"),
    ]
    ssl = [m for m in models if m not in ("random", "supervised")]
    for m in ssl:
        out.append(ordering(results, "oknn_top1", [m, "random"], True,
                            f"O-KNN top-1: {m} > random by 5 points", margin=RANDOM_MARGIN))
    if "supervised" in models:
        for m in ssl:
            out.append(ordering(results, "oknn_top1", ["supervised", m], True, f"O-KNN top-1: supervised ceiling > {m}"))
    for m in models:
        if m != "random" and "det_AP" in results[m]:
            out.append(ordering(results, "det_AP", [m, "random"], True, f"detection AP: {m} > random"))
    return out


def orderings_section(orderings: list[dict], runs: int | None = None) -> list[str]:
    """results.md's table of the claims; with `runs` (seeds per model) under `MIN_RUNS`, a line
    saying that no claim can be clear, so that a "no" under a large gap is not read as a verdict."""
    lines = ["", "## The paper's orderings", "", "| claim | holds | clear (gap > spreads) | means |", "|---|---|---|---|"]
    for o in orderings:
        means = ", ".join(f"{m} {v:.3f}" for m, v in zip(o["models"], o["means"]))
        lines.append(f"| {o['claim']} | {'yes' if o['holds'] else 'no'} | {'yes' if o['clear'] else 'no'} | {means} |")
    if runs is not None and runs < MIN_RUNS:
        lines += ["", f"Clear needs at least {MIN_RUNS} runs a side (with fewer, the sample standard deviation is "
                      f"too often far below the true spread, and one run has none); this report has {runs} per "
                      f"model, so no claim is clear, whatever its gap. Add seeds (`seeds` in params.yaml) to judge "
                      f"the claims."]
    return lines


def fmt(ms: dict, digits: int = 2) -> str:
    """`mean ± std` of a `mean_std` dict, as every table of the report prints it; the value alone for
    one run, which has no spread (a printed `± 0.00` would read as a measured one)."""
    if ms.get("n", 0) == 1:
        return f"{ms['mean']:.{digits}f}"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def load(path: Path) -> dict:
    """A result file; a missing one names the stage to run rather than a bare FileNotFoundError."""
    if not path.is_file():
        raise FileNotFoundError(f"missing result {path}: run its stage first (dvc repro)")
    return json.loads(path.read_text())


def health_problems(reports: Path, models: list[str], seeds: list[int]) -> list[str]:
    """Every problem the runs' `pretrain.json` health records, as `<model> seed <s>: <problem>`."""
    out = []
    for model in models:
        for s in seeds:
            path = reports / model / f"seed{s}" / "pretrain.json"
            if path.is_file():
                out += [f"{model} seed {s}: {p}" for p in (load(path).get("health") or {}).get("problems", [])]
    return out


def health_section(results: dict, problems: list[str]) -> list[str]:
    """The pre-training runs' health at their end (train.runlog.health), and every problem."""
    trained = [m for m, r in results.items() if "health_problems" in r]
    if not trained:
        return []
    lines = ["", "## Pre-training health (last steps of each run)", "",
             "| model | loss / chance | rank-1 accuracy | key spread | runs with a problem |", "|---|---|---|---|---|"]
    for m in trained:
        r = results[m]
        cell = lambda k, d=3: fmt(r[k], d) if k in r else "–"  # noqa: E731
        lines.append(f"| {m} | {cell('health_loss_over_chance')} | {cell('health_top1')} | {cell('health_key_std')} | "
                     f"{sum(v > 0 for v in r['health_problems']['values'])} of {r['health_problems']['n']} |")
    lines += ["", "Loss / chance: the InfoNCE loss over its chance level, the mean over queries of ln(M + 1) per "
              "term with M the negatives left to the query; 1 = the positive is not told from the negatives. Key "
              "spread: 1 for keys spread over the sphere, 0 for collapsed keys."]
    if problems:
        lines += ["", "**WARNING: unhealthy pre-training runs** (their numbers above measure a failed run):", ""]
        lines += [f"- {p}" for p in problems]
    return lines
