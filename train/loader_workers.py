"""The loader's worker processes: how they start (`context`), what the forkserver preloads
(`main_imports`), and how each worker sets itself up (`worker_init`) and ends with the trainer
(`exit_with`). `train.stream.make_loader` hands these to its DataLoader.
"""
from __future__ import annotations

import os

import torch

STREAM_MODULE = "train.stream"     # what the forkserver imports: the stream and all it imports


def context(start_method: str):
    """The multiprocessing context for loader workers. The forkserver imports the stream's module
    (and so torch, cv2, webdataset) once, when it starts, and the main module's imports too: every
    worker runs the main module again (as `__mp_main__`), and without its imports cached the
    trainer's (torchvision, dvclive) delay each epoch's first batch by about a second
    (`benchmarks/results/step_costs.json`, `python -m benchmarks.bench_step_costs`)."""
    ctx = torch.multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # pyarrow.dataset: parquet reads
        ctx.set_forkserver_preload([STREAM_MODULE, "pyarrow.dataset", *main_imports()])
    return ctx


def main_imports() -> list[str]:
    """The modules the main module imported (its top-level names bound to a module, or to an object
    of one), for the forkserver to import, under `python -m` (every stage's way of running). Not the
    main module itself: a worker runs it again under its module name, and finding it imported
    already, runpy warns ("found in sys.modules ... unpredictable behaviour"). A script run from a
    path is left out (its workers import its imports)."""
    import sys
    import types

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is None or spec.name in ("__main__", "__mp_main__"):
        return []
    names = set()
    for value in vars(main).values():
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and name in sys.modules and name not in (spec.name, "__main__", "builtins"):
            names.add(name)
    return sorted(names)


def worker_init(_: int, trainer_pid: int | None = None) -> None:
    import cv2

    cv2.setNumThreads(1)     # one thread per loader worker: workers, not threads, use the cores
    torch.set_num_threads(1)
    if trainer_pid is not None:
        exit_with(trainer_pid)


def exit_with(trainer_pid: int) -> None:
    """End this worker when the trainer process `trainer_pid` ends, however it ends. A forkserver
    worker's parent is the forkserver, not the trainer, so neither torch's watchdog (which watches
    the parent) nor a parent-death signal notices a trainer killed with SIGKILL; and the forkserver
    stays up as long as a worker holds its alive pipe. Once the workers exit, so do the forkserver
    and the resource tracker. Watches a pidfd (no pid reuse; fires for an unreaped zombie too), or
    polls the pid each second where pidfds are missing."""
    import select
    import threading

    try:
        fd = os.pidfd_open(trainer_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                try:
                    os.kill(trainer_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                threading.Event().wait(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-trainer", daemon=True).start()
