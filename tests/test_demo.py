"""The main job end to end: masks from the shipped victim, then none / cutout / advmask for 2 epochs, evaluated."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from advpipe.cli import app
from advpipe.demo import DemoConfig, noise_verdict
from advpipe.pipeline.reader import open_store
from advpipe.pipeline.verify import verify_store


def test_noise_verdict_uses_the_two_run_bound():
    # one-seed difference of two runs: std sqrt(2) * s, 95% bound 1.96 * sqrt(2) * s = 2.77 pp for s = 1
    assert noise_verdict(3.0, 1.0).startswith("exceeds") and noise_verdict(-2.5, 1.0).startswith("inside")
    assert "not measured" in noise_verdict(5.0, None)
    assert DemoConfig().is_default_setting and not DemoConfig(epochs=2).is_default_setting


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_finished_ones(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--limit", "128", "--epochs", "2", "--attack-steps", "3", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for aug in ("none", "cutout", "advmask"):
        assert aug in result.output
    assert "preview:" in result.output and "seed noise: not measured for these settings" in result.output
    store = out / "masks" / "embedded-train-resnet20-cifar10.zarr"
    assert verify_store(store) == [] and open_store(store).n == 128
    assert open_store(store).provenance["model"]["arch"] == "resnet20"
    lines = [json.loads(x) for x in (out / "runs" / "advmask" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["aug_fraction_augmented"] > 0.5
    for run in ("none", "cutout", "advmask"):
        ev = json.loads((out / "runs" / run / "eval.json").read_text())
        assert ev["clean"]["n"] == 1000 and ev["checkpoint"]["path"].endswith("last.pt")
    assert (out / "advmask-preview.png").stat().st_size > 10_000
    # a second run finds every stage finished and only re-evaluates
    before = (out / "runs" / "advmask" / "last.pt").stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (out / "runs" / "advmask" / "last.pt").stat().st_mtime_ns == before
