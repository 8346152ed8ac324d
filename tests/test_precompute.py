"""The precompute stage as a user runs it: `advpipe precompute-masks` and `advpipe masks ...`.

A tiny ResNet-20 checkpoint is built in seconds (BatchNorm statistics from one pass, then only the
final layer fitted on the attacked images, so the attack has correctly classified images to work
on). Every in-process run and every worker uses one CPU thread: float reductions, and so the
attack's results, depend on the thread count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from helpers.checkpoints import fit_checkpoint
from helpers.stores import assert_same_store, store_arrays
from advpipe.attacks.sparse import SparseAttackConfig, sparse_attack
from advpipe.cli import app
from advpipe.data.datasets import load_dataset
from advpipe.models.build import model_from_checkpoint
from advpipe.models.checkpoint import load_checkpoint
from advpipe.pipeline.lock import StoreLock
from advpipe.pipeline import precompute_config as precompute_module  # where resolve_precision reads fast_bf16
from advpipe.cluster import plan_local_workers
from advpipe.pipeline.precompute_config import PrecomputeConfig, resolve_precision
from advpipe.rng import chunk_seed
from advpipe.pipeline.codecs import sample_hash
from advpipe.pipeline.reader import open_store
from advpipe.files import sha256_file

# Reading with plain zarr warns that numcodecs.packbits and consolidated metadata are outside the
# v3 spec: deliberate format choices (docs/mask-store.md).
pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in:UserWarning",
                                        "ignore:Consolidated metadata is:UserWarning")
runner = CliRunner()
N, CHUNK = 32, 8
ATTACK = ["--data", "embedded", "--limit", str(N), "--chunk-size", str(CHUNK), "--batch-size", "8", "--steps", "2",
          "--attack-opt", "init_steps=1"]
EPS_FORMS = "8/255, 0.03137 or 8/255.0"


def cli(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    """A working folder holding runs/embedded/resnet20/none/best.pt and a reference store made in-process."""
    root = tmp_path_factory.mktemp("precompute")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("OMP_NUM_THREADS", "1")  # dask workers and subprocesses
        torch.set_num_threads(1)
        try:
            ckpt = root / "runs" / "embedded" / "resnet20" / "none" / "best.pt"
            fit_checkpoint(ckpt, N)
            result = cli("precompute-masks", "--model", "resnet20", *ATTACK, "--workers", "0")
            assert result.exit_code == 0, result.output
            stores = list((root / "masks").iterdir())
            assert len(stores) == 1, stores
            yield {"root": root, "ckpt": ckpt, "ref": stores[0], "output": result.output}
        finally:
            torch.set_num_threads(threads)


def test_reference_store_round_trips_through_plain_zarr(env) -> None:
    store = env["ref"]
    assert store.name.startswith(f"embedded-train-resnet20-eps8_255-n{N}-steps2")
    ds = load_dataset("embedded", "train", limit=N)
    group = zarr.open_group(str(store), mode="r")
    meta = group.attrs["advpipe"]
    arrays = store_arrays(store)
    assert meta["status"] == "complete" and arrays["chunk_done"].all() and arrays["chunk_done"].shape == (N // CHUNK,)
    assert meta["dataset"] == {"name": "embedded", "split": "train", "fingerprint": ds.fingerprint, "n": N,
                               "image_shape": [3, 32, 32]}
    assert meta["model"] == {"arch": "resnet20", "checkpoint_sha256": sha256_file(env["ckpt"]), "clean_accuracy": 0.5}
    attack = meta["attack"]
    assert (attack["name"], attack["eps"], attack["steps"], attack["init_steps"], attack["batch_size"]) == (
        "advmask", "8/255", 2, 1, 8)
    assert attack["encoder"] == "linear" and attack["targeted"] is False  # "auto" recorded as what ran
    assert meta["chunk_size"] == CHUNK and meta["seed"] == 0
    np.testing.assert_array_equal(arrays["sample_hash"], sample_hash(ds.images.numpy(), layout="NCHW"))
    np.testing.assert_array_equal(arrays["labels"], ds.labels.numpy())  # untargeted: the true labels
    masks = arrays["masks"]
    assert masks.shape == (N, 32, 32) and masks.dtype == bool
    succ = arrays["success"]
    assert 0 < succ.sum() < N and masks[succ].any()
    assert (arrays["l0_pixels"] <= masks.sum(axis=(1, 2))).all()  # only masked pixels are perturbed
    assert (arrays["l0"] <= 3 * arrays["l0_pixels"]).all() and (arrays["l0"] >= arrays["l0_pixels"]).all()
    attacked = arrays["clean_correct"]  # the summary covers these (test_store checks the exclusion)
    assert attacked.sum() > 0
    ok = succ & attacked
    assert meta["summary"]["asr"] == pytest.approx(ok.sum() / attacked.sum())
    assert meta["summary"]["l0_median"] == pytest.approx(np.median(arrays["l0"][ok]))
    np.testing.assert_array_equal(open_store(store).read_masks(0, N), masks)
    assert f"ASR {100 * ok.sum() / attacked.sum():.2f}%" in env["output"]


def test_chunk_randomness_is_keyed_by_chunk_index(env) -> None:
    """Chunk 2 equals the attack run on its samples alone with the generator seeded from (seed, 2)."""
    ds = load_dataset("embedded", "train", limit=N)
    model = model_from_checkpoint(load_checkpoint(env["ckpt"])).eval().requires_grad_(False)
    stored = open_store(env["ref"])
    precision = stored.provenance["attack"]["autocast_dtype"]  # --precision auto: depends on the CPU
    cfg = SparseAttackConfig(steps=2, init_steps=1, autocast_dtype=precision).resolve((3, 32, 32))
    x = ds.images[2 * CHUNK : 3 * CHUNK].float() / 255
    res = sparse_attack(model, x, ds.labels[2 * CHUNK : 3 * CHUNK], cfg,
                        generator=torch.Generator().manual_seed(chunk_seed(0, 2)))
    np.testing.assert_array_equal(stored.read_masks(2 * CHUNK, 3 * CHUNK), res.mask.numpy())
    np.testing.assert_array_equal(stored.metrics()["loss"][2 * CHUNK : 3 * CHUNK], res.loss.numpy())
    assert len({chunk_seed(0, i) for i in range(1000)} | {chunk_seed(1, i) for i in range(1000)}) == 2000


def test_dask_worker_gives_identical_store(env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(env["root"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = env["root"] / "dask.zarr"
    result = cli("precompute-masks", "--model", "resnet20", *ATTACK, "--workers", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert_same_store(env["ref"], out)


def test_killed_run_resumes_to_identical_store(env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(env["root"])
    out = env["root"] / "killed.zarr"
    args = ["precompute-masks", "--model", "resnet20", *ATTACK, "--workers", "0", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "advpipe", *args], cwd=env["root"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "chunk_done" / "c" / "0").exists():
            assert proc.poll() is None, "precompute ended before its first chunk was done"
            assert time.monotonic() < deadline, "no chunk done within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = open_store(out)
    assert partial.provenance["status"] == "in-progress" and 1 <= partial.chunk_done().sum() < partial.n_chunks

    changed = cli(*args, "--eps", "16/255")
    assert changed.exit_code == 2 and "another configuration" in changed.output and "attack.eps" in changed.output
    assert "--overwrite" in changed.output

    resumed = cli(*args)  # the dead writer's lock is stale and is taken over
    assert resumed.exit_code == 0, resumed.output
    assert "were already done" in resumed.output
    assert_same_store(env["ref"], out)
    assert len(open_store(out).provenance["resumed"]) == 1


def test_complete_store_rerun_refusal_and_overwrite(env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(env["root"])
    out = env["root"] / "small.zarr"
    small = ["precompute-masks", "--model", "resnet20", "--data", "embedded", "--limit", "8", "--steps", "1",
             "--attack-opt", "init_steps=1", "--workers", "0", "--out", str(out)]
    assert cli(*small).exit_code == 0
    before = store_arrays(out)
    again = cli(*small)
    assert again.exit_code == 0 and "already complete" in again.output
    refused = cli(*small, "--eps", "16/255")
    assert refused.exit_code == 2 and "complete and immutable" in refused.output and "--overwrite" in refused.output
    replaced = cli(*small, "--eps", "16/255", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert open_store(out).provenance["attack"]["eps"] == "16/255"
    assert not np.array_equal(store_arrays(out)["l2"], before["l2"])


def test_concurrent_writer_refused(env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(env["root"])
    out = env["root"] / "busy.zarr"
    lock = StoreLock.acquire(out.with_name(out.name + ".lock"), what="test")
    try:
        result = cli("precompute-masks", "--model", "resnet20", *ATTACK, "--workers", "0", "--out", str(out))
    finally:
        lock.release()
    assert result.exit_code == 2 and "already being written" in result.output and str(os.getpid()) in result.output
    assert not out.exists()


def test_verify_ok_mismatch_and_corruption(env, tmp_path: Path) -> None:
    ok = cli("masks", "verify", str(env["ref"]), "--data", "embedded")
    assert ok.exit_code == 0 and ok.output.splitlines()[-1].startswith("ok:"), ok.output
    other = cli("masks", "verify", str(env["ref"]), "--data", "embedded", "--split", "test")
    assert other.exit_code == 1 and "fingerprint" in other.output and "sample hashes differ" in other.output

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(env["ref"], damaged)
    blob = damaged / "masks" / "c" / "1" / "0" / "0"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    bad = cli("masks", "verify", str(damaged))
    assert bad.exit_code == 1, bad.output
    assert "array 'masks' chunk 1" in bad.output and "corrupt" in bad.output


@pytest.mark.parametrize("eps", ["abc", "8/0", "-1/255", "2", "8//255", ""])
def test_bad_eps_is_one_line_error_with_accepted_forms(eps: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("precompute-masks", "--model", "vgg19", "--data", "cifar10", "--eps", eps)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and EPS_FORMS in lines[0], result.output


def test_precision_flag_auto_and_resume(env, monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision auto: bf16 where native, fp32 elsewhere; an existing store keeps its own precision."""
    ref = env["ref"]
    new = env["root"] / "not-there.zarr"
    cfg = PrecomputeConfig(precision="auto")
    monkeypatch.setattr(precompute_module, "fast_bf16", lambda device: True)
    assert resolve_precision(cfg, new) == "bf16"
    assert resolve_precision(dataclasses.replace(cfg, scheduler="tcp://127.0.0.1:1"), new) is None  # workers unknown
    monkeypatch.setattr(precompute_module, "fast_bf16", lambda device: False)
    assert resolve_precision(cfg, new) is None
    assert resolve_precision(PrecomputeConfig(precision="bf16"), new) == "bf16"
    assert resolve_precision(PrecomputeConfig(precision="fp32"), ref) is None
    stored = open_store(ref).provenance["attack"]["autocast_dtype"]
    for native in (True, False):
        monkeypatch.setattr(precompute_module, "fast_bf16", lambda device, native=native: native)
        assert resolve_precision(cfg, ref) == stored  # a resume continues as the store started
    assert resolve_precision(dataclasses.replace(cfg, overwrite=True), ref) is None  # a new store: this machine

    monkeypatch.chdir(env["root"])
    other = "fp32" if stored == "bf16" else "bf16"
    rerun = cli("precompute-masks", "--model", "resnet20", *ATTACK, "--workers", "0")  # auto, same store
    assert rerun.exit_code == 0 and "already complete" in rerun.output, rerun.output
    changed = cli("precompute-masks", "--model", "resnet20", *ATTACK, "--workers", "0", "--precision", other)
    assert changed.exit_code == 2 and "attack.autocast_dtype" in changed.output, changed.output
    bad = cli("precompute-masks", "--model", "resnet20", *ATTACK, "--precision", "fp64")
    assert bad.exit_code == 2 and bad.output.strip() == "error: --precision must be one of auto, fp32, bf16, fp16, " \
        "got 'fp64'", bad.output
    via_opt = cli("precompute-masks", "--model", "resnet20", *ATTACK, "--attack-opt", "autocast_dtype=bf16")
    assert via_opt.exit_code == 2 and "set --precision instead" in via_opt.output, via_opt.output


