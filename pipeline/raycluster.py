"""The one way a stage starts or joins Ray (the proposals and shards stages both use it).

    started = raycluster.start(args.ray_address, args.num_workers)
    try: ...
    finally:
        if started: raycluster.stop()

- **Local** (no address given, no `RAY_ADDRESS`): a private Ray instance on this machine
  (`address="local"`, so a `ray start` cluster running on the same machine is never joined by
  accident) with `num_cpus` CPUs (default: the usable cores), no dashboard, usage statistics
  off and token authentication off (`RAY_USAGE_STATS_ENABLED=0`, `RAY_AUTH_MODE=disabled`
  unless the environment says otherwise; set when Ray starts, never at import).
- **Cluster** (`--ray-address` or `RAY_ADDRESS`, e.g. `10.0.0.1:6379`): joins it and ships the
  project code with the job (`runtime_env={"py_modules": [pipeline]}`), so the other nodes need
  only the pinned dependencies, not a checkout. The cluster decides on authentication. Workers'
  output (logs, warnings) is forwarded to the driver. Before the stage submits anything, one task
  per node imports the stage's module there and runs its `check_node()` if it defines one
  (`check_nodes`): a node that cannot run the job (a dependency missing, OpenCV without its contrib
  modules, the shipped code not importable) is an error naming the node, and every
  node holds a started worker when the stage's tasks arrive, so short tasks are not all taken by
  the node whose worker was ready first.

Tasks are submitted with `TASK_OPTIONS` (the SPREAD strategy: a cluster's nodes share the work
even when each task is short, instead of one node reusing its workers); they call `node_id()` to
say where they ran, and the stages log a count of tasks per node. `worker_died()` is what both
stages treat as an input's fault (the worker process died on every retry: a crash in a decoder or
memory exhausted); any other Ray error (our code raising, a node or object lost) ends the job.

Output folders: one run writes into a stage's output at a time. A run removes the temporary files
a killed run left there before it submits any task, so a second run writing into the same output
at the same moment would lose its temporaries (and the two would write the same parts): run one.
"""
from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

TASK_OPTIONS = {"scheduling_strategy": "SPREAD", "num_cpus": 1}
LOCAL_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def address_of(ray_address: str | None) -> str | None:
    """The cluster to join: `ray_address`, else RAY_ADDRESS, else None (start a local one)."""
    return ray_address or os.environ.get("RAY_ADDRESS") or None


def shipped_modules() -> list[str]:
    """The folders the job ships to a cluster's nodes: the `pipeline` package (every Ray task of
    the pipeline imports only `pipeline.*` and the pinned dependencies)."""
    import pipeline

    return [str(Path(pipeline.__file__).resolve().parent)]


def start(ray_address: str | None = None, num_cpus: int | None = None, module: str = "pipeline") -> bool:
    """Start a local Ray or join a cluster, unless the caller already did; True if this call
    started it (the caller then calls `stop()`). On a cluster every node is checked to import
    `module` (the stage's), see `check_nodes`."""
    import ray

    if ray.is_initialized():
        return False
    address = address_of(ray_address)
    if address:
        log.info("joining the Ray cluster at %s (shipping %s)", address, ", ".join(shipped_modules()))
        ray.init(address=address, runtime_env={"py_modules": shipped_modules()},
                 logging_level=logging.WARNING, log_to_driver=True)
        try:
            nodes = check_nodes(module)
        except BaseException:
            ray.shutdown()
            raise
        log.info("joined the Ray cluster at %s: %d nodes, %d CPUs", address, len(nodes),
                 int(ray.cluster_resources().get("CPU", 0)))
    else:
        for k, v in LOCAL_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        # log_to_driver: a worker's warnings (a decoder's, ours) reach the stage's log, as on a cluster
        ray.init(address="local", num_cpus=num_cpus or len(os.sched_getaffinity(0)), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
    return True


def _import_here(module: str) -> str:
    """A task: import `module` on this node and run its `check_node()` if it has one (what the
    stage needs beyond importing, e.g. OpenCV's contrib modules); return the node id."""
    import importlib

    check = getattr(importlib.import_module(module), "check_node", None)
    if check is not None:
        check()
    return node_id()


NODE_CHECK_TIMEOUT_S = 300     # a node's first worker may install the shipped code: minutes, not hours


def check_nodes(module: str) -> list[str]:
    """Run one task on every alive node that imports `module`; return the node ids. A node where
    that fails is a RuntimeError naming its address and the cause."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(_import_here)
    refs = [(n, task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
             .remote(module)) for n in alive]
    done = []
    for n, ref in refs:
        try:
            done.append(ray.get(ref, timeout=NODE_CHECK_TIMEOUT_S))
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"Ray node {n['NodeID'][:12]} at {n['NodeManagerAddress']} started no worker for "
                               f"{module} within {NODE_CHECK_TIMEOUT_S} s; check that node (`ray status`, its "
                               "logs under /tmp/ray/session_latest/logs)") from None
        except ray.exceptions.RayError as e:
            first = (str(getattr(e, "cause", None) or e).strip().splitlines() or [type(e).__name__])[-1]
            raise RuntimeError(f"Ray node {n['NodeID'][:12]} at {n['NodeManagerAddress']} cannot run {module}: "
                               f"{first}; install the pinned dependencies of pyproject.toml on that node") from None
    return done


def worker_died() -> tuple[type[BaseException], ...]:
    """The Ray errors of a task whose worker process died on every retry (`except worker_died()`)."""
    import ray

    return (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)


def died_message(e: BaseException) -> str:
    """A fixed, one-line reason for a worker that died on every try (Ray's own text is pages of node
    and process details). It does not count the tries: the retries are a speed setting, and an
    output must not depend on one."""
    return f"its worker died on every try ({type(e).__name__}: a crash in a decoder, or memory exhausted)"


def stop() -> None:
    import ray

    ray.shutdown()


def node_id() -> str:
    """The id of the Ray node the calling task runs on ('' outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def count_nodes(node_ids: list[str]) -> dict[str, int]:
    """Tasks per node, node ids shortened to 12 characters, sorted by id: for the run log."""
    return dict(sorted(collections.Counter(n[:12] for n in node_ids).items()))
