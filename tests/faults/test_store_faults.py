"""Fault injection on a finished mask store: damaged or missing chunk files, a remote store that goes away.

Damage is applied to a copy of the reference store of conftest.py. ``masks verify`` must name the
damaged chunk and ``advpipe train --aug advmask`` must refuse the store with one ``error:`` line
and exit code 2. The remote cases serve a store with ``python -m http.server`` on 127.0.0.1 and
stop (or empty) it while an in-process training run streams masks chunk by chunk.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from advpipe import progress
from advpipe.cli import app
from advpipe.data.datasets import load_dataset
from advpipe.errors import AdvpipeError
from advpipe.pipeline import streaming
from advpipe.pipeline.codecs import sample_hash
from advpipe.pipeline.writer import create_store
from advpipe.pipeline.streaming import ChunkCache, attack_mask_source
from advpipe.train.config import TrainConfig
from advpipe.train.loop import train

from .conftest import N, ZARR_WARNINGS, command_stderr, error_lines, http_server, run_advpipe, runner

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(*ZARR_WARNINGS)]

#: a remote training run must end with an error within this many seconds of its store going away
REMOTE_DEADLINE_S = 120


def _chunk_file(store: Path, array: str, chunk: int) -> Path:
    trail = "/0/0" if array == "masks" else ""  # masks are chunked (chunk, H, W); the rest (chunk,)
    return store / array / "c" / f"{chunk}{trail}"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        raise ValueError(how)


@pytest.mark.parametrize("array, chunk, how", [("masks", 1, "flip"), ("masks", 5, "truncate"),
                                               ("chunk_done", 3, "truncate")])
def test_damaged_chunk_named_by_verify_and_refused_by_training(array: str, chunk: int, how: str, faults_env,
                                                               tmp_path: Path) -> None:
    store = tmp_path / "damaged.zarr"
    shutil.copytree(faults_env["ref"], store)
    target = _chunk_file(store, array, chunk)
    _damage(target, how)

    verified = runner.invoke(app, ["masks", "verify", str(store)])
    assert verified.exit_code == 1, verified.output
    assert f"array '{array}' chunk {chunk}: file {target} is corrupt" in verified.output

    run = tmp_path / "run"
    trained = run_advpipe(["train", "--data", "embedded", "--limit", str(N), "--model", "resnet20", "--aug", "advmask",
                           "--masks", str(store), "--epochs", "1", "--batch-size", "32", "--device", "cpu",
                           "--out", str(run)], faults_env["root"])
    printed = command_stderr(trained.stderr)
    lines = error_lines(printed)
    assert trained.returncode == 2 and "Traceback" not in printed, trained.stderr[-3000:]
    # the object differs from the store's own manifest, checked as it is read (issue 24)
    assert len(lines) == 1 and str(store) in lines[0] and f"object '{array}/c/{chunk}" in lines[0] \
        and "differs from manifest" in lines[0], trained.stderr[-3000:]
    assert not (run / "last.pt").exists()  # refused before any training step


def test_missing_chunk_file_named_by_verify(faults_env, tmp_path: Path) -> None:
    store = tmp_path / "missing.zarr"
    shutil.copytree(faults_env["ref"], store)
    target = _chunk_file(store, "masks", 2)
    target.unlink()
    verified = runner.invoke(app, ["masks", "verify", str(store)])
    assert verified.exit_code == 1 and f"array 'masks' chunk 2: file {target} is missing" in verified.output


def test_training_refuses_store_with_missing_chunk_file(faults_env, tmp_path: Path) -> None:
    store = tmp_path / "missing.zarr"
    shutil.copytree(faults_env["ref"], store)
    _chunk_file(store, "masks", 2).unlink()
    ds = load_dataset("embedded", "train", limit=N)
    with pytest.raises(AdvpipeError, match=re.escape(str(store))):
        attack_mask_source(str(store), ds, torch.device("cpu"))


# --------------------------------------------------------------------------- remote store


def _write_fake_store(path: Path, n: int, chunk_size: int) -> None:
    """A complete store for the first ``n`` embedded images with seeded random masks (no attack needed)."""
    ds = load_dataset("embedded", "train", limit=n)
    gen = torch.Generator().manual_seed(7)
    masks = (torch.rand(n, 32, 32, generator=gen) < 0.1).numpy()
    hashes = sample_hash(ds.images.numpy(), layout="NCHW")
    provenance = {"dataset": {"name": ds.name, "split": ds.split, "fingerprint": ds.fingerprint},
                  "model": {"arch": "resnet20", "checkpoint_sha256": "0" * 64, "clean_accuracy": 0.5},
                  "attack": {"eps": "8/255", "steps": 1}, "seed": 0}
    with create_store(path, n=n, image_shape=tuple(ds.image_shape), chunk_size=chunk_size,
                      provenance=provenance) as writer:
        for i in writer.pending_chunks():
            a, b = writer.chunk_bounds(i)
            px = masks[a:b].reshape(b - a, -1).sum(1)
            writer.write_chunk(i, masks[a:b], ds.labels[a:b].numpy(), hashes[a:b],
                               {"success": np.ones(b - a, bool), "clean_correct": np.ones(b - a, bool), "l0": 3 * px, "l0_pixels": px,
                                "l2": np.full(b - a, 0.5, np.float32), "linf": np.full(b - a, 8 / 255, np.float32),
                                "loss": np.zeros(b - a, np.float32)})
        writer.finalize()


class _AfterFirstBatch(progress.NullReporter):
    """A progress reporter that calls ``action`` once, when training's first batch is done."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action, self.batches = action, 0

    def open(self, description: str, total: float | None, unit: str) -> progress.Task:
        if not description.startswith("epoch "):
            return super().open(description, total, unit)
        reporter = self

        class _Epoch:
            def advance(self, n: float = 1, **fields: Any) -> None:
                reporter.batches += 1
                if reporter.batches == 1:
                    reporter.action()

        return _Epoch()


