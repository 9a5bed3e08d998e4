"""Plot the probes of several backbones together: CR and MCS over layers (Figures 3b and 4b).

    python -m eval.plot_probes reports/random/probes.json reports/d3ssl/probes.json \
        reports/soco/probes.json --out reports/probes

Reads JSONs written by `python -m eval.probes` and writes `cr.png` and `mcs.png` in `--out`, one
line per JSON, labelled with its `name` (set by `eval.probes --name`).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from eval.probes import plot_probes
from pipeline import cli

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m eval.plot_probes", __doc__)
    p.add_argument("inputs", nargs="+", type=Path, help="probes JSON files, one per backbone")
    p.add_argument("--out", required=True, type=Path, help="folder for cr.png and mcs.png")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    results = []
    for path in args.inputs:
        if not path.is_file():
            raise FileNotFoundError(f"probes result {path} does not exist; run python -m eval.probes first")
        r = json.loads(path.read_text())
        if "cr" not in r or "mcs" not in r:
            raise ValueError(f"{path}: not a probes result (needs 'cr' and 'mcs')")
        results.append(r)
    written = plot_probes(results, args.out)
    log.info("wrote %s: CR and MCS plots of %d backbone(s)", ", ".join(str(w) for w in written), len(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
