"""How fast the embedded data is made, and how hard its classes are.

    python -m benchmarks.bench_synth [--images 300] [--data data/synth | --build params.yaml] [--json out.json]

1. Speed: images/s of `pipeline.synth.build` with 1 and 2 worker processes (same settings, same
   process), and the ratio (`--images 0` skips it).
2. Difficulty, on the COCO-layout splits of `--data`, or of a set built afresh from the `synth`
   section of `--build` (train objects as the bank, val objects as the queries):
   - the floor: the majority-class rate (share of the most frequent val class) and the rate of
     guessing by the bank's class frequencies (what a kNN vote on uninformative features tends to);
   - colour alone: per-box mean RGB and an 8-bin hue histogram, by a 20-NN cosine vote as in O-KNN
     and by a logistic regression;
   - a randomly initialised ResNet-18 (weights=None): RoIAlign 14x14 on C4, res5, average
     pooling, 20-NN vote;
   - learnable: a small CNN trained with labels on 64x64 box crops for a fixed number of steps.
   A class is its shape and texture pattern, so colour alone should stay at the floor and the
   supervised CNN far above it.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.readers import read_coco
from pipeline.params import as_dict, load_section
from pipeline.synth import SynthConfig, build


def bench_speed(images: int) -> dict:
    out = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            build(SynthConfig(images=images, seed=1), Path(d) / "s", workers=workers, progress=False)
            out[workers] = images / (time.perf_counter() - t0)
    return {"images_per_s_1_worker": out[1], "images_per_s_2_workers": out[2], "speedup": out[2] / out[1]}


def load_objects(data: Path, split: str):
    res = read_coco(data / "coco" / "annotations" / f"instances_{split}.json", data / "coco" / split)
    boxes = res.boxes.to_pandas()
    paths = dict(zip(res.images.column("key").to_pylist(), res.images.column("path").to_pylist()))
    return boxes, paths


def knn_accuracy(bank: np.ndarray, bank_y: np.ndarray, q: np.ndarray, q_y: np.ndarray, k: int = 20, t: float = 0.07) -> float:
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True).clip(1e-8)
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-8)
    sim = q @ bank.T
    idx = np.argsort(-sim, axis=1)[:, :k]
    classes = np.unique(bank_y)
    votes = np.zeros((len(q), classes.max() + 1))
    for j in range(k):
        np.add.at(votes, (np.arange(len(q)), bank_y[idx[:, j]]), np.exp(sim[np.arange(len(q)), idx[:, j]] / t))
    return float((votes.argmax(1) == q_y).mean())


def floor_rates(ytr: np.ndarray, yva: np.ndarray) -> dict:
    """Accuracy without looking at the objects: always the most frequent val class, and guessing
    by the bank's class frequencies."""
    n = int(max(ytr.max(), yva.max())) + 1
    ptr, pva = np.bincount(ytr, minlength=n) / len(ytr), np.bincount(yva, minlength=n) / len(yva)
    return {"majority": float(pva.max()), "prior_guess": float(ptr @ pva)}


def logistic_accuracy(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(xtr)
    lr = LogisticRegression(max_iter=2000).fit(sc.transform(xtr), ytr)
    return float((lr.predict(sc.transform(xva)) == yva).mean())


def colour_features(boxes, paths) -> np.ndarray:
    feats = []
    cache = {}
    for r in boxes.itertuples():
        im = cache.setdefault(r.key, cv2.cvtColor(cv2.imread(paths[r.key]), cv2.COLOR_BGR2RGB))
        crop = im[int(r.y1):int(np.ceil(r.y2)), int(r.x1):int(np.ceil(r.x2))]
        hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)
        hist = np.histogram(hsv[..., 0], bins=8, range=(0, 180))[0] / hsv[..., 0].size
        feats.append(np.concatenate([crop.reshape(-1, 3).mean(0) / 255.0, hist]))
    return np.array(feats) - np.array(feats).mean(0)


