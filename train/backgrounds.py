"""Background images for the region augmentations: every use of a foreign image (PRM in x1-hat,
PRM in x2s-hat, the background of x3; `train.augment`) takes its own donor from the batch, so no
positive pair shares foreign content that the queue's negatives lack.
"""
from __future__ import annotations

import torch


def background_donors(batch_size: int, uses: int, g: torch.Generator) -> torch.Tensor:
    """(uses, B) indices: donor[u, i] is the sample of the batch whose image fills use u of sample i.

    donor[u, i] = (i + o_u) mod B with `uses` distinct offsets o_u drawn from 1..B-1 for the batch,
    so a sample's donors differ from each other and from the sample itself. D3SSL has three uses
    (PRM in x1-hat, PRM in x2s-hat, the background of x3): the positive pairs (s2, t1) and
    (s3, t1) then never share a foreign patch, and (s1, t2), (s3, t2) have a clean teacher side.
    (The paper says "a randomly sampled background image" and is silent on PRM's source.)
    """
    if batch_size <= uses:
        raise ValueError(f"a batch of {batch_size} images cannot give each image {uses} distinct backgrounds "
                         f"from the others; set loader.batch_size to at least {uses + 1}")
    offsets = 1 + torch.randperm(batch_size - 1, generator=g, device=g.device)[:uses]
    i = torch.arange(batch_size, device=g.device)
    return (i[None, :] + offsets[:, None]) % batch_size


def backgrounds(images: torch.Tensor, uses: int, g: torch.Generator) -> list[torch.Tensor]:
    """`uses` background batches, each a permutation of `images` by `background_donors`."""
    donors = background_donors(images.shape[0], uses, g).to(images.device)
    return [images[d] for d in donors]


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-average `images` to size x size (a background for the small view x2-s)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.adaptive_avg_pool2d(images, size)
