"""Fault injection on ``advpipe precompute-masks``: SIGKILL, a killed dask worker, disk full, a read-only target.

Every run uses the reference configuration of conftest.py (96 embedded images, chunks of 8, two
attack steps) and is compared with the uninterrupted reference store array by array. Runs are
real subprocesses, so SIGKILL is real; the disk-full and read-only cases mount a small tmpfs
(root only; skipped elsewhere).
"""

from __future__ import annotations

import dataclasses
import random
import signal
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pytest
import torch

from advpipe.data.datasets import load_dataset
from advpipe.models.checkpoint import load_checkpoint
from advpipe.pipeline.precompute import checkpoint_victim, worker_split
from advpipe.pipeline.precompute_config import PrecomputeConfig, attack_config
from advpipe.pipeline.precompute_runner import ChunkTask
from advpipe.pipeline.reader import open_store
from advpipe.pipeline.writer import create_store
from advpipe.files import sha256_file

from .conftest import (
    CHUNK,
    AdvpipeProcess,
    N,
    N_CHUNKS,
    ZARR_WARNINGS,
    assert_done_chunks_match,
    assert_same_store,
    command_stderr,
    done_chunks,
    error_lines,
    precompute_args,
    remount,
    run_advpipe,
    store_arrays,
    tmpfs,
    verify_ok,
    wait_for_chunks,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(*ZARR_WARNINGS)]

PAGE = 4096  # tmpfs charges whole pages, even for a 20-byte chunk file


