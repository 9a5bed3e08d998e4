"""Views: boxes land on the same pixels after each view; K-selection keeps only visible boxes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from train.views import (
    GRAY, ColourConfig, ViewConfig, boxes_to_view, colour_augment, decode_for_views, jitter_matrix,
    make_views, random_resized_crop, select_proposals,
)

NO_COLOUR = ColourConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def jpeg_with_box(w: int, h: int, box: tuple[int, int, int, int], quality: int = 95) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = (20, 60, 20)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = (250, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def red_extent(img: np.ndarray) -> tuple[float, float, float, float]:
    red = (img[..., 0] > 150) & (img[..., 1] < 100)
    ys, xs = np.nonzero(red)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("size, box", [((320, 240), (60, 50, 220, 200)), ((1280, 960), (300, 200, 900, 800))])
@pytest.mark.parametrize("seed", range(4))
def test_a_drawn_box_lands_on_its_pixels_in_every_view(size, box, seed):
    """Big images are decoded at a reduced JPEG scale (draft); the mapping must still be exact.

    The seeds are fixed: for each of them the x2 crop keeps the whole red box (checked below by
    hand), so the proposal itself is selected, never the whole-image fallback."""
    cfg = ViewConfig(colour1=NO_COLOUR, colour2=NO_COLOUR, crop_scale=(0.6, 1.0), min_visible=0.99)
    w, h = size
    crop = random_resized_crop(np.random.default_rng(seed), w, h, cfg.crop_scale, cfg.crop_ratio)
    assert crop[0] <= box[0] and crop[1] <= box[1] and crop[0] + crop[2] >= box[2] and crop[1] + crop[3] >= box[3]
    im = jpeg_with_box(*size, box)
    v = make_views(im, np.array([box], np.float32), np.random.default_rng(seed), cfg)
    assert v["valid"].tolist() == [True, False, False, False]
    # x1 is the whole image: the proposal's box there is the drawn box scaled to 224 (maybe mirrored),
    # which the whole-image fallback (the crop) is not
    x0, y0, x1, y1 = (box[0] * 224 / w, box[1] * 224 / h, box[2] * 224 / w, box[3] * 224 / h)
    assert (np.allclose(v["boxes1"][0], [x0, y0, x1, y1], atol=1e-3)
            or np.allclose(v["boxes1"][0], [224 - x1, y0, 224 - x0, y1], atol=1e-3)), v["boxes1"][0]
    for img, key in ((v["x1"], "boxes1"), (v["x2"], "boxes2"), (v["x2s"], "boxes2s")):
        got = np.array(red_extent(img), np.float32)
        tol = 2.0 if key != "boxes2s" else 1.5
        np.testing.assert_allclose(got, v[key][0], atol=tol, err_msg=key)


def test_hand_computed_mapping():
    boxes = np.array([[10, 20, 110, 70]], np.float32)
    # crop (x0=10, y0=10, w=200, h=100) resized to 224x112, then flipped
    out = boxes_to_view(boxes, (10, 10, 200, 100), 224, 112, flip=False)
    np.testing.assert_allclose(out, [[0, 11.2, 112, 67.2]], rtol=1e-6)
    out = boxes_to_view(boxes, (10, 10, 200, 100), 224, 112, flip=True)
    np.testing.assert_allclose(out, [[112, 11.2, 224, 67.2]], rtol=1e-6)


def test_draft_decodes_a_large_jpeg_smaller_but_big_enough():
    im = jpeg_with_box(1600, 1200, (10, 10, 50, 50))
    arr = decode_for_views(im, (0, 0, 1600, 1200), 224)
    assert arr.shape[1] < 1600 and min(arr.shape[:2]) >= 224
    im = jpeg_with_box(1600, 1200, (10, 10, 50, 50))
    arr = decode_for_views(im, (0, 0, 400, 300), 224)   # a small crop needs full resolution
    assert arr.shape[:2] == (600, 800) or arr.shape[:2] == (1200, 1600)
    assert arr.shape[0] * 300 / 1200 >= 224


def test_selection_returns_only_boxes_visible_in_both_views():
    rng = np.random.default_rng(0)
    cfg = ViewConfig(num_proposals=6)
    w, h = 640, 480
    for _ in range(200):
        crop = random_resized_crop(rng, w, h, cfg.crop_scale, cfg.crop_ratio)
        p = rng.uniform(0, 1, (30, 4)) * [w, h, w, h]
        p = np.concatenate([np.minimum(p[:, :2], p[:, 2:]), np.maximum(p[:, :2], p[:, 2:])], axis=1).astype(np.float32)
        sel, n = select_proposals(rng, p, crop, w, h, cfg)
        x0, y0, cw, ch = crop
        assert 1 <= n <= cfg.num_proposals
        for b in sel[:n]:
            assert b[0] >= x0 - 1e-3 and b[1] >= y0 - 1e-3 and b[2] <= x0 + cw + 1e-3 and b[3] <= y0 + ch + 1e-3
            in_x2 = boxes_to_view(b[None], crop, 224, 224, False)[0]
            assert min(in_x2[2] - in_x2[0], in_x2[3] - in_x2[1]) >= cfg.min_box_size - 1e-3
            # each selected box is the visible part of a proposal that keeps >= min_visible of its area
            src = [q for q in p if np.allclose(np.r_[np.maximum(q[:2], [x0, y0]), np.minimum(q[2:], [x0 + cw, y0 + ch])], b, atol=1e-3)]
            if src:
                q = src[0]
                assert (b[2] - b[0]) * (b[3] - b[1]) >= cfg.min_visible * (q[2] - q[0]) * (q[3] - q[1]) - 1e-2
            else:
                assert n == 1 and np.allclose(b, [x0, y0, x0 + cw, y0 + ch])  # the fallback


def test_no_proposals_gives_the_whole_image_box_as_x2_shows_it():
    im = jpeg_with_box(320, 240, (0, 0, 10, 10))
    v = make_views(im, np.zeros((0, 4), np.float32), np.random.default_rng(1), ViewConfig())
    assert v["valid"].tolist() == [True, False, False, False]
    np.testing.assert_allclose(v["boxes2"][0], [0, 0, 224, 224], atol=1e-3)
    assert (v["boxes1"][0][2] - v["boxes1"][0][0]) > 0


def test_views_are_deterministic_for_a_generator_seed():
    im1 = jpeg_with_box(320, 240, (60, 50, 220, 200))
    im2 = jpeg_with_box(320, 240, (60, 50, 220, 200))
    p = np.array([[60, 50, 220, 200], [0, 0, 100, 100]], np.float32)
    a = make_views(im1, p, np.random.default_rng(7), ViewConfig())
    b = make_views(im2, p, np.random.default_rng(7), ViewConfig())
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_jitter_matrix_matches_the_operations_one_by_one():
    """The fused affine map equals brightness/contrast/saturation applied in the drawn order."""
    rng = np.random.default_rng(3)
    img = rng.uniform(0.2, 0.8, (16, 16, 3)).astype(np.float32)
    mean = img.reshape(-1, 3).mean(0)
    for seed in range(10):
        A, off = jitter_matrix(np.random.default_rng(seed), (0.4, 0.4, 0.2, 0.0), mean)
        r = np.random.default_rng(seed)
        x = img.copy()
        for op in r.permutation(4):
            if op == 0:
                x = x * r.uniform(0.6, 1.4)
            elif op == 1:
                f, m = r.uniform(0.6, 1.4), float((x @ GRAY).mean())
                x = (x - m) * f + m
            elif op == 2:
                f = r.uniform(0.8, 1.2)
                g = (x @ GRAY)[..., None]
                x = (x - g) * f + g
        np.testing.assert_allclose(img @ A.T + off, x, atol=1e-5)
    # the hue rotation keeps the grey axis fixed
    A, off = jitter_matrix(np.random.default_rng(0), (0.0, 0.0, 0.0, 0.5), mean)
    np.testing.assert_allclose(A @ np.ones(3), np.ones(3), atol=1e-5)
    assert not np.allclose(A, np.eye(3))


def test_colour_augment_respects_probabilities():
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    assert np.array_equal(colour_augment(img, np.random.default_rng(0), NO_COLOUR), img)
    gray = colour_augment(img, np.random.default_rng(0), ColourConfig(jitter_p=0, grayscale_p=1, blur_p=0))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    sol = colour_augment(np.full((4, 4, 3), 200, np.uint8), np.random.default_rng(0),
                         ColourConfig(jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=1))
    assert sol.max() == 55


def test_blur_removes_the_same_share_of_detail_at_every_view_size():
    """blur_sigma is given for 224 px views (BYOL/SoCo) and scaled to the view: a vertical edge
    blurred at 64 px and at 224 px spreads over the same fraction of the image width."""
    cfg = ColourConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, blur_sigma=(2.0, 2.0), solarize_p=0.0)

    def spread(size: int) -> float:
        img = np.zeros((size, size, 3), np.uint8)
        img[:, size // 2:] = 255
        row = colour_augment(img, np.random.default_rng(0), cfg)[size // 2, :, 0].astype(float)
        ramp = np.count_nonzero((row > 255 * 0.1) & (row < 255 * 0.9))   # pixels of the blurred edge
        return ramp / size

    small, large = spread(64), spread(224)
    assert spread(224) * 224 >= 4                     # 2 px sigma at 224: an edge several pixels wide
    assert small * 64 >= 1                            # the 64 px view is blurred (sigma 0.57 px), not left sharp
    assert small == pytest.approx(large, abs=2 / 64)  # the same share of the width (within a pixel or two)
