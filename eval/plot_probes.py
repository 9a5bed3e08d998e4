"""Plot the probes of several backbones together: CR and MCS over layers (Figures 3b and 4b).

    python -m eval.plot_probes reports/random/probes.json reports/d3ssl/probes.json \
        reports/soco/probes.json --out reports/probes

Reads JSONs written by `python -m eval.probes` and writes `cr.png` and `mcs.png` in `--out`, one
line per JSON, labelled with its `name` (set by `eval.probes --name`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval.probes import plot_probes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.plot_probes", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="probes JSON files, one per backbone")
    p.add_argument("--out", required=True, type=Path, help="folder for cr.png and mcs.png")
    args = p.parse_args(argv)
    results = []
    for path in args.inputs:
        if not path.is_file():
            raise FileNotFoundError(f"probes result {path} does not exist; run python -m eval.probes first")
        r = json.loads(path.read_text())
        if "cr" not in r or "mcs" not in r:
            raise ValueError(f"{path}: not a probes result (needs 'cr' and 'mcs')")
        results.append(r)
    for written in plot_probes(results, args.out):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