def _lock(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


# --------------------------------------------------------------------------- SIGKILL


def test_sigkill_at_five_moments_then_resume_equals_uninterrupted(faults_env, tmp_path: Path) -> None:
    root, ref = faults_env["root"], faults_env["ref"]
    out = tmp_path / "killed.zarr"
    args = precompute_args(out, "--workers", "0")
    rng = random.Random(20240611)
    # Kill once at least k chunks are done, k from a seeded draw, plus a seeded delay that lands the
    # SIGKILL anywhere in the next chunk: in the attack, or while its arrays are being written.
    targets = sorted(rng.sample(range(1, 8), 5))
    killed_at: list[int] = []
    for target in targets:
        k = max(target, done_chunks(out) + 1)
        with AdvpipeProcess(args, root) as proc:
            wait_for_chunks(proc, out, k)
            time.sleep(rng.uniform(0.0, 1.0) * faults_env["chunk_seconds"])
            assert proc.poll() is None, f"the run finished before it could be killed after {k} chunks"
            assert proc.kill(signal.SIGKILL) == -signal.SIGKILL
        partial = open_store(out)
        assert partial.provenance["status"] == "in-progress"
        done = assert_done_chunks_match(out, ref)  # every chunk marked done is whole and right
        assert k <= done.sum() < N_CHUNKS and done.sum() == done_chunks(out)
        assert (np.flatnonzero(done) == np.arange(done.sum())).all()  # --workers 0 runs chunks in order
        killed_at.append(int(done.sum()))

    resumed = run_advpipe(args, root)  # the dead writer's lock is stale and is taken over
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{killed_at[-1]} of {N_CHUNKS} chunks were already done" in resumed.stdout
    assert_same_store(out, ref)
    assert len(open_store(out).provenance["resumed"]) == 5
    assert not _lock(out).exists()
    verify_ok(out)


# --------------------------------------------------------------------------- dask workers


def test_killed_dask_worker_run_finishes_or_resumes_to_reference(faults_env, tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")  # a dependency of dask.distributed
    root, ref = faults_env["root"], faults_env["ref"]
    out = tmp_path / "worker-killed.zarr"
    args = precompute_args(out, "--workers", "2")
    with AdvpipeProcess(args, root) as proc:
        wait_for_chunks(proc, out, 1)
        # Let the worker that finished report its chunk and start the next, so the one we kill
        # is in the middle of a chunk (a kill between a chunk's write and its report is
        # test_rerun_of_a_chunk_already_done_is_harmless's case).
        time.sleep(0.3 * faults_env["chunk_seconds"])
        # LocalCluster's nannies run in the precompute process; each spawns its worker as a child.
        workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2, [c.cmdline() for c in psutil.Process(proc.pid).children()]
        assert done_chunks(out) < N_CHUNKS, "the run finished before a worker could be killed"
        workers[0].send_signal(signal.SIGKILL)
        result = proc.finish(timeout=600)
    if result.returncode == 0:
        # dask rescheduled the lost chunk on the surviving (or restarted) worker
        assert f"attacked {N} images in {N_CHUNKS} chunks" in result.stdout, result.stdout
    else:
        assert result.returncode == 2 and len(error_lines(result.stderr)) == 1, result.stderr[-3000:]
        rerun = run_advpipe(args, root)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "chunks were already done" in rerun.stdout
    assert_same_store(out, ref)
    verify_ok(out)


def test_two_worker_cluster_equals_in_process_run(faults_env, tmp_path: Path) -> None:
    """Randomness is keyed by chunk, so which worker ran which chunk leaves no trace in the store."""
    root, ref = faults_env["root"], faults_env["ref"]
    out = tmp_path / "two-workers.zarr"
    result = run_advpipe(precompute_args(out, "--workers", "2"), root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_store(out, ref)


def test_rerun_of_a_chunk_already_done_is_harmless(faults_env, tmp_path: Path) -> None:
    """dask runs a task again when its worker dies before reporting it: the chunk may already be written."""
    ref, ckpt = faults_env["ref"], faults_env["ckpt"]
    prov = open_store(ref).provenance
    ds = load_dataset("embedded", "train", limit=N)
    attack = attack_config(PrecomputeConfig(steps=2, attack_options={"init_steps": 1})).resolve(tuple(ds.image_shape))
    # The reference ran with --precision auto: the same precision as it resolved to on this machine.
    attack = dataclasses.replace(attack, autocast_dtype=prov["attack"]["autocast_dtype"])
    # the task a dask worker gets: it loads (and checks) the checkpoint and the split itself
    image_size = load_checkpoint(ckpt).image_size
    job = ChunkTask(partial(checkpoint_victim, str(ckpt), sha256_file(ckpt)),
                    partial(worker_split, "embedded", "train", None, N, image_size, ds.fingerprint),
                    attack, batch_size=8, seed=0, device="cpu")
    provenance = {key: prov[key] for key in ("model", "attack", "seed")}
    provenance["dataset"] = {key: prov["dataset"][key] for key in ("name", "split", "fingerprint")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with create_store(tmp_path / "twice.zarr", n=N, image_shape=tuple(ds.image_shape), chunk_size=CHUNK,
                          provenance=provenance) as writer:
            first = job(writer, 2)
            second = job(writer, 2)  # the rerun of a task whose report was lost
    finally:
        torch.set_num_threads(threads)
    assert (second.index, second.n_images, second.n_success) == (first.index, first.n_images, first.n_success)
    assert_done_chunks_match(tmp_path / "twice.zarr", ref)
    assert store_arrays(tmp_path / "twice.zarr")["chunk_done"].sum() == 1


# --------------------------------------------------------------------------- disk full, read-only target


def _pages(store: Path) -> tuple[int, int]:
    """(tmpfs pages of a store's metadata files, pages of one chunk's files), measured on a finished store."""
    meta = chunks = 0
    for p in store.rglob("*"):
        if p.is_file():
            pages = -(-p.stat().st_size // PAGE)
            if p.relative_to(store).parts[1:2] == ("c",):
                chunks += pages
            else:
                meta += pages
    return meta, chunks // N_CHUNKS


@pytest.fixture(scope="module")
def disk_full_run(faults_env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A precompute whose tmpfs fills up during its fourth chunk: (result, store, mountpoint, args)."""
    meta, per_chunk = _pages(faults_env["ref"])
    # Room for the metadata, the lock, zarr's temporary files and three and a half chunks.
    size = PAGE * (meta + 4 + 3 * per_chunk + per_chunk // 2)
    with tmpfs(tmp_path_factory.mktemp("full") / "mnt", size) as mnt:
        out = mnt / "full.zarr"
        args = precompute_args(out, "--workers", "0")
        result = run_advpipe(args, faults_env["root"])
        yield SimpleNamespace(result=result, store=out, mnt=mnt, args=args)


@pytest.fixture(scope="module")
def read_only_run(faults_env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A precompute whose target file system turns read-only after two chunks: (result, store, mountpoint, args)."""
    with tmpfs(tmp_path_factory.mktemp("ro") / "mnt", 16 << 20) as mnt:
        out = mnt / "ro.zarr"
        args = precompute_args(out, "--workers", "0")
        with AdvpipeProcess(args, faults_env["root"]) as proc:
            wait_for_chunks(proc, out, 2)
            remount(mnt, "ro")
            result = proc.finish(timeout=300)
        yield SimpleNamespace(result=result, store=out, mnt=mnt, args=args)


@pytest.fixture(scope="module")
def parent_is_file_run(faults_env, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A precompute whose --out lies under a regular file (no directory can be made there)."""
    blocker = tmp_path_factory.mktemp("blocked") / "not-a-dir"
    blocker.write_text("a file where the store's folder should be\n")
    out = blocker / "store.zarr"
    result = run_advpipe(precompute_args(out, "--workers", "0"), faults_env["root"])
    return SimpleNamespace(result=result, store=out, blocker=blocker)


@pytest.mark.parametrize("scenario", ["disk_full_run", "read_only_run"])
def test_write_failure_keeps_done_chunks_and_resumes(scenario: str, faults_env, request) -> None:
    run = request.getfixturevalue(scenario)
    assert run.result.returncode != 0, run.result.stdout
    assert open_store(run.store).provenance["status"] == "in-progress"
    done = assert_done_chunks_match(run.store, faults_env["ref"])  # finished chunks are whole and right
    assert 1 <= done.sum() < N_CHUNKS
    assert not list(run.store.rglob("*.partial"))  # zarr's atomic writes removed their temporary files
    remount(run.mnt, "rw,size=64m")  # space freed / write access back
    resumed = run_advpipe(run.args, faults_env["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{int(done.sum())} of {N_CHUNKS} chunks were already done" in resumed.stdout
    assert_same_store(run.store, faults_env["ref"])
    verify_ok(run.store)
    assert not _lock(run.store).exists()


@pytest.mark.parametrize("scenario, reason", [
    pytest.param("disk_full_run", "No space left on device"),
    pytest.param("read_only_run", "Read-only file system"),
    pytest.param("parent_is_file_run", ""),
])
def test_write_failure_is_one_line_error(scenario: str, reason: str, request) -> None:
    run = request.getfixturevalue(scenario)
    result = run.result
    printed = command_stderr(result.stderr)
    lines = error_lines(printed)
    assert "Traceback" not in printed, result.stderr[-3000:]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert reason in lines[0] and str(run.store.parent) in lines[0], lines[0]


def test_unwritable_target_creates_nothing(parent_is_file_run) -> None:
    run = parent_is_file_run
    assert run.result.returncode != 0
    assert run.blocker.read_text() == "a file where the store's folder should be\n"
    assert sorted(p.name for p in run.blocker.parent.iterdir()) == ["not-a-dir"]
