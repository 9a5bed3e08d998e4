"""The k-nearest-neighbour classifier of the O-KNN evaluation (eval.oknn): a chunked cosine
search of the k most similar bank rows of every query, the weighted vote (each neighbour adds
exp(sim / T) to its class, Wu et al. 2018, as in DINO/solo-learn), and top-k accuracy.

The search runs over bank chunks x query chunks with a running top-k, so memory beyond the bank
itself is O(bank_chunk x query_chunk), whatever the bank size (COCO train: 860k objects).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from eval.oknn import OknnConfig


@torch.no_grad()
def knn_search(bank, queries, k: int, bank_chunk: int = 65536, query_chunk: int = 1024,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar bank rows of each query: (Q x k similarities, Q x k bank indices),
    best first.

    bank: N x D (numpy, a memmap, or a CPU tensor; read one chunk at a time), queries: Q x D.
    Peak memory beyond the inputs: the queries on `device`, one bank chunk and one
    query_chunk x bank_chunk similarity block; each bank chunk is read once.
    """
    device = torch.device(device)
    n = len(bank)
    k = min(k, n)
    q = F.normalize(torch.as_tensor(np.asarray(queries) if not torch.is_tensor(queries) else queries)
                    .to(device, torch.float32), dim=1)                        # Q x D
    best_s = torch.full((len(q), k), -float("inf"), device=device)           # Q x k
    best_i = torch.full((len(q), k), -1, dtype=torch.long, device=device)    # Q x k
    for b0 in range(0, n, bank_chunk):
        chunk = bank[b0:b0 + bank_chunk]
        b = F.normalize(torch.as_tensor(np.ascontiguousarray(chunk) if not torch.is_tensor(chunk) else chunk)
                        .to(device, torch.float32), dim=1)                    # B x D
        kk = min(k, len(b))
        for q0 in range(0, len(q), query_chunk):
            sim = q[q0:q0 + query_chunk] @ b.T                                # q x B
            cs, ci = sim.topk(kk, dim=1)
            ms = torch.cat([best_s[q0:q0 + query_chunk], cs], dim=1)         # q x (k + kk)
            mi = torch.cat([best_i[q0:q0 + query_chunk], ci + b0], dim=1)
            top, pos = ms.topk(k, dim=1)
            best_s[q0:q0 + query_chunk] = top
            best_i[q0:q0 + query_chunk] = mi.gather(1, pos)
    return best_s, best_i


def knn_vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores Q x C: each neighbour adds exp(sim / T) to its class."""
    scores = torch.zeros(len(sims), num_classes, dtype=torch.float64, device=sims.device)
    return scores.scatter_add_(1, neighbour_labels, (sims.double() / temperature).exp())


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Percent of rows whose target is among the `k` highest scores, for each k. A class without
    a vote (score 0) never counts as predicted, whatever order topk gives to the ties at 0."""
    top_scores, top = scores.topk(min(max(ks), scores.shape[1]), dim=1)
    hit = (top == targets.to(top.device)[:, None]) & (top_scores > 0)
    return {k: 100.0 * hit[:, :k].any(dim=1).double().mean().item() for k in ks}


def knn_classify(bank, bank_labels: np.ndarray, queries, query_labels: np.ndarray, num_classes: int,
                 cfg: OknnConfig, device: torch.device | str = "cpu") -> dict[int, float]:
    """Top-1/top-5 accuracy (percent) of the weighted kNN vote of `queries` over the bank."""
    sims, idx = knn_search(bank, queries, cfg.k, cfg.bank_chunk, cfg.query_chunk, device)
    labels = torch.as_tensor(bank_labels, dtype=torch.long, device=idx.device)[idx]
    scores = knn_vote(sims, labels, num_classes, cfg.temperature)
    return topk_accuracy(scores, torch.as_tensor(query_labels, dtype=torch.long))
