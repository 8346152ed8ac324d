"""Shared test setup: no global caches, explicit seeds, small CPU budgets."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from advpipe.models.registry import MODELS, register_model

#: a small BN CNN that tests train in seconds (test_eval, test_report)
TINY_CNN = "test-tiny-cnn"


def _tiny_cnn(num_classes: int, image_size: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )  # fmt: skip


if TINY_CNN not in MODELS:
    register_model(TINY_CNN)(_tiny_cnn)


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``cuda`` marker (tests/test_cuda.py; benchmarks/gpu/run_kit.py runs ``-m cuda``)."""
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one (docs/gpu.md)")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: several times faster when the 2 cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point advpipe's cache at a fresh folder so tests never read or write ~/.cache."""
    os.environ["ADVPIPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("advpipe-cache"))
    os.environ.pop("ADVPIPE_DATA_DIR", None)
