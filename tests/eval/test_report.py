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
    probes["settings"] = {"object_size": 96, "pool_size": 3, "canvas": 192, "pairs": 32, "objects": 32}
    (d / "probes.json").write_text(json.dumps(probes))
    (d / "detect" / "metrics.json").write_text(json.dumps({"bbox": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}, "preset": "tiny",
                                                           "schedule": {"max_iter": 40}, "train_images": 30, "val_images": 8}))


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
    assert "Probe settings (OpenImage-MINI objects): objects of 96 px, RoIAlign 3x3" in md
    assert "Detection: preset `tiny` (40 iterations), 30 train / 8 val images." in md


def test_the_proposals_stage_summary_reaches_the_report(tmp_path):
    reports = tmp_path / "models"
    for m in MODELS:
        for s in (0, 1):
            _write(reports, m, s)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({
        "images": 420, "images_with_boxes": 419, "boxes": 32340,
        "boxes_per_image": {"mean": 77.0, "min": 1, "p05": 30.0, "p25": 55.0, "median": 72.0, "p75": 95.0,
                            "p95": 140.0, "max": 210, "histogram": {}},
        "paths": {"filtered": 410, "relaxed": 6, "whole_image": 3, "failed": 1}, "failures": {"truncated": 1},
        "fingerprint": "x", "settings": {}, "opencv": "4"}))
    doc = make_report(reports, list(MODELS), [0, 1], tmp_path / "results", None, proposals_summary=summary)
    assert doc["proposals"]["boxes_per_image"] == {"mean": 77.0, "median": 72.0, "p05": 30.0, "p95": 140.0,
                                                   "min": 1, "max": 210}
    md = (tmp_path / "results.md").read_text()
    assert ("420 images, 32340 boxes: per image mean 77.0, median 72, 5-95% 30-140, min 1, max 210; paths "
            "filtered 410, relaxed 6, whole_image 3, failed 1; failures truncated 1.") in md
    make_report(reports, list(MODELS), [0, 1], tmp_path / "bare", None)
    assert "Selective-search proposals" not in (tmp_path / "bare.md").read_text()


def test_a_probe_result_without_its_control_is_refused(tmp_path):
    reports = tmp_path / "models"
    for m in MODELS:
        _write(reports, m, 0, control=m != "d3ssl")
    with pytest.raises(ValueError, match=r"d3ssl/seed0/probes\.json has no one-pixel 'control'"):
        make_report(reports, list(MODELS), [0], tmp_path / "results", None)


def _results(n: int = 3, **means_stds):
    """{model: {"oknn_top1": mean_std}} over `n` runs each (3: enough for a clear claim)."""
    return {m: {"oknn_top1": {"mean": m_s[0], "std": m_s[1], "n": n}} for m, m_s in means_stds.items()}


def test_ordering_holds_and_clear():
    from eval.report_checks import ordering
    r = _results(d3ssl=(20.0, 1.0), soco=(15.0, 1.0), random=(5.0, 2.0))
    o = ordering(r, "oknn_top1", ["d3ssl", "soco", "random"], True, "c")
    assert o["holds"] and o["clear"]
    # a gap inside the spreads: holds, not clear
    o = ordering(_results(d3ssl=(16.0, 1.0), soco=(15.0, 1.0), random=(5.0, 2.0)), "oknn_top1",
                 ["d3ssl", "soco", "random"], True, "c")
    assert o["holds"] and not o["clear"]
    # the wrong way round: neither
    o = ordering(_results(d3ssl=(4.0, 0.1), soco=(15.0, 1.0), random=(5.0, 2.0)), "oknn_top1",
                 ["d3ssl", "soco", "random"], True, "c")
    assert not o["holds"] and not o["clear"]
    # lower is better
    assert ordering(_results(a=(1.0, 0.01), b=(2.0, 0.01)), "oknn_top1", ["a", "b"], False, "c")["clear"]
    # a margin: 10 points ahead is not 12
    assert not ordering(_results(a=(15.0, 0.1), b=(5.0, 0.1)), "oknn_top1", ["a", "b"], True, "c", margin=12.0)["holds"]


def test_a_missing_model_never_makes_a_claim_hold_or_clear():
    from eval.report_checks import ordering
    o = ordering(_results(d3ssl=(90.0, 0.0), random=(5.0, 0.0)), "oknn_top1", ["d3ssl", "soco", "random"], True, "c")
    assert o["missing"] == ["soco"] and not o["holds"] and not o["clear"]
    o = ordering(_results(d3ssl=(90.0, 0.0)), "oknn_top1", ["d3ssl", "random"], True, "c")
    assert not o["holds"] and not o["clear"]


