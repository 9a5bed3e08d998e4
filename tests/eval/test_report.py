"""The report: the O-KNN protocol and the probes' one-pixel control reach the tables and the JSON."""
from __future__ import annotations

import json

import pytest

from eval.report import LAYERS, make_report

MODELS = ("random", "d3ssl_dc", "d3ssl")


def _write(reports, model, seed, control=True):
    d = reports / model / f"seed{seed}"
    (d / "detect").mkdir(parents=True)
    oknn = {"top1": 10.0 + seed, "top5": 40.0, "disturbed_top1": 8.0, "disturbed_top5": 35.0, "prior_top1": 5.0,
            "classes": 16, "feature": "c5_roialign7", "k": 20, "image_size": {"min_size": 320, "max_size": 533},
            "object_c5_cells": {"queries": {"p10": 1.1, "median": 1.8, "p90": 3.0}}}
    probes = {"cr": {n: 1.0 + 0.01 * i for i, n in enumerate(LAYERS)}, "mcs": {n: 1.0 - 0.01 * i for i, n in enumerate(LAYERS)}}
    if control:
        probes["control"] = {"cr": {n: 1.0 for n in LAYERS}, "mcs": {n: 1.0 - 2e-7 * seed for n in LAYERS}}
    (d / "oknn.json").write_text(json.dumps(oknn))
    (d / "probes.json").write_text(json.dumps(probes))
    (d / "detect" / "metrics.json").write_text(json.dumps({"bbox": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}}))


def test_report_shows_the_control_and_the_oknn_protocol(tmp_path):
    reports = tmp_path / "models"
    for m in MODELS:
        for s in (0, 1):
            _write(reports, m, s)
    doc = make_report(reports, list(MODELS), [0, 1], tmp_path / "results", None)
    r = doc["results"]["d3ssl"]
    assert r["control_cr_C5"]["mean"] == 1.0 and r["control_mcs_C2"]["values"] == [1.0, 1.0 - 2e-7]
    assert doc["probe_control_max_deviation"] == pytest.approx(2e-7)
    assert len(doc["oknn_protocol"]) == 1 and "c5_roialign7" in doc["oknn_protocol"][0]
    md = (tmp_path / "results.md").read_text()
    assert "| control CR | control MCS |" in md and "| d3ssl | 1.030 ± 0.000 | 0.970 ± 0.000 |" in md
    assert "| one-pixel control (random runs) | 1.000 ± 0.000 |" in md
    assert "`c5_roialign7`, shorter side 320 px (longer at most 533), k = 20" in md and "1.8 C5 cells" in md
    assert json.loads((tmp_path / "results.json").read_text())["probe_control_max_deviation"] == pytest.approx(2e-7)


def test_a_probe_result_without_its_control_is_refused(tmp_path):
    reports = tmp_path / "models"
    for m in MODELS:
        _write(reports, m, 0, control=m != "d3ssl")
    with pytest.raises(ValueError, match=r"d3ssl/seed0/probes\.json has no one-pixel 'control'"):
        make_report(reports, list(MODELS), [0], tmp_path / "results", None)
