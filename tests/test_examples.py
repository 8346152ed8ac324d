"""The scripts in examples/ run as a user runs them (a subprocess each), on tiny data, in a few seconds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from advpipe.data.datasets import load_dataset
from helpers.sharing import tiny_store

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
N = 32
#: training examples: 40 images in 2 batches of 20, so each batch occludes exactly 0.4 x 20 = 8 samples in
#: the first epoch and 0.8 x 20 = 16 in the second (``floor(f * B + u)`` with ``u`` in [0, 1) and f * B whole)
N_TRAIN = 40
TRAIN = ["--limit", str(N_TRAIN), "--epochs", "2", "--batch-size", "20"]


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store of the first N_TRAIN embedded images whose masks come from the images (non-empty, no attack needed)."""
    return tiny_store(tmp_path_factory.mktemp("examples") / "masks.zarr",
                      load_dataset("embedded", "train", limit=N_TRAIN))


def _fractions(output: str) -> list[float]:
    return [float(v) for v in re.findall(r"augmented ([0-9.]+) of samples", output)]


def test_every_example_is_tested() -> None:
    tested = {"plain_pytorch.py", "timm_model.py", "lightning_module.py", "precompute_masks.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("script", ["plain_pytorch.py", "timm_model.py", "lightning_module.py"])
def test_training_example_follows_the_advmask_schedule(script: str, store: Path, tmp_path: Path) -> None:
    if script == "lightning_module.py":
        pytest.importorskip("lightning", reason="the [lightning] extra is not installed")
    extra = ["--model", "resnet10t"] if script == "timm_model.py" else []
    out = run_example(script, "--masks", str(store), *TRAIN, *extra, cwd=tmp_path)
    assert re.search(r"epoch 2/2", out), out
    # 2 epochs: prob_max 0.8 ramped over 2 epochs occludes exactly 8 of each 20 in the first, 16 of 20 in the second
    assert _fractions(out) == [0.40, 0.80], out


def test_training_example_refuses_a_store_of_other_data(store: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLES / "plain_pytorch.py"), "--masks", str(store), "--limit", "16",
                           "--epochs", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "the data has 16 images" in proc.stderr


def test_precompute_example_writes_a_resumable_store(tmp_path: Path) -> None:
    import advpipe

    args = ["--limit", str(N), "--train-steps", "10", "--steps", "2", "--init-extra-steps", "0", "--out", "m.zarr"]
    out = run_example("precompute_masks.py", *args, cwd=tmp_path)
    assert f"{N} masks, 1 chunks run, 0 already done" in out, out
    masks = advpipe.open_masks(tmp_path / "m.zarr")
    ds = load_dataset("embedded", "train", limit=N)
    masks.check_data((ds.images, ds.labels))
    assert masks.provenance["model"]["arch"] == "SmallNet" and masks.provenance["attack"]["steps"] == 2
    again = run_example("precompute_masks.py", *args, cwd=tmp_path)
    assert f"{N} masks, 0 chunks run, 1 already done" in again, again