def test_report_warns_about_unhealthy_runs_and_draws_the_curve(tmp_path):
    reports = tmp_path / "models"
    for m in ("random", "d3ssl", "d3ssl_dc", "supervised"):
        for s in (0, 1):
            _write(reports, m, s)
    bad = {"steps": 40, "health": {"loss_over_chance": 0.99, "top1": 0.01, "key_std": 0.5,
                                   "problems": ["ends at chance: loss 27.6 against 27.7"]}}
    good = {"steps": 40, "health": {"loss_over_chance": 0.4, "top1": 0.5, "key_std": 0.6, "problems": []}}
    for s in (0, 1):
        (reports / "d3ssl" / f"seed{s}" / "pretrain.json").write_text(json.dumps(bad if s == 1 else good))
        (reports / "d3ssl_dc" / f"seed{s}" / "pretrain.json").write_text(json.dumps(good))
    (reports / "d3ssl" / "seed0" / "oknn_curve.json").write_text(json.dumps({"points": [{"step": 20, "top1": 10.5}]}))
    doc = make_report(reports, ["random", "d3ssl", "d3ssl_dc", "supervised"], [0, 1], tmp_path / "results", None)
    assert doc["pretrain_problems"] == ["d3ssl seed 1: ends at chance: loss 27.6 against 27.7"]
    # step 0: random of each seed (10, 11); step 20: the snapshot of seed 0; step 40: both finals
    c = doc["curves"]["oknn"]["d3ssl"]
    assert c["step"] == [0, 20, 40] and c["mean"] == [10.5, 10.5, 10.5] and c["n"] == [2, 1, 2]
    assert c["min"] == [10.0, 10.5, 10.0] and c["max"] == [11.0, 10.5, 11.0]
    assert (tmp_path / "oknn_curve.png").is_file()
    md = (tmp_path / "results.md").read_text()
    assert "WARNING: unhealthy pre-training runs" in md and "| d3ssl | 0.695 ± 0.417 | 0.255 ± 0.346 | 0.550 ± 0.071 | 1 of 2 |" in md
    claims = {o["claim"]: o for o in doc["orderings"]}
    assert not claims["O-KNN top-1: d3ssl > random by 5 points"]["holds"]          # equal means
    assert "O-KNN top-1: supervised ceiling > d3ssl" in claims


def test_detection_is_read_for_detect_models_only(tmp_path):
    """A detect/metrics.json that an earlier run left for a model no longer fine-tuned must not
    reach the tables; one missing for a listed model is an error."""
    reports = tmp_path / "models"
    for m in MODELS:
        for s in (0, 1):
            _write(reports, m, s)
    stale = reports / "d3ssl_dc" / "seed0" / "detect" / "metrics.json"
    stale.write_text(json.dumps({"bbox": {"AP": 9.0, "AP50": 9.0, "AP75": 9.0}, "preset": "old",
                                 "schedule": {"max_iter": 7}, "train_images": 1, "val_images": 1}))
    doc = make_report(reports, list(MODELS), [0, 1], tmp_path / "results", None, detect_models=["random", "d3ssl"])
    assert "det_AP" in doc["results"]["d3ssl"] and "det_AP" not in doc["results"]["d3ssl_dc"]
    assert "preset `old`" not in (tmp_path / "results.md").read_text()
    (reports / "d3ssl" / "seed1" / "detect" / "metrics.json").unlink()
    with pytest.raises(ValueError, match=r"d3ssl/seed1/detect/metrics\.json is missing"):
        make_report(reports, list(MODELS), [0, 1], tmp_path / "results", None, detect_models=["d3ssl"])



def test_no_detect_models_says_detection_was_not_run(tmp_path):
    """The embedded default fine-tunes no model (`detect_models: []`): the report says so instead of
    an empty Table 1, reads no leftover detect/metrics.json and claims no detection ordering."""
    reports = tmp_path / "models"
    for m in MODELS:
        for s in (0, 1):
            _write(reports, m, s)
    doc = make_report(reports, list(MODELS), [0, 1], tmp_path / "results", None, detect_models=[])
    assert not any("det_AP" in r for r in doc["results"].values())
    assert not any("detection" in o["claim"] for o in doc["orderings"])
    md = (tmp_path / "results.md").read_text()
    section = md.split("## Detection fine-tuning", 1)[1].split("##", 1)[0]
    assert "Not run: no model is in `detect_models`" in section and "| model | AP |" not in section


def test_the_metrics_file_holds_the_headline_means_per_model(tmp_path):
    """`dvc metrics show` prints results_metrics/<model>.json: one row per model, one mean per headline
    metric (O-KNN 10 and 11 over the seeds: 10.5), detection only where it ran; a model no longer
    reported loses its file."""
    reports = tmp_path / "models"
    for m in MODELS:
        for s in (0, 1):
            _write(reports, m, s)
    (tmp_path / "results_metrics").mkdir()
    (tmp_path / "results_metrics" / "gone.json").write_text("{}")
    make_report(reports, list(MODELS), [0, 1], tmp_path / "results", None, detect_models=["d3ssl"])
    got = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results_metrics").iterdir()}
    assert set(got) == set(MODELS)
    assert got["d3ssl"] == {"oknn_top1": 10.5, "oknn_top5": 40.0, "oknn_disturbed_top1": 8.0,
                            "cr_C5": round(1.0 + 0.01 * LAYERS.index("C5"), 3),
                            "mcs_C5": round(1.0 - 0.01 * LAYERS.index("C5"), 3), "det_AP": 1.0}
    assert "det_AP" not in got["random"] and got["random"]["oknn_top1"] == 10.5


