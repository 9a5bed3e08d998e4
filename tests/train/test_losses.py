"""Losses against hand computations; the queue and the momentum update."""
from __future__ import annotations

import math

import pytest
import torch

from train.losses import Queue, byol_loss, info_nce
from train.methods import MethodConfig, ema_momentum
from train.model import RegionEncoder, momentum_copy, momentum_update


def test_info_nce_by_hand():
    q = torch.tensor([[3.0, 4.0]])          # normalised: (0.6, 0.8)
    k = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    T = 0.5
    pos = 0.6 / T
    negs = [0.8 / T, -0.6 / T]
    expect = -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(n) for n in negs)))
    assert float(info_nce(q, k, neg, T)) == pytest.approx(expect, rel=1e-6)
    # the mean over rows
    q2 = torch.cat([q, torch.tensor([[0.0, 1.0]])])
    k2 = torch.cat([k, torch.tensor([[0.0, 1.0]])])
    second = -math.log(math.exp(1 / T) / (math.exp(1 / T) + math.exp(1 / T) + math.exp(0)))
    assert float(info_nce(q2, k2, neg, T)) == pytest.approx((expect + second) / 2, rel=1e-6)


def test_byol_loss_by_hand():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 3.0], [2.0, 2.0]])
    assert float(byol_loss(p, z)) == pytest.approx(((2 - 0) + (2 - 2)) / 2)


def test_queue_is_a_ring_of_normalised_keys():
    queue = Queue(5, 2)
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    queue.enqueue(a)
    assert int(queue.ptr) == 3 and int(queue.filled) == 3 and queue.fill_ratio() == 0.6
    assert torch.allclose(queue.features[:3], torch.nn.functional.normalize(a, dim=1))
    b = torch.tensor([[0.0, -1.0], [-1.0, 0.0], [3.0, 4.0], [0.0, 5.0]])
    queue.enqueue(b)                        # wraps: slots 3, 4, then 0, 1
    assert int(queue.ptr) == 2 and int(queue.filled) == 5
    nb = torch.nn.functional.normalize(b, dim=1)
    assert torch.allclose(queue.features[3:], nb[:2]) and torch.allclose(queue.features[:2], nb[2:])
    assert torch.allclose(queue.features[2], torch.nn.functional.normalize(a[2:3], dim=1)[0])
    queue.enqueue(torch.randn(12, 2))       # more than the queue holds: the newest 5 stay
    assert int(queue.filled) == 5
    assert torch.allclose(queue.negatives().norm(dim=1), torch.ones(5))


def test_momentum_update_is_the_ema():
    student = RegionEncoder("resnet18", proj_dim=8)
    teacher = momentum_copy(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    momentum_update(student, teacher, 0.9)
    for t0, t1, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s)


def test_cosine_momentum_rises_to_one():
    cfg = MethodConfig(momentum=0.99, momentum_schedule="cosine")
    assert ema_momentum(cfg, 0.0) == pytest.approx(0.99)
    assert ema_momentum(cfg, 1.0) == pytest.approx(1.0)
    assert ema_momentum(MethodConfig(momentum=0.999), 0.7) == 0.999


def test_health_detectors_tell_chance_and_collapse():
    import math

    from train.losses import batch_top1, chance_loss, key_spread, queue_top1
    from train.runlog import health
    g = torch.Generator().manual_seed(0)
    q = torch.randn(64, 16, generator=g)
    negatives = torch.randn(256, 16, generator=g)
    assert float(queue_top1(q, q, negatives)) == 1.0                  # the positive is itself
    assert float(queue_top1(q, torch.randn(64, 16, generator=g), negatives)) < 0.1
    assert float(batch_top1(q, q)) == 1.0
    assert float(key_spread(torch.randn(512, 16, generator=g))) > 0.9
    assert float(key_spread(torch.ones(512, 16) + 1e-4 * torch.randn(512, 16, generator=g))) < 0.01
    assert chance_loss(1024) == math.log(1025)
    # a random query against a queue scores the chance level: what `health` flags
    from train.losses import info_nce
    loss = float(info_nce(q, torch.randn(64, 16, generator=g), torch.randn(1024, 16, generator=g), 1e3))
    assert abs(loss - chance_loss(1024)) < 0.01
    bad = health([{"loss": 27.6, "chance": 4 * math.log(1025), "top1": 0.001, "key_std": 0.02}] * 5)
    assert len(bad["problems"]) == 2 and "chance" in bad["problems"][0] and "collapsed" in bad["problems"][1]
    good = health([{"loss": 8.0, "chance": 4 * math.log(1025), "top1": 0.4, "key_std": 0.7}] * 5)
    assert good["problems"] == [] and good["loss_over_chance"] < 0.5
    assert health([{"loss": 0.3, "chance": 0.0, "top1": 0.5, "key_std": float("nan")}])["problems"] == []


