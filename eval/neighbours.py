"""Per-query neighbours of an O-KNN run: which bank objects each val object is matched with.

The O-KNN stage writes, beside its `oknn.json`, `oknn_neighbours.parquet` with one row per
(query object, neighbour rank), so a researcher can see what the features confuse
(`python -m pipeline.browse --neighbours ...` shows it as the FiftyOne view "worst O-KNN queries"):

- the query: `query` (its index among the eligible val objects), `query_image` (path),
  `query_x1..query_y2` (pixels of the stored image), `query_label` (COCO category id),
  `query_name`, the kNN vote's `predicted` / `predicted_name`, `correct`, and `order`: the
  query's place when wrong ones come first (then by the similarity of its nearest neighbour,
  highest first: the most confident mistakes lead);
- the neighbour: `rank` (1 = most similar), `bank_object` (its index among the eligible train
  objects), `bank_image`, `bank_x1..bank_y2`, `bank_label`, `bank_name`, `similarity` (cosine).

Rows are sorted by (`order`, `rank`); the same features give the same bytes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import atomic_path

COLUMNS = ("order", "query", "query_image", "query_x1", "query_y1", "query_x2", "query_y2", "query_label",
           "query_name", "predicted", "predicted_name", "correct", "rank", "bank_object", "bank_image",
           "bank_x1", "bank_y1", "bank_x2", "bank_y2", "bank_label", "bank_name", "similarity")


def category_names(annotations: Path) -> dict[int, str]:
    """COCO category id -> name, from an instances JSON (read by `pipeline.coco.load_coco`, which
    names the file when it is missing or not a COCO instances file)."""
    from pipeline.coco import load_coco

    return {int(i): str(c["name"]) for i, c in load_coco(annotations).cats.items()}


def worst_first(correct: np.ndarray, top_similarity: np.ndarray) -> np.ndarray:
    """Query indices with the wrong ones first, each group by its nearest neighbour's similarity
    (highest first), ties by index."""
    return np.lexsort((np.arange(len(correct)), -top_similarity.astype(np.float64), correct.astype(np.int8)))


def neighbours_table(sims: np.ndarray, idx: np.ndarray, predicted: np.ndarray, train, val, bank_sel: np.ndarray,
                     names: dict[int, str]) -> pa.Table:
    """The table described above from the search result: `sims`/`idx` (queries x k, `idx` into the
    bank rows), `predicted` (a category id per query), the splits (eval.oknn.Split) and the bank's
    object indices `bank_sel`."""
    q, k = idx.shape
    correct = predicted == val.category
    order = np.empty(q, np.int64)
    order[worst_first(correct, sims[:, 0] if k else np.zeros(q))] = np.arange(q)
    rows = np.argsort(order, kind="stable")                 # queries in `order`
    qi = np.repeat(rows, k)
    bank = bank_sel[idx[rows].reshape(-1)]
    cols = {
        "order": order[qi], "query": qi, "query_image": [val.paths[i] for i in val.image[qi]],
        **{f"query_{c}": val.boxes[qi, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))},
        "query_label": val.category[qi].astype(np.int64), "query_name": [names.get(int(c), str(c)) for c in val.category[qi]],
        "predicted": predicted[qi].astype(np.int64), "predicted_name": [names.get(int(c), str(c)) for c in predicted[qi]],
        "correct": correct[qi], "rank": np.tile(np.arange(1, k + 1), q), "bank_object": bank.astype(np.int64),
        "bank_image": [train.paths[i] for i in train.image[bank]],
        **{f"bank_{c}": train.boxes[bank, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))},
        "bank_label": train.category[bank].astype(np.int64),
        "bank_name": [names.get(int(c), str(c)) for c in train.category[bank]],
        "similarity": sims[rows].reshape(-1).astype(np.float32),
    }
    return pa.table({c: cols[c] for c in COLUMNS})


def write_neighbours(path: Path, bank: np.ndarray, queries: np.ndarray, train, val, bank_sel: np.ndarray,
                     classes: np.ndarray, cfg, device, coco_root: Path) -> pa.Table:
    """Search the `cfg.k` nearest bank rows of every query (eval.oknn's search and vote, so the
    prediction is the one O-KNN scored), and write the neighbours table to `path` (parquet)."""
    import torch

    from eval.knn import knn_search, knn_vote

    sims, idx = knn_search(bank, queries, cfg.k, cfg.bank_chunk, cfg.query_chunk, device)
    bank_y = torch.as_tensor(np.searchsorted(classes, train.category[bank_sel]), dtype=torch.long, device=idx.device)
    scores = knn_vote(sims, bank_y[idx], len(classes), cfg.temperature)
    predicted = classes[scores.argmax(dim=1).cpu().numpy()]
    names = category_names(Path(coco_root) / "annotations" / "instances_val2017.json")
    table = neighbours_table(sims.cpu().numpy(), idx.cpu().numpy(), predicted, train, val, bank_sel, names)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return table


def read_neighbours(path: Path) -> pa.Table:
    """The neighbours table at `path`, checked for every column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no O-KNN neighbours table {path}: the oknn stage writes it beside oknn.json "
                                "(dvc repro oknn@<model>-<seed>)")
    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}: it predates eval.neighbours; rerun its oknn stage")
    return table
