"""Region augmentations: the invariants of PRC, PRM, RBJ and the composition, batched == looped."""
from __future__ import annotations

import math

import pytest
import torch

from train.augment import (
    AugmentConfig, apply_box_jitter, apply_cutout, apply_prc, apply_prm, apply_rbj, compose,
    depositioning_boxes, prc_mask, rect_masks, region_views, sample_box_jitter, sample_cutout,
    sample_prc, sample_prm, sample_rbj, sample_shift, shift_images, shift_px,
)
from train.backgrounds import background_donors


def random_boxes(g: torch.Generator, B: int, K: int, size: int = 64) -> torch.Tensor:
    xy = torch.rand((B, K, 2), generator=g) * (size - 12)
    wh = 8 + torch.rand((B, K, 2), generator=g) * (size - 8 - xy)
    return torch.cat([xy, xy + wh], dim=-1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    B, K = 6, 5
    boxes = random_boxes(g, B, K)
    valid = torch.rand((B, K), generator=g) < 0.8
    valid[:, 0] = True
    images = torch.randn((B, 3, 64, 64), generator=g)
    return images, boxes, valid


def test_prc_cutouts_keep_aspect_and_size_ratio_inside_their_proposal(batch):
    _, boxes, valid = batch
    cfg = AugmentConfig(prc_p=1.0)
    for seed in range(20):
        p = sample_prc(boxes, valid, cfg, torch.Generator().manual_seed(seed))
        cuts, use = p["cuts"], p["use"]
        assert torch.equal(use, valid)
        bw, bh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        cw, ch = cuts[..., 2] - cuts[..., 0], cuts[..., 3] - cuts[..., 1]
        assert torch.allclose(cw / ch, bw / bh, rtol=1e-4)                          # same h/w ratio
        ratio = cw / bw
        assert ratio[use].min() >= 0.2 - 1e-6 and ratio[use].max() <= 0.5 + 1e-6    # size ratio range
        assert (cuts[..., :2] >= boxes[..., :2] - 1e-4).all() and (cuts[..., 2:] <= boxes[..., 2:] + 1e-4).all()


def test_prc_restore_pairs_by_hand():
    """Cutouts of half the proposal's side (prc_size 0.5): wherever a cutout lands in its proposal,
    the shares below hold, so the restore pairs are known by hand for every seed.

    0 (0,0,40,40), area 1600: its 20x20 cutout covers >= 20x19 of 1 = 24% of 1 (and <= 25.6%).
    1 (0,0,40,39), area 1560, smaller than 0: its 20x19.5 cutout covers 24% of 0, but 0 is larger
      (processed first), so (1, 0) is never a restore pair.
    2 (60,60,70,70): touches nothing. 3 (5,5,35,35): overlapped by 0's cutout, but not valid.
    4 (38,0,100,40), area 2480, the largest: its cutout reaches at most 2 px into 0 and 1 (< 3%).
    5, 6 (100,0,140,40): the same box, area 1600 like 0; ties go by index, so 5 before 6 and 0
      before both; 5's cutout covers 25% of 6.
    """
    boxes = torch.tensor([[[0, 0, 40, 40], [0, 0, 40, 39], [60, 60, 70, 70], [5, 5, 35, 35], [38, 0, 100, 40],
                           [100, 0, 140, 40], [100, 0, 140, 40]]], dtype=torch.float32)
    valid = torch.tensor([[True, True, True, False, True, True, True]])
    for overlap, want in ((0.1, {(0, 1), (5, 6)}), (0.2, {(0, 1), (5, 6)}), (0.3, set())):
        cfg = AugmentConfig(prc_p=1.0, prc_size=(0.5, 0.5), prc_overlap=overlap)
        for seed in range(10):
            p = sample_prc(boxes, valid, cfg, torch.Generator().manual_seed(seed))
            got = {tuple(ij) for ij in p["restore"][0].nonzero().tolist()}
            assert got == want, (overlap, seed, got)
    # a proposal without a cutout restores nothing
    p = sample_prc(boxes, valid, AugmentConfig(prc_p=0.0, prc_size=(0.5, 0.5), prc_overlap=0.1), torch.Generator())
    assert not p["restore"].any()


def test_prc_restores_the_overlapped_part_of_a_smaller_proposal():
    boxes = torch.tensor([[[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 20.0, 20.0]]])
    valid = torch.tensor([[True, True]])
    # the big proposal's cutout covers all of the small one; the small one has no cutout
    params = {"cuts": torch.tensor([[[5.0, 5.0, 25.0, 25.0], [0.0, 0.0, 0.0, 0.0]]]),
              "use": torch.tensor([[True, False]]), "restore": torch.tensor([[[False, True], [False, False]]])}
    m = prc_mask(boxes, params, 40, 40)[0]
    assert not m[10:20, 10:20].any()                      # restored for the smaller proposal
    assert m[5:25, 5:25].sum() == 20 * 20 - 10 * 10       # the rest of the cutout is cut
    img = torch.ones((1, 3, 40, 40))
    out = apply_prc(img, boxes, params)
    assert out[0, :, 5, 5].eq(0).all() and out[0, :, 15, 15].eq(1).all()


def test_rbj_boxes_are_never_larger_nor_outside_the_original(batch):
    _, boxes, _ = batch
    for seed in range(50):
        out = apply_rbj(boxes, sample_rbj(boxes, AugmentConfig(rbj_shrink=0.4), torch.Generator().manual_seed(seed)))
        assert (out[..., :2] >= boxes[..., :2] - 1e-5).all() and (out[..., 2:] <= boxes[..., 2:] + 1e-5).all()
        size, new = boxes[..., 2:] - boxes[..., :2], out[..., 2:] - out[..., :2]
        assert (new <= size + 1e-5).all() and (new >= 0.6 * size - 1e-4).all()


def test_prm_rectangles_straddle_a_side_and_fill_with_the_background(batch):
    images, boxes, valid = batch
    cfg = AugmentConfig(prm_p=1.0)
    p = sample_prm(boxes, valid, cfg, torch.Generator().manual_seed(3))
    r = p["rects"]
    rw, rh = r[..., 2] - r[..., 0], r[..., 3] - r[..., 1]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    s, aspect = (rw * rh) / area, rw / rh
    assert s.min() >= 0.2 - 1e-4 and s.max() <= 0.6 + 1e-4
    assert aspect.min() >= 0.75 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4
    cx, cy = (r[..., 0] + r[..., 2]) / 2, (r[..., 1] + r[..., 3]) / 2
    on_side = (torch.isclose(cx, boxes[..., 0]) | torch.isclose(cx, boxes[..., 2])
               | torch.isclose(cy, boxes[..., 1]) | torch.isclose(cy, boxes[..., 3]))
    assert on_side.all()
    fill = torch.full_like(images, 7.0)
    out = apply_prm(images, p, fill)
    m = (rect_masks(r, 64, 64) & valid[..., None, None]).any(1)[:, None].expand_as(images)
    assert (out[m] == 7.0).all() and torch.equal(out[~m], images[~m])
    assert (apply_prm(images, p, None)[m] == 0).all()


def test_composition_pixel_for_pixel():
    H = W = 12
    x2 = torch.arange(3 * H * W, dtype=torch.float32).reshape(1, 3, H, W)
    xb = torch.full((1, 3, H, W), -1.0)
    boxes = torch.tensor([[[1.0, 2.0, 4.0, 5.0], [6.0, 1.0, 8.0, 3.0], [0.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True, False]])
    t = torch.tensor([[3, 4]])
    shifted, valid3 = depositioning_boxes(boxes, valid, t, H, W, 0.5)
    assert torch.equal(valid3, valid)
    x3, m_hat = compose(x2, shifted, valid3, xb, t, None)
    assert torch.equal(shifted[0, :2], torch.tensor([[4.0, 6.0, 7.0, 9.0], [9.0, 5.0, 11.0, 7.0]]))
    expect = xb.clone()
    for (x0, y0, x1, y1) in [(1, 2, 4, 5), (6, 1, 8, 3)]:
        expect[0, :, y0 + 4:y1 + 4, x0 + 3:x1 + 3] = x2[0, :, y0:y1, x0:x1]
    assert torch.equal(x3, expect)
    assert int(m_hat.sum()) == 3 * 3 + 2 * 2
    # with PRC on the shifted mask (eq. 7) the cut pixels show the background
    prc = {"cuts": torch.tensor([[[4.0, 6.0, 5.0, 7.0], [0.0] * 4, [0.0] * 4]]), "use": torch.tensor([[True, False, False]]),
           "restore": torch.zeros((1, 3, 3), dtype=torch.bool)}
    x3c, m_c = compose(x2, shifted, valid3, xb, t, prc)
    assert not m_c[0, 6, 4] and torch.equal(x3c[0, :, 6, 4], xb[0, :, 6, 4]) and int(m_c.sum()) == 12


def test_shifts_keep_every_box_inside_the_image(batch):
    _, boxes, valid = batch
    for seed in range(50):
        t = sample_shift(boxes, valid, 64, 64, torch.Generator().manual_seed(seed), "within")
        moved = boxes + t[:, None, :].float().repeat(1, 1, 2)
        v = valid
        assert (moved[..., :2][v] >= -1e-5).all() and (moved[..., 2:][v] <= 64 + 1e-5).all()
    assert torch.equal(shift_images(torch.arange(16.0).reshape(1, 1, 4, 4), torch.tensor([[1, 0]]))[0, 0, :, 1:],
                       torch.arange(16.0).reshape(4, 4)[:, :3])


def test_batched_equals_a_per_sample_loop(batch):
    images, boxes, valid = batch
    g = torch.Generator().manual_seed(11)
    cfg = AugmentConfig(prc_p=0.8, prm_p=0.8, cutout=True, box_jitter=True)
    fill = torch.randn(images.shape, generator=g)
    prc, prm = sample_prc(boxes, valid, cfg, g), sample_prm(boxes, valid, cfg, g)
    rbj, cut, jit = sample_rbj(boxes, cfg, g), sample_cutout(boxes, valid, cfg, g), sample_box_jitter(boxes, valid, cfg, g)
    t = sample_shift(boxes, valid, 64, 64, g)
    b3, v3 = depositioning_boxes(boxes, valid, t, 64, 64, 0.5)
    whole = {
        "prc": apply_prc(images, boxes, prc), "prm": apply_prm(images, prm, fill), "rbj": apply_rbj(boxes, rbj),
        "cut": apply_cutout(images, cut), "jit": apply_box_jitter(boxes, jit, 64, 64),
        "x3": compose(images, b3, v3, fill, t, prc)[0],
    }
    for b in range(images.shape[0]):
        one = lambda p: {k: v[b:b + 1] for k, v in p.items()}   # noqa: E731
        s = slice(b, b + 1)
        assert torch.equal(apply_prc(images[s], boxes[s], one(prc)), whole["prc"][s])
        assert torch.equal(apply_prm(images[s], one(prm), fill[s]), whole["prm"][s])
        assert torch.equal(apply_rbj(boxes[s], one(rbj)), whole["rbj"][s])
        assert torch.equal(apply_cutout(images[s], one(cut)), whole["cut"][s])
        assert torch.equal(apply_box_jitter(boxes[s], one(jit), 64, 64), whole["jit"][s])
        assert torch.equal(compose(images[s], b3[s], v3[s], fill[s], t[s], one(prc))[0], whole["x3"][s])


def test_region_views_are_deterministic_for_a_generator_seed(batch):
    images, boxes, valid = batch
    b = {"x1": images, "x2": images.flip(-1), "x2s": images[..., ::2, ::2],
         "boxes1": boxes, "boxes2": boxes, "boxes2s": boxes / 2, "valid": valid}
    a = region_views(b, AugmentConfig(), torch.Generator().manual_seed(5))
    c = region_views(b, AugmentConfig(), torch.Generator().manual_seed(5))
    d = region_views(b, AugmentConfig(), torch.Generator().manual_seed(6))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["x1h"], d["x1h"])
    assert set(a) == {"x1h", "x2sh", "x3", "mask3", "valid3", "shift_px", "s1", "s2s", "s3", "t1", "t2"}
    off = region_views(b, AugmentConfig(prc=False, prm=False, rbj=False, compose=False), torch.Generator().manual_seed(5))
    assert torch.equal(off["x1h"], images) and torch.equal(off["s1"], boxes) and "x3" not in off


def test_anchor_shift_moves_boxes_that_fill_the_view():
    """Eq. 6's letter cannot move boxes whose union spans the view; the anchor reading can, keeps
    the anchor inside, and drops from L_dp what leaves the canvas."""
    g = torch.Generator().manual_seed(0)
    B = 64
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0], [34.0, 34.0, 64.0, 64.0], [10.0, 40.0, 26.0, 60.0]]).expand(B, 3, 4)
    valid = torch.ones(B, 3, dtype=torch.bool)
    within = sample_shift(boxes, valid, 64, 64, g, "within")
    assert int(within.abs().max()) == 0 and float(shift_px(within)) == 0.0
    t = sample_shift(boxes, valid, 64, 64, g, "anchor")
    assert float(shift_px(t)) > 8.0                                   # most shifts leave a C4 cell (16 px) behind
    b3, v3 = depositioning_boxes(boxes, valid, t, 64, 64, 0.5)
    moved = boxes + t[:, None, :].float().repeat(1, 1, 2)
    inside = (moved[..., :2] >= 0).all(-1) & (moved[..., 2:] <= 64).all(-1)
    assert inside.any(1).all()                                        # the anchor stays whole
    assert ((b3 >= 0) & (b3 <= 64)).all()                             # every box is cut to the canvas
    from train.augment import box_area
    visible = box_area(b3) / box_area(boxes)
    assert torch.equal(v3, valid & (visible >= 0.5)) and not v3.all()   # some boxes leave L_dp
    # x3's pasted pixels all come from inside x2's boxes (never the edge repeated by the shift)
    x2 = torch.rand(B, 1, 64, 64, generator=g)
    x3, m = compose(x2, b3, v3, torch.full_like(x2, -5.0), t, None)
    src = torch.zeros(B, 64, 64, dtype=torch.bool)
    for i in range(B):
        for k in range(3):
            if v3[i, k]:
                x0, y0, x1, y1 = (int(c) for c in b3[i, k])
                tx, ty = int(t[i, 0]), int(t[i, 1])
                assert torch.equal(x3[i, 0, y0:y1, x0:x1], x2[i, 0, y0 - ty:y1 - ty, x0 - tx:x1 - tx])
                src[i, y0:y1, x0:x1] = True
    assert torch.equal(m, src)


