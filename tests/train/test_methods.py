"""Every method trains on tiny images on the CPU: its loss falls on a fixed batch."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from train.methods import DEFAULTS, METHODS, build, prepare
from train.stream import LoaderConfig, make_stream, read_index
from train.views import ViewConfig


@pytest.fixture(scope="module")
def fixed_batch(shards):
    urls, total = read_index(shards)
    cfg = LoaderConfig(batch_size=4, workers=0, views=ViewConfig(size=64, small_size=32, num_proposals=2))
    return prepare(next(iter(make_stream(urls, cfg, seed=0, total_samples=total))), torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_falls_on_a_fixed_batch(name, fixed_batch, monkeypatch):
    torch.manual_seed(0)
    cfg = replace(DEFAULTS[name], queue_size=256, proj_hidden=64, pred_hidden=64 if DEFAULTS[name].pred_hidden else 0)
    method = build(name, "resnet18", cfg, roi_size=7)   # 14 in real runs; 7 keeps the test quick
    if hasattr(method, "queue"):
        # On one repeated batch the queue would fill with copies of the positives themselves (a
        # queue assumes fresh batches); keep its random negatives so the loss measures learning.
        monkeypatch.setattr(method.queue, "enqueue", lambda keys: None)
    opt = torch.optim.SGD(method.trainable(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(20):
        loss, terms = method(fixed_batch, g, step / 20)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert torch.isfinite(loss)
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
    if name == "d3ssl":
        assert set(terms) == {"loss_dc", "loss_dp"}
    if name == "d3ssl_dc":
        assert set(terms) == {"loss_dc"}
    assert method.teacher is not method.student


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="valid: \\['d3ssl', 'd3ssl_dc', 'mocov2', 'soco'\\]"):
        build("simclr", "resnet18")


def test_d3ssl_without_composition_cannot_have_l_dp():
    from train.augment import AugmentConfig
    with pytest.raises(ValueError, match="L_dp needs the composition"):
        build("d3ssl", "resnet18", replace(DEFAULTS["d3ssl"], augment=AugmentConfig(compose=False)))
