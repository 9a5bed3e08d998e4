"""The O-KNN neighbours table: every query with its nearest bank objects, wrong ones first."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from eval.neighbours import COLUMNS, neighbours_table, read_neighbours, worst_first


def _split(paths, image, category):
    n = len(image)
    boxes = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    return SimpleNamespace(paths=paths, image=np.array(image), category=np.array(category), boxes=boxes)


def test_worst_first_puts_confident_mistakes_first():
    correct = np.array([True, False, True, False])
    top = np.array([0.9, 0.5, 0.99, 0.8])
    assert worst_first(correct, top).tolist() == [3, 1, 2, 0]


def test_table_maps_bank_rows_to_objects_and_orders_queries(tmp_path):
    train = _split(["t0.jpg", "t1.jpg"], [0, 0, 1, 1], [1, 2, 1, 3])
    val = _split(["v0.jpg"], [0, 0], [1, 2])
    bank_sel = np.array([0, 2, 3])                        # the bank holds train objects 0, 2, 3
    sims = np.array([[0.9, 0.8], [0.7, 0.6]], np.float32)
    idx = np.array([[1, 0], [2, 1]])                      # bank rows
    predicted = np.array([1, 3])                          # query 0 right, query 1 wrong
    t = neighbours_table(sims, idx, predicted, train, val, bank_sel, {1: "cat", 2: "dog", 3: "cow"})
    assert tuple(t.column_names) == COLUMNS and t.num_rows == 4
    d = t.to_pydict()
    assert d["query"] == [1, 1, 0, 0] and d["order"] == [0, 0, 1, 1] and d["rank"] == [1, 2, 1, 2]
    assert d["correct"] == [False, False, True, True]
    assert d["bank_object"] == [3, 2, 2, 0] and d["bank_image"] == ["t1.jpg", "t1.jpg", "t1.jpg", "t0.jpg"]
    assert d["bank_name"] == ["cow", "cat", "cat", "cat"] and d["query_name"] == ["dog", "dog", "cat", "cat"]
    assert d["predicted_name"][0] == "cow" and d["similarity"] == pytest.approx([0.7, 0.6, 0.9, 0.8])
    assert d["query_x1"][0] == 4.0 and d["bank_x1"][0] == 12.0           # boxes of object 1 and object 3


def test_oknn_stage_writes_the_neighbours_its_score_counts(tiny_synth, tmp_path):
    from eval.oknn import main

    params = tmp_path / "params.yaml"
    params.write_text("oknn:\n  min_size: 96\n  max_size: 160\n  per_image: 3\n  workers: 0\n  batch_size: 4\n")
    out = tmp_path / "oknn.json"
    assert main(["--backbone", "random", "--arch", "resnet18", "--coco-root", str(tiny_synth / "coco"),
                 "--out", str(out), "--params", str(params), "--device", "cpu"]) == 0
    r = json.loads(out.read_text())
    t = read_neighbours(tmp_path / "oknn_neighbours.parquet").to_pydict()
    assert len(t["query"]) == r["queries"] * r["k"]
    firsts = [i for i, rank in enumerate(t["rank"]) if rank == 1]
    # the vote's predictions are the ones O-KNN scored: their accuracy is its top-1
    assert 100.0 * np.mean([t["correct"][i] for i in firsts]) == pytest.approx(r["top1"])
    correct = [t["correct"][i] for i in firsts]
    assert correct == sorted(correct)                                     # wrong ones first
    assert all(a >= b for a, b in zip(t["similarity"][:r["k"]], t["similarity"][1:r["k"]]))
    assert all(isinstance(n, str) and not n.isdigit() for n in t["query_name"])


def test_a_table_without_its_columns_is_refused(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"query": [0]}), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match=r"old\.parquet lacks columns .*rerun its oknn stage"):
        read_neighbours(tmp_path / "old.parquet")
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet: the oknn stage writes it"):
        read_neighbours(tmp_path / "missing.parquet")
