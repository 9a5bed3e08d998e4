"""Shuffle-BN for the momentum encoder (MoCo, He et al. 2020, section 3.3; MoCo's single-GPU demo).

With batch norm, a query and its positive key computed in the same batch-norm batch share batch
statistics that the queue's negatives (earlier batches) lack: the contrastive loss can fall by
reading that leak instead of learning the content (MoCo's "cheating" sub-task). The fix gives the
key encoder other batch-norm groups than the query encoder:

- The query encoder (student) sees the global batch in its order: rank r holds samples
  [r B, (r + 1) B), cut into `bn_splits` contiguous groups (`train.model.SplitBatchNorm*`). With
  shuffle-BN the student keeps per-rank batch norm under DDP, as MoCo does (train.pretrain converts
  it to SyncBN only when shuffle-BN is off): global statistics would contain every key group.
- The key encoder (teacher) sees the global batch in a shuffled order (`key_order`), cut the same
  way; its outputs are gathered and put back in the original order (`shuffled_forward`). Under DDP
  this is MoCo's cross-GPU shuffle (images and boxes are gathered, each rank encodes its share of
  the shuffled batch); on one process it is the demo's split + shuffle.

The shuffle is stratified: samples are shuffled within each query group, then dealt to the key
groups column by column, so every key group draws evenly from the query groups. With Q equal query
groups, a key group of m samples holds at most ceil(m / Q) samples of any one query group, so the
set of samples that share a key's statistics always differs from the set that shares its query's
(MoCo's plain random permutation only makes this likely); at the embedded 32 images in 4 groups a
key shares its statistics with 2 of its query group's 8 samples (itself included).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from train import dist
from train.losses import gather_rows
from train.model import chunk_sizes


def query_groups(world: int, batch: int, splits: int) -> torch.Tensor:
    """(world * batch,) the query-side batch-norm group of every sample of the global batch."""
    per_rank = torch.repeat_interleave(torch.arange(splits), torch.tensor(chunk_sizes(batch, splits)))
    return (torch.arange(world)[:, None] * splits + per_rank[None, :]).reshape(-1)


def key_order(world: int, batch: int, splits: int, g: torch.Generator) -> torch.Tensor:
    """(world * batch,) global sample indices in the order the key encoder sees them.

    Stratified: a random order within each query group, then column by column over the groups (the
    groups in a random order); contiguous chunks of this order are the key groups.
    """
    n = world * batch
    group = query_groups(world, batch, splits)
    n_groups = world * splits
    if n_groups * 2 > n:
        raise ValueError(f"shuffle-BN needs at least 2 samples per batch-norm group: {batch} per rank in "
                         f"{splits} splits; lower pretrain.bn_splits or raise loader.batch_size")
    noise = torch.rand(n, generator=g, device=g.device).cpu()
    within = torch.argsort(group + noise)                 # by group, randomly within each
    rank_in_group = torch.empty(n, dtype=torch.long)
    starts = torch.zeros(n_groups + 1, dtype=torch.long)
    starts[1:] = torch.bincount(group, minlength=n_groups).cumsum(0)
    rank_in_group[within] = torch.arange(n) - starts[group[within]]
    group_rank = torch.argsort(torch.rand(n_groups, generator=g, device=g.device).cpu())
    key = rank_in_group * n_groups + group_rank[group]
    return torch.argsort(key)


def key_groups(order: torch.Tensor, world: int, batch: int, splits: int) -> torch.Tensor:
    """(world * batch,) the key-side batch-norm group of every sample (in the original order)."""
    groups = torch.empty_like(order)
    groups[order] = query_groups(world, batch, splits)
    return groups


@torch.no_grad()
def shuffled_forward(encode: Callable[..., torch.Tensor], tensors: list[torch.Tensor], counts: torch.Tensor,
                     splits: int, g: torch.Generator) -> torch.Tensor:
    """encode(*tensors) under shuffle-BN, rows back in the original order.

    `tensors` are this rank's per-sample inputs (first dim B, e.g. images, boxes, valid);
    `encode(*subset)` returns `counts[i]` rows for sample i of the subset, sample-major (regions:
    one per valid box; images: one each). `splits` is the batch-norm groups per rank; `encode`
    must use them (e.g. `lambda x, b, v: teacher.regions(x, b, v, splits)`).
    """
    world, rank = dist.world_size(), dist.rank()
    batch = tensors[0].shape[0]
    order = dist.broadcast(key_order(world, batch, splits, g).to(tensors[0].device))   # rank 0's on every rank
    every = [dist.all_gather(t) for t in tensors]
    counts_all = dist.all_gather(counts.to(tensors[0].device))
    mine = order[rank * batch:(rank + 1) * batch]
    rows = gather_rows(encode(*[t[mine] for t in every]))          # rows of the samples in `order`
    per = counts_all[order]
    start_in_order = torch.cumsum(per, 0) - per
    position = torch.argsort(order)                                # where sample i sits in `order`
    start = start_in_order[position][rank * batch:(rank + 1) * batch]
    count = counts_all[rank * batch:(rank + 1) * batch]
    index = torch.repeat_interleave(start - torch.cumsum(count, 0) + count, count) + torch.arange(
        int(count.sum()), device=count.device)
    return rows[index]
