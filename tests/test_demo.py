"""The main job end to end: train, precompute masks, train with --aug advmask for 2 epochs, evaluate."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from advpipe.cli import app
from advpipe.pipeline.store import open_store, verify_store


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_finished_ones(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--limit", "128", "--epochs", "2", "--attack-steps", "3", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "none" in result.output and "advmask" in result.output and "preview:" in result.output
    store = out / "masks" / "embedded-train-resnet20.zarr"
    assert verify_store(store) == [] and open_store(store).n == 128
    lines = [json.loads(x) for x in (out / "runs" / "advmask" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["aug_fraction_augmented"] > 0.5
    for run in ("none", "advmask"):
        assert json.loads((out / "runs" / run / "eval.json").read_text())["clean"]["n"] == 1000
    assert (out / "advmask-preview.png").stat().st_size > 10_000
    # a second run finds every stage finished and only re-evaluates
    before = (out / "runs" / "advmask" / "last.pt").stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (out / "runs" / "advmask" / "last.pt").stat().st_mtime_ns == before
