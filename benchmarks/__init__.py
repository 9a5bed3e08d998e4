"""Speed and behaviour measurements; each script writes its settings and figures as JSON."""
from __future__ import annotations

import json
import logging
from pathlib import Path


def write_json(path: str | Path, result: dict, log: logging.Logger) -> None:
    """Write a benchmark's result (settings and figures) to `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", path)