def test_an_empty_queue_offers_only_real_keys_as_negatives():
    from train.losses import Queue
    q = Queue(8, 4, init="empty")
    assert q.negatives().shape == (0, 4)
    keys = torch.eye(4)[:3]
    q.enqueue(keys)
    assert torch.equal(q.negatives(), keys)
    q.enqueue(torch.eye(4).repeat(2, 1))
    assert q.negatives().shape == (8, 4) and q.fill_ratio() == 1.0
    assert Queue(8, 4).negatives().shape == (8, 4)                   # MoCo's random start
    # no negatives yet: the loss is 0 and the positive ranks first
    from train.losses import info_nce, queue_top1
    z = torch.randn(5, 4)
    assert float(info_nce(z, z, torch.zeros(0, 4), 0.2)) == 0.0 and float(queue_top1(z, z, torch.zeros(0, 4))) == 1.0


def test_queued_keys_of_the_querys_own_image_are_not_negatives():
    """A miniature whose epoch is shorter than the queue brings an image's keys back into the queue
    while the image is queried again. Those keys (here an exact copy of query 0) are left out of
    that query's negatives: the loss, the rank-1 accuracy and the chance level equal those over
    the queue without them, and the stored image ids move with their keys, FIFO."""
    from train.losses import Queue, chance_loss, info_nce, queue_top1
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    k = q + 0.3 * torch.randn(3, 8, generator=g)
    keys = torch.randn(6, 8, generator=g)
    keys[0] = q[0]                                       # query 0's image came back: a false negative
    queue = Queue(6, 8)
    queue.enqueue(keys, torch.tensor([10, 11, 10, 12, 13, 11]))
    same = queue.same_image(torch.tensor([10, 11, 99]))
    assert same.tolist() == [[True, False, True, False, False, False],
                             [False, True, False, False, False, True],
                             [False] * 6]
    neg, T = queue.negatives(), 0.2
    by_row = [info_nce(q[i:i + 1], k[i:i + 1], neg[~same[i]], T) for i in range(3)]
    assert float(info_nce(q, k, neg, T, same)) == pytest.approx(float(sum(by_row) / 3), rel=1e-6)
    assert float(info_nce(q, k, neg, T, same)) < float(info_nce(q, k, neg, T))
    assert float(queue_top1(q[:1], k[:1], neg)) == 0.0              # the copy outranks the positive ...
    assert float(queue_top1(q[:1], k[:1], neg, same[:1])) == 1.0    # ... unless it is left out
    assert chance_loss(6, same) == pytest.approx((2 * math.log(5) + math.log(7)) / 3)
    queue.enqueue(torch.randn(4, 8, generator=g), torch.tensor([20, 21, 22, 23]))   # wraps: slots 0-3
    assert queue.image_ids.tolist() == [20, 21, 22, 23, 13, 11]
    assert Queue(6, 8, exclude_same_image=False).same_image(torch.tensor([10])) is None


def test_a_queue_saved_before_image_ids_existed_loads_with_no_image():
    """`--resume` across the change that added `image_ids`: the old state loads, its keys with id -1
    (no image), so they stay negatives of every query."""
    from train.losses import Queue
    old = Queue(4, 3).state_dict()
    del old["image_ids"]
    q = Queue(4, 3)
    q.enqueue(torch.randn(4, 3), torch.tensor([1, 2, 3, 4]))
    q.load_state_dict(old)
    assert q.image_ids.tolist() == [-1] * 4 and torch.equal(q.features, old["features"])
    assert not q.same_image(torch.tensor([1, 2])).any()
