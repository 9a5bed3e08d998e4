"""The Ray side of the shards stage (`pipeline.shards`): one task per shard, and what happens when
a task's worker dies.

A shard whose worker dies on every retry (`shards.max_retries`; an image that segfaults a decoder
or exhausts the memory) does not end the job: each of its images is checked alone in a task of its
own (`_check_task`), those whose worker dies are listed as `worker_crashed`, and the shard is
written again without them. A shard whose worker dies after that is an error naming it. Our code
raising, or the cluster failing otherwise, is not an image's fault and ends the job
(`pipeline.raycluster.worker_died`).
"""
from __future__ import annotations

import logging

import pyarrow as pa

from pipeline import images as image_io
from pipeline import raycluster, shards
from pipeline.shard_reuse import location

log = logging.getLogger(__name__)


def _shard_task(name: str, rows: list[dict], proposals: pa.Table, out: str, jpeg_quality: int,
                failed: dict[str, str], crashed: dict[str, str]) -> tuple[dict, str]:
    """A Ray task: one shard; returns its entry and the node it ran on."""
    return shards.write_shard(name, rows, proposals, out, jpeg_quality, failed, crashed), raycluster.node_id()


def _check_task(row: dict, jpeg_quality: int) -> None:
    """A Ray task: read and check one image as packing does (after its shard's worker died); a
    failure it finds is the shard task's to list: only a worker dying here matters."""
    try:
        shards.shard_bytes(image_io.read_bytes(location(row)), row["width"], row["height"], jpeg_quality)
    except image_io.ImageFailure:
        pass



class ShardJobs:
    """The Ray tasks of one shards job and what is known of dead workers: `pending` maps each
    running task to (shard, None) for a shard's writer or (shard, row) for one image's check."""

    def __init__(self, todo: list[tuple], out: str, cfg: shards.ShardsConfig):
        import ray

        opts = dict(max_retries=cfg.max_retries, retry_exceptions=False, **raycluster.TASK_OPTIONS)
        self.write, self.check = ray.remote(**opts)(_shard_task), ray.remote(**opts)(_check_task)
        self.out, self.cfg = out, cfg
        self.shards = {name: (rows, props, failed) for name, rows, props, failed in todo}
        self.crashed: dict[str, dict[str, str]] = {}    # shard -> key -> error, once its images were checked
        self.checking: dict[str, int] = {}              # shard -> checks still running
        self.pending: dict = {}

    def submit(self, name: str) -> None:
        rows, props, failed = self.shards[name]
        ref = self.write.remote(name, rows, props, self.out, self.cfg.jpeg_quality, failed, self.crashed.get(name, {}))
        self.pending[ref] = (name, None)

    def died(self, name: str, row: dict | None, e: BaseException) -> None:
        """A task's worker died on every retry: a check names its image; a shard's first death
        starts a check of each of its images; a second death (after the checks) is an error."""
        msg = raycluster.died_message(e)
        if row is not None:
            self.crashed[name][row["key"]] = msg
            self.checked(name)
        elif name in self.crashed:
            raise RuntimeError(f"the worker writing shard {name} died again after each of its images "
                               f"was checked alone: {msg}") from e
        else:
            log.warning("the worker writing shard %s died (%s); checking its images one by one", name, msg)
            rows, _, failed = self.shards[name]
            self.crashed[name] = {}
            checks = [r for r in rows if r["key"] not in failed]
            self.checking[name] = len(checks)
            for r in checks:
                self.pending[self.check.remote(r, self.cfg.jpeg_quality)] = (name, r)
            if not checks:
                self.submit(name)

    def checked(self, name: str) -> None:
        """One check of `name`'s images ended; the last one writes the shard again."""
        self.checking[name] -= 1
        if not self.checking[name]:
            self.submit(name)


def run_tasks(todo: list[tuple], out: str, cfg: shards.ShardsConfig, ray_address: str | None,
               num_workers: int | None, progress: bool) -> tuple[dict[str, dict], dict[str, int]]:
    """Write the shards of `todo` [(name, rows, proposals, failed)] as Ray tasks; returns their
    entries by name and the count of tasks per node.

    A shard whose worker dies on every retry (an image that segfaults a decoder or exhausts the
    memory) does not end the job: each of its images is checked alone in a task of its own, those
    whose worker dies are listed as `worker_crashed`, and the shard is written again without them.
    A shard whose worker dies after that is an error naming it. Our code raising, or the cluster
    failing otherwise, is not an image's fault and ends the job."""
    import ray
    from tqdm import tqdm

    entries, nodes = {}, []
    started = raycluster.start(ray_address, num_workers, module=__name__)
    try:
        jobs = ShardJobs(todo, out, cfg)
        for name in jobs.shards:
            jobs.submit(name)
        with tqdm(total=len(jobs.shards), desc="shards", unit="shard", disable=not progress) as bar:
            while jobs.pending:
                ready, _ = ray.wait(list(jobs.pending), num_returns=1)
                name, row = jobs.pending.pop(ready[0])
                try:
                    got = ray.get(ready[0])
                except raycluster.worker_died() as e:
                    jobs.died(name, row, e)
                    continue
                if row is not None:
                    jobs.checked(name)
                    continue
                entries[name], node = got
                nodes.append(node)
                bar.update()
    finally:
        if started:
            raycluster.stop()
    return entries, raycluster.count_nodes(nodes)
