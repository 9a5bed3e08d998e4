"""Time a `dvc repro` stage by stage: the figures of the README's "Results of the embedded run".

    python -m benchmarks.time_repro --out reports/timing [-- DVC_REPRO_ARGS ...]   # e.g. -- --force

Runs `dvc repro` (with the arguments after `--`), passes its output through, and writes
`OUT/dvc_repro.log` (DVC's stage lines, run or skipped, with the wall-clock time each arrived) and
`OUT/dvc_repro.json`: seconds per stage (from its "Running stage" line to DVC's next stage line,
run or skipped),
seconds per stage group (the name before `@`, e.g. all `pretrain@...` runs together), the total,
the machine's CPU count and the command. A stage DVC skipped takes no time.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from pipeline import cli
from pipeline.files import write_text

log = logging.getLogger("benchmarks.time_repro")
RUNNING = re.compile(r"Running stage '([^']+)'")


def stage_seconds(events: list[tuple[float, str]], end: float) -> dict[str, float]:
    """{stage: seconds} from (time, line) events: a stage runs from its "Running stage" line to
    the next stage line, run or skipped (or to `end`): DVC's checks of skipped stages are not
    counted as the previous stage's time."""
    out = {}
    for i, (t, line) in enumerate(events):
        if m := RUNNING.search(line):
            nxt = events[i + 1][0] if i + 1 < len(events) else end
            out[m.group(1)] = round(nxt - t, 1)
    return out


def by_group(seconds: dict[str, float]) -> dict[str, float]:
    groups: dict[str, float] = defaultdict(float)
    for name, s in seconds.items():
        groups[name.split("@")[0]] += s
    return {k: round(v, 1) for k, v in groups.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports/timing"), help="folder of the log and JSON (default: %(default)s)")
    args = p.parse_args(own)
    cli.setup_logging()

    cmd = ["dvc", "repro", *extra]
    log.info("running %s", " ".join(cmd))
    t0 = time.time()
    events: list[tuple[float, str]] = []
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            now = time.time()
            if RUNNING.search(line) or "didn't change" in line:
                events.append((now, line.strip()))
                lines.append(time.strftime("%H:%M:%S ", time.localtime(now)) + line.strip())
        rc = proc.wait()
    end = time.time()
    seconds = stage_seconds(events, end)
    total = round(end - t0, 1)
    lines.append(f"TOTAL {total:.0f} s (rc {rc})")
    write_text(args.out / "dvc_repro.log", "\n".join(lines) + "\n")
    write_text(args.out / "dvc_repro.json", json.dumps(
        {"command": " ".join(cmd), "returncode": rc, "cpus": os.cpu_count(), "total_s": total,
         "groups_s": by_group(seconds), "stages_s": seconds}, indent=2) + "\n")
    log.info("dvc repro: %.0f s (rc %d); by group: %s", total, rc, by_group(seconds))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
