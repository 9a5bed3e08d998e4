"""A pre-training run's training curves, copied beside its results for the report.

The report draws every run's loss against step. Reading the runs' dvclive logs directly would make
the report stage depend on one folder per method and seed, a list DVC templating cannot build from
`seeds`; instead one `trainlog@<method>-<seed>` stage per run (a matrix over the same methods and
seeds as pre-training) copies the curves into `reports/models/<method>/seed<seed>/train/`, and
the report depends on `reports/models` alone.

    python -m eval.trainlog --dvclive runs/d3ssl/seed0/dvclive/plots/metrics \\
        --out reports/models/d3ssl/seed0/train

Copies `train/loss.tsv` (required) and `train/loss_chance.tsv` (InfoNCE methods only) unchanged:
dvclive's `step<TAB>value` rows.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline import cli
from pipeline.files import write_text

log = logging.getLogger(__name__)

SERIES = ("loss", "loss_chance")       # the curves the report draws; the first is required


def copy_series(dvclive: Path, out: Path) -> list[str]:
    """Copy the SERIES files of `dvclive/train/` into `out`; returns the names copied."""
    src = Path(dvclive) / "train"
    required = src / f"{SERIES[0]}.tsv"
    if not required.is_file():
        raise FileNotFoundError(f"missing training log {required}: run its pretrain stage first (dvc repro)")
    copied = []
    for name in SERIES:
        f = src / f"{name}.tsv"
        if f.is_file():
            write_text(Path(out) / f.name, f.read_text())
            copied.append(f.name)
    return copied


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m eval.trainlog", __doc__)
    p.add_argument("--dvclive", required=True, type=Path,
                   help="a run's dvclive metrics folder (runs/<method>/seed<s>/dvclive/plots/metrics)")
    p.add_argument("--out", required=True, type=Path, help="folder to copy the curves into")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    try:
        copied = copy_series(args.dvclive, args.out)
    except FileNotFoundError as e:
        log.error("%s", e)
        return 1
    log.info("wrote %s: %s", args.out, ", ".join(copied))
    return 0


if __name__ == "__main__":
    sys.exit(main())
