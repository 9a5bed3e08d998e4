"""The one definition of a "clear" lead (eval.report_checks.clear_gap), as the report's orderings
and the harness's test against random apply it: too few runs, a missing model, a gap at the margin
or inside the spreads are never clear."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eval.report_checks import MIN_RUNS, RANDOM_MARGIN, clear_gap, ordering, orderings_section, paper_orderings


def side(mean: float, std: float = 0.0, n: int = MIN_RUNS) -> dict:
    return {"mean": mean, "std": std, "n": n}


def results(metric: str = "oknn_top1", **sides: dict) -> dict:
    return {m: {metric: s} for m, s in sides.items()}


def test_the_report_requires_three_runs():
    """The documented choice (MIN_RUNS): two runs give a one-degree-of-freedom spread."""
    assert MIN_RUNS == 3 and RANDOM_MARGIN == 5.0


def test_a_single_seed_orders_but_is_never_clear():
    """The audited case: one seed with means 12.2 > 12.1 > 12.0 has no spread; it holds, not clear."""
    r = results(d3ssl=side(12.2, n=1), soco=side(12.1, n=1), random=side(12.0, n=1))
    o = ordering(r, "oknn_top1", ["d3ssl", "soco", "random"], True, "c")
    assert o["holds"] and not o["clear"]
    # however large the gap
    assert not clear_gap(side(90.0, n=1), side(10.0, n=1))
    assert not clear_gap(side(90.0, n=MIN_RUNS), side(10.0, n=1))
    assert not clear_gap(side(90.0, n=1), side(10.0, n=MIN_RUNS))


@pytest.mark.parametrize("n, clear", [(0, False), (1, False), (MIN_RUNS - 1, False), (MIN_RUNS, True), (10, True)])
def test_the_runs_each_side_needs(n, clear):
    assert clear_gap(side(20.0, 0.5, n), side(10.0, 0.5, MIN_RUNS)) is clear
    assert clear_gap(side(20.0, 0.5, MIN_RUNS), side(10.0, 0.5, n)) is clear


def test_a_side_without_a_run_count_is_not_clear():
    assert not clear_gap({"mean": 20.0, "std": 0.0}, side(10.0))


def test_a_missing_model_is_never_clear():
    assert not clear_gap(None, side(10.0)) and not clear_gap(side(10.0), None) and not clear_gap(None, None)
    o = ordering(results(d3ssl=side(90.0), random=side(5.0)), "oknn_top1", ["d3ssl", "soco", "random"], True, "c")
    assert o["missing"] == ["soco"] and not o["holds"] and not o["clear"]
    # the metric missing for a measured model is the same as the model missing
    r = {"d3ssl": {"oknn_top1": side(90.0)}, "random": {"other": side(5.0)}}
    assert not ordering(r, "oknn_top1", ["d3ssl", "random"], True, "c")["clear"]


@pytest.mark.parametrize("gap, clear", [(4.99, False), (5.0, False), (5.01, True), (7.0, True)])
def test_the_margin_is_beaten_not_reached(gap, clear):
    """gap > margin (the report's rule; the harness used gap >= 5 before the two were one)."""
    assert clear_gap(side(12.0 + gap, 0.001), side(12.0, 0.001), margin=RANDOM_MARGIN) is clear


@pytest.mark.parametrize("gap, clear", [(1.5, False), (1.5000001, True), (1.4, False)])
def test_the_gap_must_exceed_both_spreads_together(gap, clear):
    """stds 1.0 and 0.5: the gap must be above 1.5, above the margin (0.1) too."""
    assert clear_gap(side(10.0 + gap, 1.0), side(10.0, 0.5), margin=0.1) is clear


def test_the_gap_must_beat_the_margin_and_the_spreads_whichever_is_larger():
    assert clear_gap(side(17.0, 1.5), side(10.0, 1.0), margin=RANDOM_MARGIN)       # 7 above 5 and above 2.5
    assert not clear_gap(side(16.0, 0.1), side(10.0, 0.1), margin=8.0)             # above the spreads, under the margin
    assert not clear_gap(side(16.0, 4.0), side(10.0, 3.0), margin=RANDOM_MARGIN)   # above the margin, inside the spreads


def test_lower_is_better_and_nan():
    assert clear_gap(side(1.0, 0.01), side(2.0, 0.01), higher_is_better=False)
    assert not clear_gap(side(2.0, 0.01), side(1.0, 0.01), higher_is_better=False)
    assert not clear_gap(side(math.nan), side(1.0)) and not clear_gap(side(5.0, math.nan), side(1.0))


def test_the_report_checks_each_ssl_method_against_random_by_the_margin():
    r = {m: {"oknn_top1": side(v, 0.1)} for m, v in (("random", 10.0), ("d3ssl", 15.0), ("soco", 15.5))}
    claims = {o["claim"]: o for o in paper_orderings(r, ["random", "d3ssl", "soco"])}
    assert not claims["O-KNN top-1: d3ssl > random by 5 points"]["holds"]        # exactly 5: not beaten
    o = claims["O-KNN top-1: soco > random by 5 points"]
    assert o["holds"] and o["clear"]


def _curve(root: Path, name: str, seed: int, end: float) -> Path:
    d = root / name
    d.mkdir()
    points = [{"step": 0, "top1": 12.0}, {"step": 450, "top1": end}]
    (d / "curve.json").write_text(json.dumps({"name": name, "method": "d3ssl", "steps": 450, "seed": seed,
                                              "overrides": [], "points": points}))
    return d


def _floor(tmp_path: Path, n: int | None = 3) -> Path:
    row = {"mean": 12.0, "std": 0.0}
    if n is not None:
        row["n"] = n
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"results": {"random": {"oknn_top1": row}}}))
    return p


