"""Speed and behaviour measurements; each script writes its settings and figures as JSON."""
from __future__ import annotations

import json
import logging
from pathlib import Path


def save_png(fig, path: str | Path) -> None:
    """Write `fig` to `path` as a PNG, atomically (a reader never sees half a file), and close it."""
    from eval.report_plots import pyplot
    from pipeline.files import atomic_path

    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)


def write_json(path: str | Path, result: dict, log: logging.Logger) -> None:
    """Write a benchmark's result (settings and figures) to `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", path)


def first_batch(params: str, shards: str):
    """The first batch of the params' input stream over `shards` (seed 0, read in this process),
    prepared for a CPU step: what the step benchmarks time the methods on."""
    from dataclasses import replace

    import torch

    from pipeline import shardset
    from train.methods import prepare
    from train.pretrain import load_config
    from train.stream import make_stream

    loader = load_config(params).loader
    paths, total = shardset.shards(shards)
    stream = make_stream(paths, replace(loader, workers=0), seed=0, total_samples=total)
    return prepare(next(iter(stream)), torch.device("cpu"))