def test_each_view_takes_its_own_background():
    """A batch of constant-colour images: which images each view holds. x1-hat, x2s-hat and x3 each
    take foreign pixels from one other image, a different one for each, so the positive pairs
    (s1, t2), (s2, t1), (s3, t2), (s3, t1) never share a foreign image."""
    B, S = 6, 32
    colours = torch.arange(1, B + 1, dtype=torch.float32)                # image i is all (i + 1)
    x = colours.view(B, 1, 1, 1).expand(B, 3, S, S).clone()
    box = torch.tensor([4.0, 4.0, 28.0, 28.0])
    boxes = torch.stack([box, torch.tensor([8.0, 2.0, 20.0, 30.0])]).expand(B, 2, 4).clone()
    valid = torch.ones(B, 2, dtype=torch.bool)
    batch = {"x1": x, "x2": x.clone(), "x2s": x[..., ::2, ::2].clone(), "boxes1": boxes, "boxes2": boxes,
             "boxes2s": boxes / 2, "valid": valid}
    cfg = AugmentConfig(prc=False, prm_p=1.0, prm_scale=(0.5, 0.6))
    for seed in range(10):
        v = region_views(batch, cfg, torch.Generator().manual_seed(seed))
        for i in range(B):
            own = float(colours[i])
            foreign = {k: set(v[k][i].unique().tolist()) - {own} for k in ("x1h", "x2sh", "x3")}
            assert all(len(f) == 1 for f in foreign.values()), (seed, i, foreign)   # exactly one donor each
            assert foreign["x1h"].isdisjoint(foreign["x2sh"])          # (s2, t1)
            assert foreign["x3"].isdisjoint(foreign["x1h"])            # (s3, t1)
            assert foreign["x3"].isdisjoint(foreign["x2sh"])
    with pytest.raises(ValueError, match="batch_size to at least 4"):
        background_donors(3, 3, torch.Generator())


def test_soco_box_jitter_and_cutout(batch):
    images, boxes, valid = batch
    cfg = AugmentConfig(box_jitter_p=1.0, cutout_p=1.0)
    p = sample_box_jitter(boxes, valid, cfg, torch.Generator().manual_seed(0))
    out = apply_box_jitter(boxes, p, 64, 64)
    size, new = boxes[..., 2:] - boxes[..., :2], out[..., 2:] - out[..., :2]
    assert (out >= 0).all() and (out <= 64).all() and (new <= 1.1 * size + 1e-4).all()
    c = sample_cutout(boxes, valid, cfg, torch.Generator().manual_seed(0))
    side = c["rects"][..., 2] - c["rects"][..., 0]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    assert ((side ** 2 / area)[valid] >= 0.1 - 1e-4).all() and ((side ** 2 / area)[valid] <= 0.3 + 1e-4).all()
    assert math.isclose(float(apply_cutout(torch.ones(1, 1, 8, 8), {"rects": torch.tensor([[[0.0, 0.0, 4.0, 4.0]]]),
                                                                     "use": torch.tensor([[True]])}).sum()), 48.0)
