"""O-KNN: the search, the vote and the accuracy on features whose neighbours are known; the bank
choice; disturbed images; the objects' size in C5 cells; the whole stage on a small embedded data
set, and a positive control: a backbone trained with the labels beats a random one through it."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from eval.backbone import region_feature, to_input
from eval.knn import knn_classify, knn_search, knn_vote, topk_accuracy
from eval.oknn import OknnConfig, RegionImages, Split, fed_shapes, main, object_cells, read_split, run_oknn, shape_batches
from eval.oknn_objects import box_mask, disturb, eligible, pick_donors, select_bank
from pipeline.params import load_section
from tests.eval.nets import TinyStages


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_search_finds_the_known_neighbours_in_any_chunking():
    angles = np.deg2rad([0, 10, 30, 60, 90, 135, 180, 270])
    bank = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32) * 3.0   # norms do not matter
    queries = _unit([[np.cos(np.deg2rad(12)), np.sin(np.deg2rad(12))],
                     [np.cos(np.deg2rad(265)), np.sin(np.deg2rad(265))]])
    want_idx = [[1, 0, 2], [7, 6, 0]]       # 12 deg: 10, 0, 30; 265 deg: 270, 180, 0 (= 360)
    want_sim = np.cos(np.deg2rad([[2, 12, 18], [5, 85, 95]]))
    for bank_chunk, query_chunk in [(100, 100), (3, 1), (1, 2)]:
        sims, idx = knn_search(bank, queries, 3, bank_chunk, query_chunk)
        assert idx.tolist() == want_idx
        assert np.allclose(sims.numpy(), want_sim, atol=1e-6)
    sims, idx = knn_search(torch.from_numpy(bank), queries, 20, 3, 1)      # k above the bank size
    assert idx.shape == (2, 8) and sorted(idx[0].tolist()) == list(range(8))


def test_vote_weights_by_similarity_and_temperature():
    sims = torch.tensor([[0.9, 0.5, 0.5]])
    labels = torch.tensor([[1, 0, 0]])
    # T = 0.07: exp(0.9/0.07) = 3.8e5 beats 2 exp(0.5/0.07) = 2.5e3; T = 10: two neighbours beat one.
    assert knn_vote(sims, labels, 3, 0.07).argmax().item() == 1
    assert knn_vote(sims, labels, 3, 10.0).argmax().item() == 0
    scores = knn_vote(sims, labels, 3, 0.5)
    assert scores[0, 1].item() == pytest.approx(np.exp(1.8))
    assert scores[0, 0].item() == pytest.approx(2 * np.exp(1.0))
    assert scores[0, 2].item() == 0.0


def test_k_from_params_decides_the_vote(tmp_path):
    """One bank row of class 0 right on the query and five of class 1 a little further: the
    nearest two neighbours say 0 (exp(1 / 0.07) > exp(cos 10 deg / 0.07)), three or more say 1
    (exp(cos 10 deg / 0.07) + exp(cos 11 deg / 0.07) > exp(1 / 0.07)).
    The k of params.yaml (or, without the key, the default) is the k that votes."""
    deg = np.deg2rad
    angles = [0.0, 10, 11, 12, 13, 14] + list(np.linspace(170, 180, 18))
    bank = np.stack([np.cos(deg(angles)), np.sin(deg(angles))], 1).astype(np.float32)
    bank_y = np.array([0] + [1] * 5 + [2] * 18)
    query, target = np.array([[1.0, 0.0]], np.float32), np.array([0])
    params = tmp_path / "params.yaml"
    for k, top1 in ((1, 100.0), (2, 100.0), (3, 0.0), (24, 0.0)):
        params.write_text(f"oknn:\n  k: {k}\n")
        cfg = load_section(OknnConfig, "oknn", params)
        assert knn_classify(bank, bank_y, query, target, 3, cfg)[1] == top1, k
    params.write_text("oknn:\n  temperature: 0.07\n")
    cfg = load_section(OknnConfig, "oknn", params)
    assert cfg.k >= 3 and knn_classify(bank, bank_y, query, target, 3, cfg) == {1: 0.0, 5: 100.0}


def test_topk_accuracy_known_answers():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]])
    targets = torch.tensor([1, 1, 0, 0])     # ranks 1, 2, 3, 1
    assert topk_accuracy(scores, targets, (1, 2, 3)) == {1: 50.0, 2: 75.0, 3: 100.0}
    # classes without a vote are not predictions, even when topk lists them
    votes = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert topk_accuracy(votes, torch.tensor([0, 2]), (1, 4)) == {1: 0.0, 4: 0.0}
    assert topk_accuracy(votes, torch.tensor([1, 3]), (1, 4)) == {1: 100.0, 4: 100.0}


def test_classify_clusters_top1_and_top5():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:6]                 # 6 classes on orthogonal axes
    bank_y = np.repeat(np.arange(6), 10)                      # 10 per class: k = 20 reaches two classes
    bank = centres[bank_y] + 0.05 * rng.standard_normal((60, 8)).astype(np.float32)
    cfg = OknnConfig(k=20, temperature=0.07, bank_chunk=50, query_chunk=7)
    q_y = np.tile(np.arange(6), 5)
    near = centres[q_y] + 0.05 * rng.standard_normal((30, 8)).astype(np.float32)
    assert knn_classify(bank, bank_y, near, q_y, 6, cfg) == {1: 100.0, 5: 100.0}
    # Each query sits closer to the next class than to its own: its 20 neighbours are the 10 of
    # the next class and its own 10, so top-1 is always wrong and top-2 (hence top-5) right.
    shifted = 0.8 * centres[(q_y + 1) % 6] + 0.5 * centres[q_y]
    assert knn_classify(bank, bank_y, shifted, q_y, 6, cfg) == {1: 0.0, 5: 100.0}
    # A class absent from the bank is never predicted.
    assert knn_classify(bank, bank_y, near[:6], np.full(6, 7), 8, cfg) == {1: 0.0, 5: 0.0}


def test_eligible_skips_crowd_and_tiny_boxes():
    boxes = np.array([[0, 0, 50, 50], [0, 0, 7.9, 50], [0, 0, 50, 50], [10, 10, 18, 18]], np.float32)
    m = eligible(boxes, np.array([False, False, True, False]), 8.0)
    assert m["keep"].tolist() == [True, False, False, True]
    assert m["tiny"].tolist() == [False, True, False, False]
    assert m["crowd"].tolist() == [False, False, True, False]


def test_select_bank_caps_per_image_and_takes_rare_classes_first():
    # image 0: 12 objects of class 0 and one of class 1; image 1: classes 0, 2, 2, 3
    image = np.array([0] * 13 + [1] * 4)
    label = np.array([0] * 12 + [1] + [0, 2, 2, 3])
    sel = select_bank(image, label, 2, seed=0)
    assert (np.bincount(image[sel]) <= 2).all()
    assert 12 in sel and sum(label[sel[image[sel] == 0]] == 0) == 1      # the single class-1 object is kept
    assert sorted(label[sel[image[sel] == 1]]) == [2, 3]                 # classes 2 and 3 are rarer than 0
    sel3 = select_bank(image, label, 3, seed=0)
    assert sorted(label[sel3[image[sel3] == 1]]) == [0, 2, 3]            # one object per class before repeats
    assert len(select_bank(image, label, 100, seed=0)) == len(image)
    with pytest.raises(ValueError):
        select_bank(image, label, 0, seed=0)


def test_select_bank_is_seeded():
    rng = np.random.default_rng(1)
    image = np.sort(rng.integers(0, 50, 400))
    label = rng.integers(0, 5, 400)
    a, b = select_bank(image, label, 3, seed=7), select_bank(image, label, 3, seed=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, select_bank(image, label, 3, seed=8))


def test_disturb_keeps_box_pixels_and_replaces_all_others():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    donor = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    boxes = np.array([[3.2, 4.7, 10.1, 20.0], [30.0, 30.0, 50.0, 40.0]])
    out = disturb(image, boxes, donor)
    inside = np.zeros((40, 50), bool)
    inside[4:20, 3:11] = True        # floor(start) .. ceil(end)
    inside[30:40, 30:50] = True
    assert np.array_equal(box_mask(40, 50, boxes), inside)
    assert np.array_equal(out[inside], image[inside])
    assert np.array_equal(out[~inside], donor[~inside])
    with pytest.raises(ValueError, match="donor"):
        disturb(image, boxes, donor[:10])


def test_pick_donors_never_picks_the_image_itself():
    d = pick_donors(500, seed=0)
    assert (d != np.arange(500)).all() and d.min() >= 0 and d.max() < 500
    assert len(np.unique(d)) > 250


def test_disturbed_dataset_keeps_box_pixels_of_the_decoded_image(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(60, 80), (70, 50)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    boxes = [np.array([[10.5, 5.0, 30.0, 40.2]], np.float32), np.array([[0.0, 0.0, 20.0, 20.0]], np.float32)]
    sizes = [(60, 80), (70, 50)]
    ds = RegionImages(paths, sizes, sizes, boxes, donor_paths=[paths[1], paths[0]])
    plain = RegionImages(paths, sizes, sizes, boxes)
    for i in range(2):
        x, b, _ = ds[i]
        x0, _, _ = plain[i]
        m = torch.from_numpy(box_mask(*sizes[i], boxes[i]))
        assert torch.equal(x[:, m], x0[:, m])
        assert not torch.equal(x[:, ~m], x0[:, ~m])
        assert torch.equal(b, torch.from_numpy(boxes[i]))
    # resized to another shape, boxes follow the image
    ds2 = RegionImages(paths, sizes, [(120, 160), (35, 25)], boxes)
    assert ds2[0][0].shape == (3, 120, 160) and torch.allclose(ds2[0][1], torch.tensor([[21.0, 10.0, 60.0, 80.4]]))


def test_an_image_at_its_fed_size_is_copied_not_aliased(tmp_path, monkeypatch):
    """An image already at its fed size is not resized, and the decoder's array is read-only: the
    item must own its pixels, not alias that array (PyTorch's non-writable warning)."""
    import eval.oknn as oknn

    src = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)
    src.flags.writeable = False
    monkeypatch.setattr(oknn, "load_rgb", lambda path: src)
    sizes = [(60, 80)]
    x, _, _ = RegionImages(["unused.png"], sizes, sizes, [np.zeros((1, 4), np.float32)])[0]
    assert torch.equal(x, torch.from_numpy(src.copy()).permute(2, 0, 1))
    x.zero_()
    assert src.any()                                     # the decoder's array is untouched