METHODS = ("d3ssl", "d3ssl_dc", "soco", "mocov2")


def _runs(tmp_path, methods=METHODS, seeds=(0, 1), steps=5):
    """Result files and dvclive training logs of every method and seed (soco: no chance level)."""
    reports, runs = tmp_path / "models", tmp_path / "runs"
    for m in ("random", "supervised", *methods):
        for s in seeds:
            _write(reports, m, s)
    for i, m in enumerate(methods):
        for s in seeds:
            (reports / m / f"seed{s}" / "pretrain.json").write_text(json.dumps({"steps": steps}))
            log = runs / m / f"seed{s}" / "dvclive" / "plots" / "metrics" / "train"
            log.mkdir(parents=True)
            (log / "loss.tsv").write_text("step\tloss\n" + "".join(f"{t}\t{10 * i + t + s}\n" for t in range(steps)))
            if m != "soco":
                (log / "loss_chance.tsv").write_text("step\tloss_chance\n" + "".join(f"{t}\t{10 * i + 9}\n" for t in range(steps)))
    return reports, runs


def test_curves_overlay_every_method_on_one_plot_each(tmp_path):
    reports, runs = _runs(tmp_path)
    models = ["random", "supervised", *METHODS]
    doc = make_report(reports, models, [0, 1], tmp_path / "results", None, runs=runs)
    for name, stem in (("loss", "results_loss"), ("oknn", "oknn_curve")):   # the curve under the name issue 13 gave it
        png = tmp_path / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{stem}]({stem}.png)" in (tmp_path / "results.md").read_text()
        head = (tmp_path / f"{stem}.csv").read_text().splitlines()[0]
        assert head == "step,d3ssl,d3ssl_dc,soco,mocov2"          # dvc.yaml's plots overlay these columns
        assert [e.split(" ")[0] for e in doc["curves"]["legend"][name]][:4] == list(METHODS)
    assert doc["figures"] == ["results_cr.png", "results_mcs.png", "oknn_curve.png", "results_loss.png"]
    # the loss means over the two seeds: 10 * i + t + 0.5 at step t
    rows = (tmp_path / "results_loss.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[3] == "2,2.5,12.5,22.5,32.5"
    assert any(e.startswith("supervised") for e in doc["curves"]["legend"]["oknn"])


def test_curves_are_byte_reproducible(tmp_path):
    reports, runs = _runs(tmp_path, methods=("d3ssl", "soco"), seeds=(0,))
    first = {}
    for out in ("a", "b"):
        (tmp_path / out).mkdir()
        make_report(reports, ["random", "d3ssl", "soco"], [0], tmp_path / out / "results", None, runs=runs)
        first[out] = {f.name: f.read_bytes() for f in sorted((tmp_path / out).glob("*.png"))}
    assert len(first["a"]) == 4 and first["a"] == first["b"]
    assert b"Software" not in first["a"]["results_loss.png"]


def test_a_missing_training_log_names_the_file(tmp_path):
    reports, runs = _runs(tmp_path)
    (runs / "mocov2" / "seed1" / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"mocov2/seed1/dvclive/plots/metrics/train/loss\.tsv: run its pretrain"):
        make_report(reports, ["random", *METHODS], [0, 1], tmp_path / "results", None, runs=runs)


def test_report_help_shows_defaults(capsys):
    from eval.report import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--runs" in text and "(default: reports/models)" in text and "--log-level" in text


def test_the_legend_says_where_a_band_has_fewer_runs():
    """The curve stage snapshots seed 0 only: the legend must not claim n=3 for those points."""
    from eval.report_plots import n_label

    assert n_label({"step": [0, 84, 168], "n": [3, 1, 3]}) == "n=3; 1 at step 84"
    assert n_label({"step": [0, 168], "n": [3, 3]}) == "n=3"
    assert n_label({"step": [0, 10, 20, 30, 40], "n": [2, 1, 1, 1, 1]}) == "n=2; 1 at steps 10, 20, 30, ..."


def test_one_seed_prints_values_without_a_spread(tmp_path):
    """One run has no spread: the tables print the value alone, not `± 0.00` as if one was measured."""
    reports = tmp_path / "models"
    for m in MODELS:
        _write(reports, m, 0)
    doc = make_report(reports, list(MODELS), [0], tmp_path / "results", None)
    assert doc["results"]["d3ssl"]["oknn_top1"]["n"] == 1
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Results on the embedded data (1 seed: 0; one run per model, so no spread)")
    assert "| d3ssl | 1.030 | 0.970 | 1.00 |" in md and "±" not in md
