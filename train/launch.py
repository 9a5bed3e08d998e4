"""Launch the pre-training stage with `pretrain.nproc_per_node` processes (the pretrain stage's cmd).

    python -m train.launch --params params.yaml --shards data/shards --out runs/d3ssl/seed0 --method d3ssl ...

Every argument goes on to `train.pretrain` unchanged. With `pretrain.nproc_per_node` 1 (the
default) this process becomes `python -m train.pretrain ARGS`; above 1 it becomes
`python -m torch.distributed.run --standalone --nproc_per_node N -m train.pretrain ARGS` (one
machine; several machines are launched by hand with torchrun, see train.pretrain).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import yaml

from pipeline import cli
from pipeline.params import ParamsError

log = logging.getLogger(__name__)


def nproc_per_node(params: Path | None) -> int:
    """`pretrain.nproc_per_node` of params.yaml (1 without a file or the key)."""
    if params is None:
        return 1
    doc = yaml.safe_load(Path(params).read_text()) or {}
    n = (doc.get("pretrain") or {}).get("nproc_per_node", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParamsError(f"{params}:pretrain.nproc_per_node is {n!r}; it must be an integer of at least 1")
    return n


def _parser(add_help: bool = True):
    """The options the launcher reads itself; every argument (these too) goes on to `train.pretrain`."""
    p = cli.parser("python -m train.launch", __doc__, add_help=add_help)
    p.add_argument("--params", type=Path, help="params.yaml: pretrain.nproc_per_node processes (passed on too)")
    return p


def command(argv: list[str]) -> list[str]:
    """The command line that runs `train.pretrain` with `argv` on this machine."""
    args, _ = _parser(add_help=False).parse_known_args(argv)
    n = nproc_per_node(args.params)
    if n == 1:
        return [sys.executable, "-m", "train.pretrain", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", "train.pretrain", *argv]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, _ = _parser().parse_known_args(argv)     # -h: this help (the run's options: python -m train.pretrain -h)
    cli.setup_logging(args.log_level)
    cmd = command(argv)
    log.info("running %s (it writes the run folder)", " ".join(cmd))
    logging.shutdown()
    os.execv(cmd[0], cmd)           # this process becomes the trainer (signals and exit status pass through)


if __name__ == "__main__":
    sys.exit(main())