def test_missing_model_names_the_train_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("precompute-masks", "--model", "vgg19", "--data", "cifar10")
    assert result.exit_code == 2
    assert "runs/cifar10/vgg19/none/best.pt" in result.output
    assert "advpipe train --data cifar10 --model vgg19" in result.output


def test_checkpoint_for_other_dataset_refused(env) -> None:
    result = cli("precompute-masks", "--checkpoint", str(env["ckpt"]), "--data", "synthetic", "--limit", "8",
                 "--workers", "0", "--out", str(env["root"] / "never.zarr"))
    assert result.exit_code == 2 and "trained on embedded, not on synthetic" in result.output


def test_plan_local_workers_pins_one_gpu_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    assert plan_local_workers("cpu", None) == (1, None, "cpu")
    assert plan_local_workers("cpu", 3) == (3, None, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert plan_local_workers("auto", None) == (2, ["3", "5"], "cuda")
    assert plan_local_workers("cuda", 3) == (3, ["3", "5", "3"], "cuda")
    assert plan_local_workers("cuda:1", None) == (1, ["5"], "cuda")


def test_report_prints_table_iii(env) -> None:
    result = cli("masks", "report", str(env["ref"]))
    assert result.exit_code == 0, result.output
    summary = open_store(env["ref"]).provenance["summary"]
    assert "resnet20 on embedded/train, eps 8/255, untargeted" in result.output
    for label in ("ASR", "l0 (elements)", "l0 (pixels)", "l2", "l_inf"):
        assert label in result.output
    assert f"{100 * summary['asr']:.2f}%" in result.output
    assert f"{summary['l0_mean']:.1f}" in result.output and f"{summary['l0_pixels_median']:.1f}" in result.output


def test_info_over_http(env) -> None:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(env["ref"].parent)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        result = cli("masks", "info", f"http://127.0.0.1:{port}/{env['ref'].name}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert result.exit_code == 0, result.output
    meta = json.loads((env["ref"] / "zarr.json").read_text())["attributes"]["advpipe"]
    text = " ".join(result.output.split())
    assert meta["dataset"]["fingerprint"] in text and meta["model"]["checkpoint_sha256"] in text
    assert f"chunks done {N // CHUNK} of {N // CHUNK}" in text
    assert f"ASR {100 * meta['summary']['asr']:.2f}%" in text


def test_show_writes_png_and_refuses_other_data(env, tmp_path: Path) -> None:
    png = tmp_path / "grid.png"
    result = cli("masks", "show", str(env["ref"]), "--n", "10", "--out", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = cli("masks", "show", str(env["ref"]), "--data", "synthetic", "--out", str(tmp_path / "no.png"))
    assert other.exit_code == 2 and "fingerprint" in other.output and not (tmp_path / "no.png").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"http.server did not start on port {port}")
