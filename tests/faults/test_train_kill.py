"""Fault injection: training killed mid-epoch resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from advpipe.models.checkpoint import load_checkpoint


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "ADVPIPE_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "advpipe", "train", "--data", "synthetic", "--model", "resnet20", "--epochs", "3",
           "--batch-size", "32", "--limit", "512", "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 600
        while not (out / "last.pt").is_file():  # wait for the end of epoch 1 ...
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before epoch 1 was saved"
            time.sleep(0.2)
        time.sleep(1.0)  # ... and then kill it somewhere inside epoch 2
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = load_checkpoint(out / "last.pt")  # the atomic save left a whole, loadable checkpoint
    assert saved.epoch in (1, 2)
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert load_checkpoint(out / "last.pt").epoch == 3
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written files left behind