def test_shape_batches_never_mix_shapes():
    shapes = [(2, 3), (4, 5), (2, 3), (2, 3), (4, 5)]
    batches = shape_batches(shapes, 2)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert all(len({shapes[i] for i in b}) == 1 and len(b) <= 2 for b in batches)


def test_oknn_stage_on_embedded_data(tiny_synth, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("oknn:\n  min_size: 96\n  max_size: 160\n  per_image: 3\n  workers: 0\n  batch_size: 4\n  k: 7\n")
    out = tmp_path / "oknn.json"
    assert main(["--backbone", "random", "--arch", "resnet18", "--coco-root", str(tiny_synth / "coco"),
                 "--out", str(out), "--params", str(params), "--device", "cpu"]) == 0
    r = json.loads(out.read_text())
    for key in ("top1", "top5", "disturbed_top1", "disturbed_top5"):
        assert 0.0 <= r[key] <= 100.0
    assert r["top5"] >= r["top1"] and r["disturbed_top5"] >= r["disturbed_top1"]
    assert r["top5"] > 0.0
    assert r["settings"]["per_image"] == 3 and r["settings"]["k"] == 7 and r["feature_dim"] == 512
    # the protocol is written beside the numbers: k as params.yaml set it
    assert r["feature"] == "c5_roialign7" and r["k"] == 7
    assert r["image_size"]["min_size"] == 96 and r["image_size"]["max_size"] == 160
    assert r["image_size"]["shorter_side_min"] <= r["image_size"]["shorter_side_max"] <= 96
    for side in ("bank", "queries"):
        c = r["object_c5_cells"][side]
        assert 0 < c["p10"] <= c["median"] <= c["p90"] and 0 <= c["under_one_cell"] <= 1
    assert r["object_c5_cells"]["stride"] == 32
    assert 0 < r["bank_objects"] <= 3 * r["bank_images"]
    assert r["queries"] > 0
    # the label-prior floor: a random bank object's label against the query labels, by hand
    from eval.oknn import read_split

    train, val = (read_split(tiny_synth / "coco", s, r["settings"]["min_box_size"]) for s in ("train2017", "val2017"))
    bank_labels = train.category[select_bank(train.image, np.searchsorted(np.unique(train.category), train.category),
                                             3, r["settings"]["seed"])]
    expected = 100.0 * np.mean([np.mean(bank_labels == c) for c in val.category])
    assert r["prior_top1"] == pytest.approx(expected)
    assert "time_s" not in r          # seconds are logged: DVC hashes this file


def test_object_cells_measures_the_shorter_side_at_the_fed_size():
    # image 0: 200x100 (h x w) fed at min_size 50 -> 100x50 (scale 0.5); image 1: 64x64 fed at 50x50
    split = Split(paths=["a", "b"], sizes=[(200, 100), (64, 64)], image=np.array([0, 0, 1]),
                  boxes=np.array([[0, 0, 100, 200], [0, 0, 18, 128], [0, 0, 64, 32]], np.float32),
                  category=np.zeros(3, np.int64), skipped={})
    cfg = OknnConfig(min_size=50, max_size=1000)
    assert fed_shapes(split, cfg) == [(100, 50), (50, 50)]
    # shorter sides at the fed size: min(50, 100) = 50, min(9, 64) = 9, min(50, 25) = 25; cells of 10 px
    c = object_cells(split, np.arange(3), cfg, 10)
    assert c["median"] == 2.5 and c["under_one_cell"] == pytest.approx(1 / 3, abs=1e-4)
    assert c["p10"] == pytest.approx(0.9 + 0.2 * 1.6) and c["p90"] == pytest.approx(2.5 + 0.8 * 2.5)
    assert object_cells(split, np.array([0]), cfg, 25)["median"] == 2.0


def test_the_embedded_settings_run_the_papers_protocol_where_c5_sees_the_objects(repo, tmp_path):
    from pipeline.synth import SynthConfig, build

    params = repo / "params.yaml"
    cfg = load_section(OknnConfig, "oknn", params)
    assert cfg.feature == "c5_roialign7"            # RoIAlign 7x7 on C5 + average pooling (paper 5.3)
    # the embedded data as params.yaml makes it, fewer images
    synth = dataclasses.replace(load_section(SynthConfig, "synth", params), images=60)
    build(synth, tmp_path / "synth", workers=1, progress=False)
    for split in ("train2017", "val2017"):
        s = read_split(tmp_path / "synth" / "coco", split, cfg.min_box_size)
        c = object_cells(s, np.arange(len(s.image)), cfg, 32)
        assert c["median"] >= 1.4 and c["under_one_cell"] <= 0.1, (split, c)    # at 128 px: 1.15 and 0.33


def train_with_labels(net: TinyStages, coco_root, cfg: OknnConfig, epochs: int, seed: int = 0) -> TinyStages:
    """Supervised training of `net` on the train2017 objects: the O-KNN region feature of every box
    (whole image at the O-KNN input size, RoIAlign on C5, pooling), a linear classifier on top."""
    train = read_split(coco_root, "train2017", cfg.min_box_size)
    classes, y = np.unique(train.category, return_inverse=True)
    ims, boxes, rows = train.by_image(np.arange(len(train.image)))
    shapes = fed_shapes(train, cfg)
    data = RegionImages([train.paths[i] for i in ims], [train.sizes[i] for i in ims], [shapes[i] for i in ims], boxes)
    items = [data[i] for i in range(len(data))]
    batches = shape_batches([tuple(x.shape[1:]) for x, _, _ in items], 8)
    head = nn.Linear(net.channels["C5"], len(classes))
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], 3e-3)
    feature, rng = region_feature(cfg.feature), np.random.default_rng(seed)
    net.train()
    for _ in range(epochs):
        for b in rng.permutation(len(batches)):
            x = torch.stack([items[i][0] for i in batches[b]])
            bx = [items[i][1] for i in batches[b]]
            if rng.random() < 0.5:                                    # horizontal flip, boxes with it
                x, w = x.flip(3), x.shape[3]
                bx = [torch.stack([w - v[:, 2], v[:, 1], w - v[:, 0], v[:, 3]], 1) for v in bx]
            target = torch.from_numpy(np.concatenate([y[rows[items[i][2]]] for i in batches[b]]))
            loss = F.cross_entropy(head(feature(net, to_input(x), bx)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def test_positive_control_a_backbone_that_knows_the_classes_beats_a_random_one(tiny_synth):
    # Through run_oknn (decoding, resizing, RoIAlign on C5, the bank, the vote): if the evaluation
    # could not see class information, training with the labels would not help.
    cfg = OknnConfig(min_size=256, max_size=427, per_image=3, workers=0, batch_size=8)
    coco = tiny_synth / "coco"
    # About 10 s of CPU. 20 epochs gave +18 top-1 on one CPU and +7.8 to +12.2 on an Intel Xeon (the
    # suite's other tests leave torch another thread count, so other reduction orders): a margin of 8
    # on 90 queries was a coin toss there. 40 epochs gave +15.6 there; the thread count is pinned
    # here and restored, so the result does not depend on which tests ran before.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trained = run_oknn(train_with_labels(TinyStages(seed=0), coco, cfg, epochs=40), coco, cfg, torch.device("cpu"))
        random = run_oknn(TinyStages(seed=0), coco, cfg, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert trained["queries"] == random["queries"] > 50
    assert trained["top1"] >= random["top1"] + 8, (trained["top1"], random["top1"])
    assert trained["top5"] >= random["top5"] + 8, (trained["top5"], random["top5"])
    assert trained["disturbed_top1"] > random["disturbed_top1"]
    assert trained["top1"] > 2 * trained["prior_top1"]
