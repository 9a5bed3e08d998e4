"""Every method trains on tiny images on the CPU: its loss falls on a fixed batch."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pipeline import shardset
from train.methods import DEFAULTS, METHODS, build, prepare
from train.stream import LoaderConfig, make_stream
from train.views import ViewConfig


@pytest.fixture(scope="module")
def fixed_batch(shards):
    urls, total = shardset.shards(shards)
    cfg = LoaderConfig(batch_size=4, workers=0, views=ViewConfig(size=64, small_size=32, num_proposals=2))
    return prepare(next(iter(make_stream(urls, cfg, seed=0, total_samples=total))), torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_falls_on_a_fixed_batch(name, fixed_batch, monkeypatch):
    torch.manual_seed(0)
    cfg = replace(DEFAULTS[name], queue_size=256, proj_hidden=64, pred_hidden=64 if DEFAULTS[name].pred_hidden else 0)
    method = build(name, "resnet18", cfg, roi_size=7, bn_splits=2)   # roi 14 in real runs; 7 keeps the test quick
    if hasattr(method, "queue"):
        # On one repeated batch the queue would fill with copies of the positives themselves (a
        # queue assumes fresh batches); keep its random negatives so the loss measures learning.
        monkeypatch.setattr(method.queue, "enqueue", lambda keys, ids=None: None)
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
        assert set(terms) == {"loss_dc", "loss_dp", "shift_px", "loss_dc_chance", "loss_dp_chance", "top1", "key_std"}
    if name == "d3ssl_dc":
        assert set(terms) == {"loss_dc", "loss_dc_chance", "top1", "key_std"}
    assert 0.0 <= float(terms["top1"]) <= 1.0 and float(terms["key_std"]) > 0.1


@pytest.mark.parametrize("name,keys_of", [("d3ssl", "teacher_regions"), ("mocov2", "teacher_images")])
@pytest.mark.parametrize("init", ["empty", "random"])
def test_training_steps_run_the_queue_first_in_first_out(name, keys_of, init, fixed_batch, monkeypatch):
    """Real training steps with the queue on: every step's teacher keys enter the queue (L2-normalised,
    oldest overwritten, the pointer wrapping), and the losses of the next step use exactly the
    queue as it was before that step as their negatives. A reference FIFO kept here says what the
    queue must hold."""
    import train.methods as methods
    torch.manual_seed(0)
    n = int(fixed_batch["valid"].sum()) if name == "d3ssl" else len(fixed_batch["valid"])
    size = 5 * n                                   # 2n keys a step: the pointer wraps in the third step
    # exclusion off: the repeated batch's own keys fill the queue (the exclusion has its own tests)
    cfg = replace(DEFAULTS[name], queue_size=size, proj_hidden=32, queue_init=init, exclude_same_image=False)
    method = build(name, "resnet18", cfg, roi_size=2, bn_splits=2)
    negatives, keys = [], []
    real_nce, real_keys = methods.info_nce, getattr(method, keys_of)
    monkeypatch.setattr(methods, "info_nce",
                        lambda q, k, neg, t, *a: negatives.append(neg.clone()) or real_nce(q, k, neg, t, *a))
    monkeypatch.setattr(method, keys_of, lambda *a: keys.append(real_keys(*a)) or keys[-1])
    ref, ptr, filled = method.queue.features.clone(), 0, 0
    opt = torch.optim.SGD(method.trainable(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        negatives.clear(), keys.clear()
        loss, terms = method(fixed_batch, g, step / 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = ref[:filled] if init == "empty" and filled < size else ref
        assert len(negatives) >= 2 and all(torch.equal(neg, before) for neg in negatives), step
        chance = [v for k, v in terms.items() if k.endswith("_chance")][0]
        assert chance == pytest.approx(2 * math.log(len(before) + 1))
        if init == "empty" and step == 0:
            assert loss.item() == 0.0             # no negatives yet: the positive is the only candidate
        assert len(keys) == 2 and sum(len(k) for k in keys) == 2 * n
        for row in torch.nn.functional.normalize(torch.cat(keys).float(), dim=1):
            ref[ptr], ptr, filled = row, (ptr + 1) % size, min(size, filled + 1)
        assert (int(method.queue.ptr), int(method.queue.filled)) == (ptr, filled), step
        assert torch.allclose(method.queue.features, ref, atol=1e-6), step
    assert ptr == 8 * n % size and filled == size


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="valid: \\['d3ssl', 'd3ssl_dc', 'mocov2', 'soco'\\]"):
        build("simclr", "resnet18")


def test_d3ssl_without_composition_cannot_have_l_dp():
    from train.augment import AugmentConfig
    with pytest.raises(ValueError, match="L_dp needs the composition"):
        build("d3ssl", "resnet18", replace(DEFAULTS["d3ssl"], augment=AugmentConfig(compose=False)))


@pytest.mark.parametrize("name,switch", [("soco", "compose"), ("mocov2", "prc"), ("mocov2", "box_jitter"),
                                         ("mocov2", "rbj")])
def test_a_switch_a_method_cannot_use_is_an_error_that_names_it(name, switch):
    from train.augment import AugmentConfig
    cfg = replace(DEFAULTS[name], augment=replace(DEFAULTS[name].augment, **{switch: True}))
    with pytest.raises(ValueError, match=f"methods.{name}.augment.{switch} is true"):
        build(name, "resnet18", cfg)
    assert AugmentConfig   # imported for the replace above


def _views_seen(method, batch, monkeypatch) -> dict:
    """Run one step and record the images and boxes every student region extraction received."""
    seen = []
    real = method.student.regions

    def spy(x, boxes, valid, groups=1):
        seen.append((x.detach().clone(), boxes.detach().clone()))
        return real(x, boxes, valid, groups)
    monkeypatch.setattr(method.student, "regions", spy)
    method(batch, torch.Generator().manual_seed(0), 0.0)
    return seen


@pytest.mark.parametrize("name,switch", [("d3ssl", "cutout"), ("d3ssl", "box_jitter"), ("soco", "prc"),
                                         ("soco", "prm"), ("soco", "rbj")])
def test_every_augmentation_switch_changes_what_the_method_sees(name, switch, fixed_batch, monkeypatch):
    """Table 5 (D3SSL with SoCo's cutout / box jitter) and Table 6 (SoCo with PRC, PRM, RBJ)."""
    base = replace(DEFAULTS[name], queue_size=64, proj_hidden=32, pred_hidden=32 if DEFAULTS[name].pred_hidden else 0)
    off = replace(base.augment, **{switch: False, f"{switch}_p": 1.0} if switch in ("cutout", "box_jitter", "prc", "prm")
                  else {switch: False})
    on = replace(off, **{switch: True})
    torch.manual_seed(0)
    a = _views_seen(build(name, "resnet18", replace(base, augment=off), roi_size=2), fixed_batch, monkeypatch)
    torch.manual_seed(0)
    b = _views_seen(build(name, "resnet18", replace(base, augment=on), roi_size=2), fixed_batch, monkeypatch)
    images_differ = any(not torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    boxes_differ = any(not torch.equal(p, q) for (_, p), (_, q) in zip(a, b))
    assert (boxes_differ if switch in ("box_jitter", "rbj") else images_differ), switch


def test_d3ssl_logs_the_shift_and_counts_l_dp_over_the_boxes_left_in_x3(fixed_batch):
    torch.manual_seed(0)
    cfg = replace(DEFAULTS["d3ssl"], queue_size=64, proj_hidden=32)
    _, terms = build("d3ssl", "resnet18", cfg, roi_size=2, bn_splits=2)(fixed_batch, torch.Generator().manual_seed(0), 0.0)
    assert float(terms["shift_px"]) >= 0 and {"loss_dc", "loss_dp", "shift_px"} <= set(terms)


@pytest.mark.parametrize("kept", ["half", "none"])
def test_l_dp_counts_for_the_share_of_proposals_left_in_x3(kept, fixed_batch, monkeypatch):
    """Eq. 10 averages over all proposals: L_dp, defined on the boxes that stay in x3, is weighted by
    their share; with none left it is 0 (and x3 is not encoded)."""
    import train.methods as methods
    real_views = methods.region_views

    def views(batch, cfg, g):
        v = real_views(batch, cfg, g)
        v["valid3"] = batch["valid"].clone()
        if kept == "none":
            v["valid3"][:] = False
        else:
            v["valid3"][::2] = False                       # every other image loses its boxes
        return v
    rows = []
    monkeypatch.setattr(methods, "region_views", views)
    monkeypatch.setattr(methods, "info_nce", lambda q, k, neg, t, *a: rows.append(len(q)) or torch.tensor(1.0))
    cfg = replace(DEFAULTS["d3ssl"], queue_size=64, proj_hidden=32)
    _, terms = build("d3ssl", "resnet18", cfg, roi_size=2)(fixed_batch, torch.Generator().manual_seed(0), 0.0)
    valid = fixed_batch["valid"]
    share = float(valid[1::2].sum() / valid.sum()) if kept == "half" else 0.0
    assert float(terms["loss_dc"]) == 2.0
    assert float(terms["loss_dp"]) == pytest.approx(2.0 * share)
    assert rows[2:] == ([int(valid[1::2].sum())] * 2 if kept == "half" else [])


@pytest.mark.parametrize("name,switch,fn,calls", [
    ("d3ssl", "cutout", "apply_cutout", 2),          # x1-hat and x2s-hat
    ("d3ssl", "box_jitter", "apply_box_jitter", 5),  # s1, s2s, t1, t2, s3
    ("soco", "prc", "apply_prc", 2), ("soco", "prm", "apply_prm", 2),   # x1 and x2
    ("soco", "rbj", "apply_rbj", 2),                 # the boxes of x1 and x2
])
def test_a_switched_on_augmentation_is_applied_to_every_view(name, switch, fn, calls, fixed_batch, monkeypatch):
    import train.augment as augment
    seen = []
    real = getattr(augment, fn)
    monkeypatch.setattr(augment, fn, lambda *a, **k: seen.append(1) or real(*a, **k))
    base = replace(DEFAULTS[name], queue_size=64, proj_hidden=32, pred_hidden=32 if DEFAULTS[name].pred_hidden else 0)
    if switch == "prm":            # SoCo's cutout fills through apply_prm too
        base = replace(base, augment=replace(base.augment, cutout=False))
    for on in (False, True):
        seen.clear()
        cfg = replace(base, augment=replace(base.augment, **{switch: on}))
        build(name, "resnet18", cfg, roi_size=2)(fixed_batch, torch.Generator().manual_seed(0), 0.0)
        assert len(seen) == (calls if on else 0), (switch, on, len(seen))


@pytest.mark.parametrize("name", ["d3ssl", "mocov2"])
def test_a_queue_of_the_images_own_keys_offers_no_negatives(name, fixed_batch):
    """The method passes each region's image id (the batch's `image_id`) to the queue: with every
    image of the batch under one id, after a step the queue (empty start) holds only keys of the
    queries' "own image", so on the same batch again every negative is left out: the loss is
    exactly 0 and the chance level ln(1). With the exclusion off the same keys are negatives."""
    one = {**fixed_batch, "image_id": torch.full_like(fixed_batch["image_id"], 7)}
    losses = {}
    for exclude in (True, False):
        torch.manual_seed(0)
        cfg = replace(DEFAULTS[name], queue_size=4096, proj_hidden=32, queue_init="empty", exclude_same_image=exclude)
        method = build(name, "resnet18", cfg, roi_size=2, bn_splits=2)
        g = torch.Generator().manual_seed(0)
        method(one, g, 0.0)                                # fills the queue with this image's keys
        filled = int(method.queue.filled)
        assert filled > 0 and (method.queue.image_ids[:filled] == 7).all()
        loss, terms = method(one, g, 0.0)
        losses[exclude] = float(loss.detach())
        if exclude:
            assert [v for k, v in terms.items() if k.endswith("_chance")] == [0.0] * (1 + (name == "d3ssl")), terms
    assert losses[True] == 0.0 and losses[False] > 0.1


def test_each_loss_terms_chance_level_counts_its_own_querys_negatives(fixed_batch, monkeypatch):
    """With the queue holding this batch's keys, a region of image i has 2 n_i keys of its own image
    left out (n_i: its valid boxes). L_dc's chance level averages ln(M - 2 n_i + 1) over the regions
    of x1 (valid), L_dp's over the regions kept in x3 (valid3, here images 0 and 1), times 2 terms and
    L_dp's share of the proposals."""
    import train.methods as methods
    real_views, seen = methods.region_views, {}

    def views(batch, cfg, g):
        v = real_views(batch, cfg, g)
        v["valid3"] = batch["valid"].clone()
        v["valid3"][2:] = False                            # only images 0 and 1 keep boxes in x3
        seen["valid3"] = v["valid3"]
        return v
    monkeypatch.setattr(methods, "region_views", views)
    batch = dict(fixed_batch)
    for k in ("boxes1", "boxes2", "boxes2s"):              # two boxes for images 0 and 1, one for 2 and 3
        batch[k] = batch[k].clone()
        batch[k][:, 1] = batch[k][:, 0]
    batch["valid"] = torch.tensor([[True, True], [True, True], [True, False], [True, False]])
    torch.manual_seed(0)
    cfg = replace(DEFAULTS["d3ssl"], queue_size=4096, proj_hidden=32, queue_init="empty")
    method = build("d3ssl", "resnet18", cfg, roi_size=2, bn_splits=2)
    g = torch.Generator().manual_seed(0)
    method(batch, g, 0.0)
    _, terms = method(batch, g, 0.0)
    valid = batch["valid"]
    n = valid.sum(1)
    M = 2 * int(n.sum())
    per_row = torch.log((M - 2 * n.double()) + 1)[:, None].expand_as(valid)
    dc = float(per_row[valid].mean())
    dp = float(per_row[seen["valid3"]].mean())
    share = float(seen["valid3"].sum() / valid.sum())
    assert terms["loss_dc_chance"] == pytest.approx(2 * dc)
    assert terms["loss_dp_chance"] == pytest.approx(2 * dp * share)
    assert dp != pytest.approx(dc)                         # the two differ here: each uses its own rows