@pytest.mark.parametrize("ends, clear", [((17.0, 17.0, 17.0), False),          # exactly 5 points: not beaten
                                         ((17.1, 17.1, 17.1), True),
                                         ((30.0, 30.0), False)])               # two seeds: too few
def test_the_harness_judges_with_the_reports_rule(tmp_path, ends, clear):
    from benchmarks.harness import seed_summary

    runs = [_curve(tmp_path, f"a{s}", s, e) for s, e in enumerate(ends)]
    g = seed_summary(runs, _floor(tmp_path))["settings"][0]
    assert g["five_points_clear"] is clear
    expected = clear_gap({"mean": g["mean"], "std": g["std"], "n": g["seeds"]}, side(12.0, 0.0, 3), margin=RANDOM_MARGIN)
    assert g["five_points_clear"] is expected


def test_the_harness_needs_enough_runs_on_the_random_side_too(tmp_path):
    from benchmarks.harness import seed_summary

    runs = [_curve(tmp_path, f"a{s}", s, 30.0) for s in range(3)]
    assert not seed_summary(runs, _floor(tmp_path, n=1))["settings"][0]["five_points_clear"]


def test_the_orderings_table_says_why_nothing_is_clear_with_too_few_seeds():
    """Two seeds (the embedded default) can never make a claim clear; the table says so beside its
    "no"s, and says nothing of the kind once there are enough runs."""
    results = {"supervised": {"oknn_top1": side(30.0, 1.0, 2)}, "d3ssl": {"oknn_top1": side(12.0, 0.5, 2)}}
    claims = [ordering(results, "oknn_top1", ["supervised", "d3ssl"], True, "ceiling")]
    assert claims[0]["holds"] and not claims[0]["clear"]
    few = "\n".join(orderings_section(claims, runs=2))
    assert f"at least {MIN_RUNS} runs a side" in few and "this report has 2 per model" in few
    assert "runs a side" not in "\n".join(orderings_section(claims, runs=MIN_RUNS))
