"""One command-line set-up for every stage: an argument parser that shows defaults, a
`--log-level` flag, and the logging configuration.

Every stage's `main()` builds its parser with `parser(...)`, parses, then calls `setup_logging`
before it does any work; library code only logs (`logging.getLogger(__name__)`), never prints.
Each stage ends with one `log.info` summary line of what it wrote.

    p = cli.parser("python -m pipeline.shards", __doc__)
    p.add_argument("--out", required=True, help="shard folder")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)

This module imports nothing heavy, so `--help` of a stage that imports torch inside `main()` stays
fast.
"""
from __future__ import annotations

import argparse
import logging
import os

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps the description's line breaks. A default of None
    (the value comes from params.yaml or the environment) is not shown as "(default: None)": the
    help says where it comes from, and a help that states its default itself is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def parser(prog: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """An argument parser for a stage: the first paragraph of `doc` as description, defaults
    shown in `--help`, and `--log-level`."""
    description = (doc or "").strip().split("\n\n")[0]
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter, **kwargs)
    p.add_argument("--log-level", default=os.environ.get("D3SSL_LOG_LEVEL", "INFO"),
                   type=str.upper, choices=LEVELS,
                   help="logging threshold (environment: D3SSL_LOG_LEVEL)")
    return p


def setup_logging(level: str = "INFO", *, rank: int = 0) -> None:
    """Configure the root logger: the threshold and one stderr handler with the project's format.

    Ranks other than 0 log warnings and errors only, so a multi-process run prints one progress
    stream. Calling it again changes the threshold without adding a second handler, and handlers
    others installed (pytest's log capture, a notebook's) are left in place."""
    threshold = getattr(logging, level.upper())
    if rank != 0:
        threshold = max(threshold, logging.WARNING)
    root = logging.getLogger()
    root.setLevel(threshold)
    if not any(getattr(h, "_d3ssl", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._d3ssl = True  # type: ignore[attr-defined]
        root.addHandler(handler)
