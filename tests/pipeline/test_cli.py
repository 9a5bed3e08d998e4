"""The one command-line set-up every stage uses."""
from __future__ import annotations

import logging

import pytest

from pipeline import cli


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers


def test_help_shows_defaults_and_the_log_level_flag(capsys):
    p = cli.parser("python -m x", "First paragraph.\n\nSecond paragraph.")
    p.add_argument("--images", type=int, default=1300, help="how many")
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "First paragraph." in out and "Second paragraph." not in out
    assert "(default: 1300)" in out and "--log-level" in out


def test_help_shows_one_default_per_option(capsys):
    """An option whose value comes from params.yaml (default None) or whose help states its
    default gets no second, contradictory "(default: ...)"."""
    p = cli.parser("python -m x", None)
    p.add_argument("--seed", type=int, help="random seed (default: params or 0)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--workers", type=int, default=0, help="processes (default 0: all CPUs)")
    p.add_argument("--size", type=int, default=64, help="pixels (Default: the paper's 224 / 3.5)")
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and out.count("default") == 3     # --log-level, --seed, --workers
    assert "(default: 64)" not in out                                      # "Default" says it too
    assert "random seed (default: params or 0)" in out and "(default 0: all CPUs)" in out


def test_log_level_is_case_insensitive_and_checked(monkeypatch):
    monkeypatch.delenv("D3SSL_LOG_LEVEL", raising=False)
    p = cli.parser("python -m x", None)
    assert p.parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    assert p.parse_args([]).log_level == "INFO"
    with pytest.raises(SystemExit):
        p.parse_args(["--log-level", "loud"])
    monkeypatch.setenv("D3SSL_LOG_LEVEL", "warning")
    assert cli.parser("python -m x", None).parse_args([]).log_level == "WARNING"


def test_setup_logging_sets_the_threshold_once_and_quiets_other_ranks(root_logger):
    cli.setup_logging("DEBUG")
    cli.setup_logging("DEBUG")
    assert root_logger.level == logging.DEBUG
    assert sum(getattr(h, "_d3ssl", False) for h in root_logger.handlers) == 1
    cli.setup_logging("INFO", rank=1)
    assert root_logger.level == logging.WARNING
    cli.setup_logging("ERROR", rank=1)
    assert root_logger.level == logging.ERROR
