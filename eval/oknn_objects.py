"""Which objects the O-KNN evaluation (eval.oknn) uses, and how its disturbed variant alters the
query images. Pure numpy, no model.

- `eligible`: skip crowd boxes (a group, not one object) and boxes whose shorter side is under
  `min_box_size` original pixels.
- `select_bank`: at most `per_image` bank objects per image, round by round one object per class
  present in the image, the globally rarest class first, objects at random within a class.
- `disturb` / `pick_donors`: every pixel outside an image's query boxes replaced by another
  (seeded random) image of the split resized to the same size; the boxes' pixels are unchanged.
"""
from __future__ import annotations

import numpy as np


# ------------------------------------------------------------------------------ object selection


def eligible(boxes: np.ndarray, is_group: np.ndarray, min_box_size: float) -> dict[str, np.ndarray]:
    """Masks over boxes (n x 4, x1y1x2y2): 'keep', and why the others are skipped."""
    side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    crowd = is_group.astype(bool)
    tiny = ~crowd & (side < min_box_size)
    return {"keep": ~crowd & ~tiny, "crowd": crowd, "tiny": tiny}


def select_bank(image: np.ndarray, label: np.ndarray, per_image: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `per_image` objects per image.

    Round r takes the r-th object (random order) of every class present in the image; within a
    round the classes go rarest first (by count over all `label`). So an image of 12 people and
    one dog gives the dog and one person before a second person.
    """
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    n = len(image)
    if n == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    # rank of each object within its (image, class) group, in a random order
    order = np.lexsort((rng.random(n), label, image))
    new_group = np.ones(n, bool)
    new_group[1:] = (image[order][1:] != image[order][:-1]) | (label[order][1:] != label[order][:-1])
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - group_start
    # per image: round, then rarest class first (random among equally frequent ones)
    freq = np.bincount(label)[label]
    final = np.lexsort((rng.random(n), label, freq, rank, image))
    new_image = np.ones(n, bool)
    new_image[1:] = image[final][1:] != image[final][:-1]
    pos = np.arange(n) - np.maximum.accumulate(np.where(new_image, np.arange(n), 0))
    return np.sort(final[pos < per_image])


# ------------------------------------------------------------------------------ disturbing


def box_mask(height: int, width: int, boxes: np.ndarray) -> np.ndarray:
    """HxW bool, True on every pixel a box touches (floor of the start to ceil of the end)."""
    mask = np.zeros((height, width), bool)
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        mask[max(int(np.floor(y1)), 0):int(np.ceil(y2)), max(int(np.floor(x1)), 0):int(np.ceil(x2))] = True
    return mask


def disturb(image: np.ndarray, boxes: np.ndarray, donor: np.ndarray) -> np.ndarray:
    """`image` (HxWx3) with every pixel outside `boxes` taken from `donor` (same size)."""
    if donor.shape != image.shape:
        raise ValueError(f"donor shape {donor.shape} differs from the image's {image.shape}")
    keep = box_mask(image.shape[0], image.shape[1], boxes)
    return np.where(keep[..., None], image, donor)


def pick_donors(n: int, seed: int) -> np.ndarray:
    """For each of n images, another image index (uniform over the n - 1 others)."""
    if n < 2:
        raise ValueError("disturbing needs at least two images")
    d = np.random.default_rng(seed).integers(0, n - 1, size=n)
    return d + (d >= np.arange(n))