def random_resnet_features(boxes, paths, seed: int = 0) -> np.ndarray:
    """Region features of a seeded random ResNet-18: RoIAlign 14x14 on C4, res5, average pooling
    (`eval.backbone.c4_roialign14_res5`, the pre-training region head)."""
    import torch

    from eval.backbone import ResNetStages, build_resnet, c4_roialign14_res5, to_input

    stages = ResNetStages(build_resnet("resnet18", "random", seed=seed)).eval()
    feats = []
    with torch.no_grad():
        for key, g in boxes.groupby("key", sort=False):
            im = cv2.cvtColor(cv2.imread(paths[key]), cv2.COLOR_BGR2RGB)
            x = to_input(torch.from_numpy(im).permute(2, 0, 1)[None])
            rois = torch.tensor(g[["x1", "y1", "x2", "y2"]].to_numpy(), dtype=torch.float32)
            feats.append((g.index.to_numpy(), c4_roialign14_res5(stages, x, [rois]).numpy()))
    out = np.zeros((len(boxes), 512), np.float32)
    for idx, f in feats:
        out[boxes.index.get_indexer(idx)] = f
    return out


def crops(boxes, paths, size: int = 64) -> np.ndarray:
    cache, out = {}, []
    for r in boxes.itertuples():
        im = cache.setdefault(r.key, cv2.cvtColor(cv2.imread(paths[r.key]), cv2.COLOR_BGR2RGB))
        c = im[int(r.y1):int(np.ceil(r.y2)), int(r.x1):int(np.ceil(r.x2))]
        out.append(cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def supervised_accuracy(xtr, ytr, xva, yva, steps: int = 600, seed: int = 0) -> float:
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    n_cls = int(max(ytr.max(), yva.max())) + 1
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(128, n_cls),
    )
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    xt = torch.from_numpy(xtr).permute(0, 3, 1, 2).float() / 255
    yt = torch.from_numpy(np.array(ytr)).long()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(xt), (64,), generator=g)
        x = xt[i]
        flip = torch.rand(len(x), generator=g) < 0.5
        x[flip] = x[flip].flip(3)
        loss = nn.functional.cross_entropy(net(x), yt[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(xva).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    return float((pred == yva).mean())


def difficulty(data: Path, steps: int) -> dict:
    btr, ptr = load_objects(data, "train2017")
    bva, pva = load_objects(data, "val2017")
    labels = sorted(set(btr.label) | set(bva.label))
    ytr = btr.label.map(labels.index).to_numpy()
    yva = bva.label.map(labels.index).to_numpy()
    out: dict = {"bank_objects": len(btr), "query_objects": len(bva), "classes": len(labels)}
    out.update(floor_rates(ytr, yva))
    print(f"objects: bank {len(btr)}, queries {len(bva)}, classes {len(labels)}; majority-class rate "
          f"{out['majority']:.3f}, guessing by class frequency {out['prior_guess']:.3f}")
    t0 = time.perf_counter()
    ctr, cva = colour_features(btr, ptr), colour_features(bva, pva)
    out["colour_knn"] = knn_accuracy(ctr, ytr, cva, yva)
    out["colour_logistic"] = logistic_accuracy(ctr, ytr, cva, yva)
    print(f"colour alone: 20-NN {out['colour_knn']:.3f}, logistic regression {out['colour_logistic']:.3f}")
    out["random_resnet18_knn"] = knn_accuracy(random_resnet_features(btr, ptr), ytr,
                                              random_resnet_features(bva, pva), yva)
    print(f"random ResNet-18 (C4+res5), 20-NN: {out['random_resnet18_knn']:.3f}")
    out["supervised_cnn_steps"] = steps
    out["supervised_cnn"] = supervised_accuracy(crops(btr, ptr), ytr, crops(bva, pva), yva, steps=steps)
    print(f"supervised small CNN on crops ({steps} steps): {out['supervised_cnn']:.3f}")
    out["seconds"] = time.perf_counter() - t0
    print(f"({out['seconds']:.0f} s for the difficulty measurements)")
    return out


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=300, help="images for the speed measurement (0: skip it)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, default=Path("data/synth"), help="a built embedded data set")
    src.add_argument("--build", type=Path, metavar="PARAMS_YAML",
                     help="build a fresh set from this file's 'synth' section (in a temporary folder)")
    p.add_argument("--steps", type=int, default=600, help="training steps of the supervised CNN")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    res: dict = {}
    if args.images:
        res["speed"] = bench_speed(args.images)
        print("speed:", res["speed"])
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if args.build:
            cfg = load_section(SynthConfig, "synth", args.build)
            res["built"] = {"params": str(args.build), "config": as_dict(cfg)}
            data = Path(tmp) / "synth"
            build(cfg, data, progress=False)
        else:
            res["data"] = str(data)
        res["difficulty"] = difficulty(data, args.steps)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
