"""DDP training with 2 CPU processes (gloo) on the embedded data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from advpipe.eval.run import EvalConfig, evaluate
from advpipe.models.checkpoint import load_checkpoint

HELPER = Path(__file__).parent / "helpers" / "ddp_train.py"


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "ADVPIPE_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_process_ddp_run_completes_with_identical_replicas(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HELPER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    digests = {(out / f"rank{r}.sha256").read_text() for r in range(2)}
    assert len(digests) == 1  # every rank holds the same parameters and buffers after training
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1  # only rank 0 wrote metrics
    # rank 0's checkpoint loads in a single-process evaluate
    result = evaluate(EvalConfig(checkpoint=str(out / "last.pt"), device="cpu", limit=200))
    assert result["clean"]["n"] == 200
    assert load_checkpoint(out / "last.pt").config["batch_size"] == 32


@pytest.mark.slow
def test_cli_launches_torchrun_and_resumes(tmp_path):
    out = tmp_path / "cli"
    base = [sys.executable, "-m", "advpipe", "train", "--data", "synthetic", "--limit", "128", "--model", "resnet20",
            "--batch-size", "16", "--out", str(out), "--device", "cpu", "--nproc-per-node", "2"]
    first = subprocess.run(base + ["--epochs", "1"], capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("run folder:") == 1  # only rank 0 reports
    # continue the same run for one more epoch under DDP
    cfg = out / "config.yaml"
    assert cfg.is_file()
    second = subprocess.run(base + ["--epochs", "2", "--resume"], capture_output=True, text=True, timeout=600,
                            env=_env(tmp_path))
    assert second.returncode == 0, second.stderr[-2000:]
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
