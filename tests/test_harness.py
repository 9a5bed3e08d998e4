"""The experiment harness's summary over seeds: the figures the issue's 5-point test is judged on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.harness import seed_summary
from tests.train.conftest import shards  # noqa: F401  (the tiny shards fixture)


def fake_run(root: Path, name: str, method: str, seed: int, init: float, end: float, steps: int = 450,
             overrides: tuple[str, ...] = ("pretrain.base_lr=0.48",)) -> Path:
    d = root / name
    d.mkdir()
    points = [{"step": 0, "top1": init}, {"step": steps // 2, "top1": (init + end) / 2}, {"step": steps, "top1": end}]
    (d / "curve.json").write_text(json.dumps({"name": name, "method": method, "steps": steps, "seed": seed,
                                              "overrides": list(overrides), "points": points}))
    return d


@pytest.fixture
def results(tmp_path: Path) -> Path:
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"results": {"random": {"oknn_top1": {"mean": 12.0, "std": 0.5, "n": 3}}}}))
    return p


def test_groups_by_setting_and_judges_the_gap_over_random(tmp_path, results):
    runs = [fake_run(tmp_path, f"a{s}", "d3ssl", s, 12.0, e) for s, e in enumerate((18.0, 19.0, 20.0))]
    runs += [fake_run(tmp_path, f"b{s}", "soco", s, 12.0, e) for s, e in enumerate((13.0, 20.0, 17.0))]
    runs += [fake_run(tmp_path, "c0", "d3ssl", 0, 12.0, 30.0, steps=240)]            # another schedule
    got = {(g["method"], g["steps"]): g for g in seed_summary(runs, results)["settings"]}
    a, b, c = got["d3ssl", 450], got["soco", 450], got["d3ssl", 240]
    assert (a["n"], a["mean"], a["std"], a["gap_over_random"]) == (3, 19.0, 1.0, 7.0)
    assert a["mean_gain_over_init"] == 7.0 and [r["seed"] for r in a["runs"]] == [0, 1, 2]
    assert a["five_points_clear"]
    # mean 16.67, 4.67 above random: under 5 points
    assert b["n"] == 3 and not b["five_points_clear"]
    # one seed is never a clear claim, however large its gap
    assert c["n"] == 1 and c["gap_over_random"] == 18.0 and not c["five_points_clear"]


def test_a_gap_inside_the_spreads_is_not_clear(tmp_path, results):
    runs = [fake_run(tmp_path, f"a{s}", "d3ssl", s, 12.0, e) for s, e in enumerate((12.5, 17.0, 23.5))]
    g = seed_summary(runs, results)["settings"][0]
    assert g["gap_over_random"] > 5 and g["std"] + 0.5 > g["gap_over_random"] and not g["five_points_clear"]


def test_three_runs_of_one_seed_are_not_three_seeds(tmp_path, results):
    runs = [fake_run(tmp_path, f"a{i}", "d3ssl", 0, 12.0, 20.0 + i / 10) for i in range(3)]
    g = seed_summary(runs, results)["settings"][0]
    assert g["n"] == 3 and g["seeds"] == 1 and g["gap_over_random"] > 5 and not g["five_points_clear"]


def test_by_step_says_where_the_gap_appears_inside_a_schedule(tmp_path, results):
    # fake_run's midpoint (step 225) is halfway between init and end: 15.5, 16.0, 16.5 there
    runs = [fake_run(tmp_path, f"a{s}", "d3ssl", s, 12.0, e) for s, e in enumerate((19.0, 20.0, 21.0))]
    g = seed_summary(runs, results)["settings"][0]
    steps = {b["step"]: b for b in g["by_step"]}
    assert sorted(steps) == [0, 225, 450]
    assert (steps[225]["mean"], steps[225]["std"]) == (16.0, 0.5) and not steps[225]["five_points_clear"]
    assert steps[450]["five_points_clear"] and steps[450]["mean"] == g["mean"]
    assert g["first_clear_step"] == 450
    assert "by_step" not in g["runs"][0]                                # the per-run rows stay as they were


def test_by_step_uses_only_steps_every_run_evaluated(tmp_path, results):
    runs = [fake_run(tmp_path, f"a{s}", "d3ssl", s, 12.0, 30.0) for s in range(3)]
    extra = json.loads((runs[0] / "curve.json").read_text())
    extra["points"].insert(1, {"step": 100, "top1": 29.0})            # evaluated by one seed only
    (runs[0] / "curve.json").write_text(json.dumps(extra))
    g = seed_summary(runs, results)["settings"][0]
    assert [b["step"] for b in g["by_step"]] == [0, 225, 450] and g["first_clear_step"] == 225


def test_without_a_report_random_is_the_runs_own_step_0_one_per_seed(tmp_path):
    # seeds 0, 1, 2 start at 11.0, 13.0, 12.0 (two methods each, the same initialisation per seed)
    inits = {0: 11.0, 1: 13.0, 2: 12.0}
    runs = [fake_run(tmp_path, f"{m}{s}", m, s, inits[s], e) for m in ("d3ssl", "soco")
            for s, e in zip(inits, (19.0, 20.0, 21.0))]
    summary = seed_summary(runs)
    assert {k: summary["random"][k] for k in ("mean", "std", "n")} == {"mean": 12.0, "std": 1.0, "n": 3}
    assert "step 0" in summary["random"]["from"]
    g = summary["settings"][0]
    assert g["gap_over_random"] == 8.0 and g["five_points_clear"]
    # two seeds (on both sides): too few runs for a clear claim
    assert not seed_summary(runs[:2] + runs[3:5])["settings"][0]["five_points_clear"]


def test_a_seed_whose_step_0_differs_between_runs_is_an_error_naming_both(tmp_path):
    runs = [fake_run(tmp_path, "a0", "d3ssl", 0, 12.0, 20.0), fake_run(tmp_path, "b0", "soco", 0, 14.0, 20.0)]
    with pytest.raises(ValueError, match=r"seed 0: step 0 is 12.0 in .*a0 and 14.0 in .*b0"):
        seed_summary(runs)


class _Stop(Exception):
    pass


def test_step_0_is_the_runs_own_seeded_initialisation(shards, tmp_path, monkeypatch):  # noqa: F811
    """The curve of a run with --seed 2 starts at seed 2's network (what the trainer starts from),
    not at O-KNN's "random" backbone, whose seed is the protocol's."""
    import torch

    import benchmarks.harness as harness
    from tests.train.test_resume import tiny_params
    from train.export import random_backbone

    seen = []

    def evaluate(backbone, *_):
        seen.append(torch.load(backbone, weights_only=True))
        raise _Stop

    monkeypatch.setattr(harness, "evaluate", evaluate)
    params = tiny_params(tmp_path / "params.yaml")
    with pytest.raises(_Stop):
        harness.main(["--name", "x", "--method", "d3ssl", "--steps", "2", "--seed", "2", "--params", str(params),
                      "--shards", str(shards), "--out", str(tmp_path / "out")])
    reference = random_backbone("resnet18", 2)
    assert sorted(seen[0]) == sorted(reference) and all(torch.equal(seen[0][k], reference[k]) for k in reference)


def test_the_copied_params_hold_the_epochs_and_seed_that_ran(shards, tmp_path, monkeypatch):  # noqa: F811
    """The run folder's params.yaml is the file the run read, epochs and seed included."""
    import benchmarks.harness as harness
    import train.pretrain
    from tests.train.test_resume import tiny_params

    seen = []

    def fake_train(shards, out, method, cfg, *_, **__):
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(harness, "evaluate", lambda *_: {k: 0.0 for k in ("top1", "top5", "disturbed_top1",
                                                                            "disturbed_top5", "prior_top1")})
    monkeypatch.setattr(train.pretrain, "train", fake_train)
    params = tiny_params(tmp_path / "params.yaml")                 # epochs 3, seed 0, 4 steps per epoch
    with pytest.raises(_Stop):
        harness.main(["--name", "x", "--method", "d3ssl", "--steps", "20", "--seed", "2", "--params", str(params),
                      "--shards", str(shards), "--out", str(tmp_path / "out")])
    written = yaml.safe_load((tmp_path / "out" / "x" / "params.yaml").read_text())["pretrain"]
    assert (written["epochs"], written["seed"]) == (5, 2)           # 20 steps at 4 per epoch; --seed
    assert (seen[0].epochs, seen[0].seed, seen[0].checkpoint_every) == (5, 2, written["checkpoint_every"])
