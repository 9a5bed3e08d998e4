"""Atomic file and folder writes, shared by every stage.

A stage writes each output under a temporary name beside its final place and renames it when it is
complete, so a killed run never leaves a file that looks finished (`os.replace` is atomic on one
file system).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def tmp_basename(name: str) -> str:
    """The unique temporary name a write of `name` goes under: `.NAME.tmp-xxxxxxxx` (hidden, and
    recognisable as a killed writer's leftover)."""
    return f".{name}.tmp-{uuid.uuid4().hex[:8]}"


def tmp_name(path: Path) -> Path:
    """A unique temporary sibling of `path` (same folder, so the final rename is atomic)."""
    return path.with_name(tmp_basename(path.name))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces the folder `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_bytes(path: str | Path, data: bytes, atomic=atomic_path) -> None:
    """Write `data` to `path` through `atomic` (a context manager like `atomic_path`, which
    `pipeline.storage` swaps for its own to take URLs too)."""
    with atomic(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, atomic=atomic_path) -> None:
    """Write `text` to `path` through `atomic` (see `write_bytes`)."""
    with atomic(path) as tmp:
        tmp.write_text(text)
