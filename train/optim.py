"""Optimisers and schedules shared by every method (a fair comparison uses one schedule).

- sgd: SGD with momentum 0.9 and weight decay 1e-4, lr = base_lr x batch / 256 (MoCo v2: 0.03).
  Biases and BN parameters get no weight decay (as SoCo/BYOL; MoCo v2 decays every parameter):
  one rule for both optimisers.
- lars: LARS (SoCo's choice: base lr 1.0, weight decay 1e-5), trust ratio on weights only; biases
  and BN parameters get neither weight decay nor adaptation (as SoCo/BYOL).
- learning rate: linear warm-up over `warmup_epochs` (SoCo's; MoCo v2 has none: set it to 0),
  then cosine decay to 0 (MoCo v2, SoCo).
"""
from __future__ import annotations

import math
from typing import Literal

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) for SGD with momentum."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["lars"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    w, gnorm = torch.norm(p), torch.norm(d)
                    trust = torch.where((w > 0) & (gnorm > 0), group["eta"] * w / gnorm, torch.ones_like(w))
                    d = d.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])


def param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Weights (ndim > 1) get weight decay; biases and BN parameters none."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(params: list[torch.nn.Parameter], kind: Literal["sgd", "lars"], lr: float,
                   weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    groups = param_groups(params, weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if kind == "lars":
        groups[1]["lars"] = False
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {kind!r}; valid: ['sgd', 'lars']")


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
