"""`pretrain.bf16_cpu`: bf16 autocast on the CPU only where the CPU has a bf16 path (`auto`), as set
otherwise. On an AVX2-only CPU oneDNN emulates bf16 and a step ran 24-36x slower than in float32
(benchmarks/results/cpu_bf16.json): `auto` must choose float32 there, and the run must say which."""
from __future__ import annotations

import pytest
import torch
import yaml

import train.trainer as trainer
from pipeline.params import ParamsError
from train.pretrain import load_config, method_config, train
from tests.train.test_pretrain import write_params


@pytest.mark.parametrize("setting, onednn, want", [
    ("auto", True, True), ("auto", False, False),
    (True, False, True), (True, True, True), (False, True, False), (False, False, False)])
def test_auto_follows_the_cpu_and_an_explicit_setting_wins(setting, onednn, want, monkeypatch):
    monkeypatch.setattr(trainer, "onednn_bf16", lambda: onednn)
    assert trainer.cpu_bf16(setting) is want


def test_params_take_auto_true_false_and_name_the_key_otherwise(tmp_path):
    for value in ("auto", True, False):
        assert load_config(write_params(tmp_path / "p.yaml", bf16_cpu=value)).bf16_cpu == value
    doc = yaml.safe_load((tmp_path / "p.yaml").read_text())
    doc["pretrain"]["bf16_cpu"] = "yes"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ParamsError, match="pretrain.bf16_cpu"):
        load_config(tmp_path / "p.yaml")


@pytest.mark.parametrize("onednn", [False, True])
def test_the_step_runs_under_what_auto_chose_and_the_summary_says_it(onednn, shards, tmp_path, monkeypatch):
    params = write_params(tmp_path / "p.yaml", max_steps=1, bf16_cpu="auto")
    monkeypatch.setattr(trainer, "onednn_bf16", lambda: onednn)
    seen = []
    real = torch.autocast

    def spy(device_type, *a, **kw):
        seen.append((device_type, kw.get("enabled", True)))
        return real(device_type, *a, **kw)
    monkeypatch.setattr(torch, "autocast", spy)
    summary = train(shards, tmp_path / "run", "mocov2", load_config(params), method_config("mocov2", params),
                    device="cpu", progress=False)
    assert summary["precision"] == ("bf16" if onednn else "float32")
    assert ("cpu", onednn) in seen and ("cpu", not onednn) not in seen, seen
