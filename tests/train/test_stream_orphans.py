"""Loader processes must not outlive a trainer killed with SIGKILL (issue 18, item 5)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def descendants(root: int) -> set[int]:
    """Live (non-zombie) processes below `root`, found by scanning /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_state(int(entry))
            if info and info[1] != "Z":
                parent[int(entry)] = info[0]
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def alive(pid: int) -> bool:
    info = _ppid_and_state(pid)
    return info is not None and info[1] != "Z"


@pytest.mark.parametrize("start_method", ["forkserver", "fork"])
def test_loader_processes_exit_when_the_trainer_is_killed(shards, tmp_path, start_method):
    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\n"
        "from pipeline import shardset\n"
        "from train.stream import LoaderConfig, make_loader\n"
        "from train.views import ViewConfig\n"
        "if __name__ == '__main__':\n"
        "    urls, total = shardset.shards(sys.argv[1])\n"
        "    cfg = LoaderConfig(batch_size=4, workers=1, shuffle_buffer=8, resampled=True,\n"
        f"                       start_method={start_method!r}, views=ViewConfig(size=64, small_size=32))\n"
        "    it = iter(make_loader(urls, cfg, seed=0, total_samples=total))\n"
        "    next(it)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    trainer = subprocess.Popen([sys.executable, str(script), str(shards)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    children: set[int] = set()
    try:
        line = trainer.stdout.readline()
        assert line.strip() == "ready", trainer.stderr.read()[-3000:] if trainer.poll() is not None else line
        children = descendants(trainer.pid)      # the worker; with forkserver also the server and tracker
        assert children, "no loader worker processes found"
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=5)
        # A leaked worker of this endless (resampled) loader never exits, so a long deadline costs the
        # test no power; 5 s failed once on a loaded CI machine while the forkserver, which preloads
        # torch, cv2 and pyarrow, was still finalising.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in children):
            time.sleep(0.1)
        left = {p: cmdline(p) for p in children if alive(p)}
        assert not left, f"loader processes outlived the trainer by 30 s: {left}"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
