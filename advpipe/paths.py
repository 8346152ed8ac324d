"""Default locations that several layers agree on (a ground module: it imports nothing of advpipe)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_run_dir"]


def default_run_dir(data: str, model: str, aug: str) -> Path:
    """Where a run of ``model`` on ``data`` with ``aug`` lives when no ``--out`` is given."""
    return Path("runs") / data / model / aug.replace("+", "_")
