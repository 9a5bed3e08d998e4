"""How often a query's own image has keys in the queue, on the embedded pre-training stream.

    python -m benchmarks.queue_duplicates [--params params.yaml] [--shards data/shards]
        [--out benchmarks/results/queue_duplicates.json]

Replays the sample order of a whole run (every epoch of `train.stream`, as the trainer draws them:
resampled shards, the shuffle buffer, seed `pretrain.seed`) without decoding images, and for each
queue method counts the share of a batch's images that have a key in the queue the batch is
contrasted with. The queue holds the last `queue_size` keys; a step enqueues 2 keys per image for
MoCo v2 (k1, k2) and 2 per proposal for D3SSL (t1, t2), taken here as `num_proposals` per image,
the most (fewer proposals make the window longer, so the D3SSL share is a lower bound). Such keys
are other views of the query's own image; `methods.<name>.exclude_same_image` leaves them out of
the negatives (`train.losses.Queue`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import deque

from benchmarks import write_json
from pipeline import cli

log = logging.getLogger("benchmarks.queue_duplicates")


def sample_order(shards: str, params: str) -> tuple[list[str], int]:
    """Keys in training order over all epochs, and the batch size."""
    from train.pretrain import load_config
    from pipeline import shardset
    from train.stream import ShardSource, batches_per_worker, join_proposals, read_shards, shuffle

    cfg = load_config(params)
    paths, total = shardset.shards(shards)
    per_epoch = batches_per_worker(cfg.loader, total, 1) * cfg.loader.batch_size * max(cfg.loader.workers, 1)
    keys = []
    for epoch in range(cfg.epochs):
        src = ShardSource(paths, cfg.loader.resampled, cfg.seed, epoch, 0)
        stream = shuffle(join_proposals(read_shards(iter(src), {"errors": 0})), cfg.loader.shuffle_buffer,
                         cfg.seed, epoch)
        for i, sample in enumerate(stream):
            if i >= per_epoch:
                break
            keys.append(sample["__key__"])
    return keys, cfg.loader.batch_size


def share_with_own_keys(keys: list[str], batch: int, keys_per_image: int, queue_size: int) -> float:
    """Share of the batches' images with at least one key of their image among the queue's last
    `queue_size` keys when the batch is contrasted."""
    queue: deque[str] = deque(maxlen=queue_size)
    hits = total = 0
    for start in range(0, len(keys) - batch + 1, batch):
        b = keys[start:start + batch]
        held = set(queue)
        hits += sum(k in held for k in b)
        total += len(b)
        for k in b:
            queue.extend([k] * keys_per_image)
    return hits / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.queue_duplicates", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--out", default="benchmarks/results/queue_duplicates.json")
    args = p.parse_args(argv)
    cli.setup_logging()
    from train.pretrain import load_config, method_config

    cfg = load_config(args.params)
    keys, batch = sample_order(args.shards, args.params)
    per_image = {"mocov2": 2, "d3ssl": 2 * cfg.loader.views.num_proposals, "d3ssl_dc": 2 * cfg.loader.views.num_proposals}
    result = {"settings": {"params": args.params, "shards": args.shards, "images_in_shards": len(set(keys)),
                           "samples": len(keys), "batch_size": batch, "epochs": cfg.epochs}, "methods": {}}
    for name, n in per_image.items():
        queue = method_config(name, args.params).queue_size
        share = share_with_own_keys(keys, batch, n, queue)
        result["methods"][name] = {"queue_size": queue, "keys_per_image": n,
                                   "queue_spans_images": queue / n, "share_with_own_keys": round(share, 4)}
        log.info("%s: queue %d keys = %.0f images; %.1f%% of the queries' images have keys in it",
                 name, queue, queue / n, 100 * share)
    write_json(args.out, result, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
