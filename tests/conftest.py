"""Shared test setup: no global caches, explicit seeds, small CPU budgets."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point advpipe's cache at a fresh folder so tests never read or write ~/.cache."""
    os.environ["ADVPIPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("advpipe-cache"))
    os.environ.pop("ADVPIPE_DATA_DIR", None)
