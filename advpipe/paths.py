"""Default locations that several layers agree on (a ground module: it imports nothing of advpipe)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "default_run_dir"]


def default_run_dir(data: str, model: str, aug: str) -> Path:
    """Where a run of ``model`` on ``data`` with ``aug`` lives when no ``--out`` is given."""
    return Path("runs") / data / model / aug.replace("+", "_")


def cache_dir() -> Path:
    """Return advpipe's cache folder: ``$ADVPIPE_CACHE_DIR`` or ``~/.cache/advpipe``."""
    return Path(os.environ.get("ADVPIPE_CACHE_DIR") or Path.home() / ".cache" / "advpipe")