def _train_in_thread(cfg: TrainConfig, deadline: float) -> tuple[BaseException | None, float]:
    """Run ``train(cfg)`` with a time limit; return (what it raised, seconds) and fail if it hangs."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            train(cfg)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(deadline)
    assert not thread.is_alive(), f"training still running {deadline} s after its store went away"
    return outcome.get("error"), time.monotonic() - started


@pytest.fixture()
def chunked_streaming(monkeypatch: pytest.MonkeyPatch) -> list[ChunkCache]:
    """Force the chunk-by-chunk path (a CIFAR-sized store would be read whole at the start); record the caches."""
    monkeypatch.setattr(streaming, "RESIDENT_LIMIT_BYTES", 0)
    caches: list[ChunkCache] = []
    real = streaming.ChunkCache

    def recording(*args: Any, **kwargs: Any) -> ChunkCache:
        caches.append(real(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(streaming, "ChunkCache", recording)
    return caches


def _remote_config(url: str, out: Path) -> TrainConfig:
    # 32 chunks of 4 masks against a cache of 24 (two windows of 8 plus 8 read ahead): the 8 batches
    # of 16 cannot all be served from what was read before the store went away.
    return TrainConfig(data="embedded", limit=128, model="resnet20", aug="advmask", masks=url, epochs=1,
                       batch_size=16, lr=0.05, out=str(out), device="cpu", workers=0)


def test_remote_store_stopped_mid_training_is_a_clear_error(chunked_streaming, tmp_path: Path) -> None:
    served = tmp_path / "served"
    _write_fake_store(served / "store.zarr", n=128, chunk_size=4)
    with http_server(served) as (server, base):
        url = f"{base}/store.zarr"

        def stop_server() -> None:
            server.terminate()
            server.wait(timeout=30)

        reporter = _AfterFirstBatch(stop_server)
        previous = progress.use_reporter(reporter)
        try:
            error, seconds = _train_in_thread(_remote_config(url, tmp_path / "run"), REMOTE_DEADLINE_S)
        finally:
            progress.use_reporter(previous)
    # streamed some batches (from chunks read before the server went), then needed one it could not read
    assert len(chunked_streaming) == 1 and 1 <= reporter.batches < 128 // 16
    assert isinstance(error, AdvpipeError), repr(error)
    message = str(error)
    assert "\n" not in message and url in message and "Cannot connect" in message, message
    assert seconds < REMOTE_DEADLINE_S
    assert not (tmp_path / "run" / "last.pt").exists()


def test_remote_store_deleted_mid_training_is_a_clear_error(chunked_streaming, tmp_path: Path) -> None:
    served = tmp_path / "served"
    _write_fake_store(served / "store.zarr", n=128, chunk_size=4)
    with http_server(served) as (_, base):
        url = f"{base}/store.zarr"
        # The server keeps answering, but the store's files are gone: every chunk read is a 404.
        reporter = _AfterFirstBatch(lambda: shutil.move(served / "store.zarr", tmp_path / "moved-away.zarr"))
        previous = progress.use_reporter(reporter)
        try:
            error, _ = _train_in_thread(_remote_config(url, tmp_path / "run"), REMOTE_DEADLINE_S)
        finally:
            progress.use_reporter(previous)
    assert reporter.batches >= 1 and (tmp_path / "moved-away.zarr").is_dir()
    assert isinstance(error, AdvpipeError) and url in str(error), repr(error)

