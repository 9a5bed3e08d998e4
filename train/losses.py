"""Losses as pure functions, and the memory queue of negatives.

- `info_nce` is the paper's eq. 5:
      L_nce(z, z+, {z-}) = -log( exp(z.z+/T) / sum_{z_j in {z-} U {z+}} exp(z.z_j/T) )
  with z, z+ and the queue L2-normalised (MoCo); averaged over the rows.
- `byol_loss` is SoCo's/BYOL's regression loss: 2 - 2 cos(p, z).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from train import dist


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float,
             exclude: torch.Tensor | None = None) -> torch.Tensor:
    """q: N x D queries, k: N x D positives (no gradient), negatives: M x D. Mean over N.
    `exclude` (N x M bool, from `Queue.same_image`): negatives left out of row i's sum."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)                     # N x 1
    neg = q @ F.normalize(negatives.float(), dim=1).t()        # N x M
    if exclude is not None:
        neg = neg.masked_fill(exclude, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature        # N x (1 + M)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), averaged over rows; z carries no gradient."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float().detach(), dim=1)).mean()


class Queue(nn.Module):
    """A FIFO memory of L2-normalised features (MoCo's queue; the paper's memory bank {z-}).

    Keys from every rank are gathered and enqueued in rank order, so every rank holds the same
    queue. `init="random"` (the default, MoCo's): it starts as random unit vectors and all of it
    serves as negatives from the first step. `init="empty"`: only the slots written so far are
    negatives. The empty start is the remedy where a random start collapses, which a very short
    schedule with a large learning rate can do: against random negatives the loss falls fastest by
    mapping every region to one direction, and once the queue holds those identical keys InfoNCE
    has no gradient left. The end-of-run health check of the pre-training reports such a collapse
    (`collapsed keys`). `filled` counts the slots written so far (the "queue fill" metric).

    Every key is stored with the id of the image it came from (`image_ids`; -1 for the random
    start). With `exclude_same_image` (the default), `same_image` masks, for each query, the queued
    keys of the query's own image: they are other views or other proposals of the same image, not
    negatives. The paper is silent (its eq. 5 draws {z-} from the memory bank), and MoCo v2 as
    published has no such mask (`exclude_same_image: false` on the `mocov2` method gives the
    published baseline; every method takes the same default here so that none is handicapped by
    false negatives the others are spared). At real scale the mask rarely fires: an image returns
    about an epoch later (sooner now and then, as the resampled stream draws shards with
    replacement), and the queue (MoCo v2: 65536 keys) holds a fraction of an epoch's keys. On a
    miniature whose epoch is short against the queue it fires often: in the embedded run (420
    images, queue 1024) other views of the query's own image are among the negatives of 68% of MoCo
    v2's queries and at least 23% of D3SSL's (`benchmarks/results/queue_duplicates.json`).
    """

    def __init__(self, size: int, dim: int, init: str = "random", exclude_same_image: bool = True):
        super().__init__()
        if init not in ("random", "empty"):
            raise ValueError(f"queue init {init!r}: use random or empty")
        self.size, self.init, self.exclude_same_image = size, init, exclude_same_image
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("image_ids", torch.full((size,), -1, dtype=torch.long))
        self._register_load_state_dict_pre_hook(self._ids_of_an_older_checkpoint)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def _ids_of_an_older_checkpoint(self, state: dict, prefix: str, *_) -> None:
        """A checkpoint written before the queue kept image ids (`--resume` across that change)
        loads with ids -1 (no image): its keys stay negatives of every query."""
        state.setdefault(prefix + "image_ids", torch.full_like(self.image_ids, -1))

    def negatives(self) -> torch.Tensor:
        if self.init == "empty" and int(self.filled) < self.size:
            return self.features[: int(self.filled)]
        return self.features

    @torch.no_grad()
    def same_image(self, query_ids: torch.Tensor) -> torch.Tensor | None:
        """N x M mask over `negatives()`: True where a queued key comes from the image of query i
        (None when `exclude_same_image` is off)."""
        if not self.exclude_same_image:
            return None
        ids = self.image_ids[: len(self.negatives())]
        return query_ids.view(-1, 1) == ids.view(1, -1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, image_ids: torch.Tensor | None = None) -> None:
        """Add N x D keys and the N ids of their images (gathered over ranks first; None: -1, an
        image no query has); the oldest are overwritten."""
        if image_ids is None:
            image_ids = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        keys = gather_rows(F.normalize(keys.detach().float(), dim=1))
        image_ids = gather_rows(image_ids.to(self.image_ids.device, torch.long))
        n = keys.shape[0]
        if n == 0:
            return
        if n >= self.size:
            keys, image_ids, n = keys[-self.size:], image_ids[-self.size:], self.size
        p = int(self.ptr)
        first = min(n, self.size - p)
        self.features[p:p + first] = keys[:first].to(self.features.dtype)
        self.image_ids[p:p + first] = image_ids[:first]
        if first < n:
            self.features[: n - first] = keys[first:].to(self.features.dtype)
            self.image_ids[: n - first] = image_ids[first:]
        self.ptr.fill_((p + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def fill_ratio(self) -> float:
        return float(self.filled) / self.size


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` from every rank (counts may differ), concatenated in rank order."""
    if dist.world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = dist.all_gather(n)
    pad = torch.zeros((int(counts.max()), *x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: x.shape[0]] = x
    every = dist.all_gather(pad).view(dist.world_size(), -1, *x.shape[1:])
    return torch.cat([every[r, : int(counts[r])] for r in range(dist.world_size())])


# ------------------------------------------------------------------------------ health


@torch.no_grad()
def queue_top1(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
               exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Share of queries whose positive scores above every queued negative they are compared with
    (`exclude` as in `info_nce`; chance: 1 / (M + 1))."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    pos = (q * k).sum(dim=1)
    if negatives.shape[0] == 0:
        return torch.ones((), device=q.device)
    neg = q @ F.normalize(negatives.float(), dim=1).t()
    if exclude is not None:
        neg = neg.masked_fill(exclude, float("-inf"))
    neg = neg.amax(dim=1)
    return (pos > neg).float().mean()


@torch.no_grad()
def batch_top1(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Share of rows i whose nearest row of z (cosine) is z_i: a BYOL-style method's retrieval
    accuracy within the batch (chance: 1 / N)."""
    sim = F.normalize(p.float(), dim=1) @ F.normalize(z.float(), dim=1).t()
    return (sim.argmax(dim=1) == torch.arange(p.shape[0], device=p.device)).float().mean()


@torch.no_grad()
def key_spread(keys: torch.Tensor) -> torch.Tensor:
    """Per-dimension standard deviation of the L2-normalised keys, times sqrt(dim): about 1 for
    keys spread over the sphere, 0 when they collapse to one point (SimSiam's collapse check)."""
    z = F.normalize(keys.float(), dim=1)
    return z.std(dim=0).mean() * z.shape[1] ** 0.5


def chance_loss(queue_size: int, exclude: torch.Tensor | None = None) -> float:
    """InfoNCE of a query that cannot tell its positive from the queue's negatives: ln(M + 1),
    averaged over the queries' own M when `exclude` leaves some negatives out."""
    import math

    if exclude is None or exclude.numel() == 0:
        return math.log(queue_size + 1)
    return float(torch.log((queue_size - exclude.sum(dim=1)).double() + 1).mean())
