"""Optimisers and the learning-rate schedule against values worked out by hand."""
from __future__ import annotations

import pytest
import torch

from train.optim import LARS, learning_rate, make_optimizer, param_groups


def layer(weight: list[float], bias: float) -> torch.nn.Linear:
    m = torch.nn.Linear(len(weight), 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([weight]))
        m.bias.fill_(bias)
    return m


def step_with(opt: torch.optim.Optimizer, m: torch.nn.Linear, grad_w: list[float], grad_b: float) -> None:
    m.weight.grad = torch.tensor([grad_w])
    m.bias.grad = torch.tensor([grad_b])
    opt.step()


def test_lars_scales_weights_by_the_trust_ratio_and_leaves_biases_plain():
    """w = (3, 4), |w| = 5; gradient (0.6, 0.8), weight decay 0.1, eta 0.001, lr 1, momentum 0.9.

    Step 1: d = g + 0.1 w = (0.9, 1.2), |d| = 1.5, trust = 0.001 * 5 / 1.5 = 1/300,
            update (0.003, 0.004): w = (2.997, 3.996).
    Step 2: d is parallel to w again, so trust * d = 0.001 * |w| * g / |g| = 0.001 * 4.995 * (0.6, 0.8)
            = (0.002997, 0.003996); momentum 0.9 * (0.003, 0.004) + that = (0.005697, 0.007596):
            w = (2.991303, 3.988404).
    The bias (1-D) gets neither weight decay nor the trust ratio: b = 1 - 0.5, then 0.5 - (0.9 * 0.5 + 0.5).
    """
    m = layer([3.0, 4.0], 1.0)
    opt = make_optimizer(list(m.parameters()), "lars", lr=1.0, weight_decay=0.1, momentum=0.9)
    assert isinstance(opt, LARS)
    step_with(opt, m, [0.6, 0.8], 0.5)
    assert m.weight.detach().tolist()[0] == pytest.approx([2.997, 3.996], abs=1e-6)
    assert m.bias.item() == pytest.approx(0.5)
    step_with(opt, m, [0.6, 0.8], 0.5)
    assert m.weight.detach().tolist()[0] == pytest.approx([2.991303, 3.988404], abs=1e-6)
    assert m.bias.item() == pytest.approx(0.5 - 0.95)


def test_lars_adds_weight_decay_before_the_trust_ratio():
    """w = (3, 4), g = (0.8, -0.6) at right angles to w, weight decay 0.1, eta 0.001, lr 1:
    d = g + 0.1 w = (1.1, -0.2), |d| = sqrt(1.25), trust = 0.005 / sqrt(1.25),
    w - trust * d = (3 - 0.0055 / sqrt(1.25), 4 + 0.001 / sqrt(1.25)). (Without the decay the step
    would be 0.005 * g = (0.004, -0.003).)"""
    m = layer([3.0, 4.0], 0.0)
    opt = LARS([m.weight], lr=1.0, momentum=0.9, weight_decay=0.1, eta=0.001)
    m.weight.grad = torch.tensor([[0.8, -0.6]])
    opt.step()
    r = 1.25 ** 0.5
    assert m.weight.detach().tolist()[0] == pytest.approx([3 - 0.0055 / r, 4 + 0.001 / r], abs=1e-6)


def test_lars_on_a_zero_weight_takes_a_plain_sgd_step():
    m = layer([0.0, 0.0], 0.0)
    opt = LARS([m.weight], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.001)
    m.weight.grad = torch.tensor([[2.0, -4.0]])
    opt.step()                                      # |w| = 0: trust 1, update lr * g
    assert m.weight.detach().tolist()[0] == pytest.approx([-1.0, 2.0])


def test_sgd_decays_weights_only():
    m = layer([3.0, 4.0], 1.0)
    groups = param_groups(list(m.parameters()), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert groups[0]["params"][0] is m.weight and groups[1]["params"][0] is m.bias
    opt = make_optimizer(list(m.parameters()), "sgd", lr=0.5, weight_decay=0.1, momentum=0.9)
    step_with(opt, m, [0.0, 0.0], 0.0)              # no gradient: only the decay moves the weight
    assert m.weight.detach().tolist()[0] == pytest.approx([3 - 0.5 * 0.3, 4 - 0.5 * 0.4])
    assert m.bias.item() == 1.0
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; valid: \['sgd', 'lars'\]"):
        make_optimizer(list(m.parameters()), "adam", 0.1, 0.0, 0.9)


def test_schedule_warms_up_linearly_then_decays_on_a_cosine():
    # 4 warm-up steps to 0.8, then a cosine over the 8 steps left (step 8 is half-way: 0.4)
    got = [learning_rate(s, 12, 4, 0.8) for s in range(14)]
    assert got[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])
    assert got[6] == pytest.approx(0.8 * (1 + 2 ** -0.5) / 2)       # a quarter through: cos(pi/4)
    assert got[8] == pytest.approx(0.4)                             # half-way: cos(pi/2) = 0
    assert got[10] == pytest.approx(0.8 * (1 - 2 ** -0.5) / 2)      # three quarters: cos(3pi/4)
    assert got[12] == pytest.approx(0.0, abs=1e-12) and got[13] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(got[3:], got[4:]))             # never rises after the peak
    # without warm-up the first step is the peak
    assert learning_rate(0, 10, 0, 0.3) == pytest.approx(0.3)
    assert learning_rate(5, 10, 0, 0.3) == pytest.approx(0.15)
