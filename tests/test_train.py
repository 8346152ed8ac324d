"""End to end: train on the embedded data, evaluate, resume exactly, refuse mismatched resumes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from advpipe import progress
from advpipe.cli import app
from advpipe.progress import NullReporter
from advpipe.models.checkpoint import load_checkpoint
from advpipe.train.config import TrainConfig
from advpipe.train.loop import train

runner = CliRunner()
FAST = dict(data="synthetic", model="resnet20", batch_size=64, lr=0.05, seed=3, device="cpu")


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    """Two epochs of resnet20 on the embedded CIFAR-10 subset, through the CLI."""
    out = tmp_path_factory.mktemp("run") / "r20"
    result = runner.invoke(app, ["train", "--model", "resnet20", "--epochs", "2", "--batch-size", "64",
                                 "--lr", "0.05", "--warmup-epochs", "0.2", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def test_two_epochs_on_embedded_beat_chance_and_write_the_run_folder(embedded_run):
    lines = [json.loads(ln) for ln in (embedded_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[-1]["test_acc"] > 0.2  # chance is 0.1 on 10 balanced classes
    for name in ("last.pt", "best.pt", "config.yaml"):
        assert (embedded_run / name).is_file()
    ckpt = load_checkpoint(embedded_run / "best.pt")
    assert ckpt.arch == "resnet20" and ckpt.dataset == "embedded" and ckpt.num_classes == 10
    assert ckpt.fingerprint.startswith("sha256:") and ckpt.config["epochs"] == 2
    raw = torch.load(embedded_run / "best.pt", weights_only=True)  # the format is weights-only loadable
    assert raw["format"] == "advpipe-checkpoint/1"


def test_evaluate_reports_table_and_json(embedded_run, tmp_path):
    out_json = tmp_path / "eval.json"
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(embedded_run / "best.pt"), "--json", str(out_json),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "airplane" in result.output and "all" in result.output
    data = json.loads(out_json.read_text())
    best = load_checkpoint(embedded_run / "best.pt")
    assert data["clean"]["n"] == 1000 and len(data["clean"]["per_class"]) == 10
    assert abs(data["clean"]["top1"] - best.metrics["test_acc"]) < 1e-9
    assert len(data["checkpoint"]["sha256"]) == 64 and data["data"]["fingerprint"].startswith("sha256:")


class _InterruptAt(NullReporter):
    """A progress reporter that interrupts training when a given progress bar opens."""

    def __init__(self, description: str) -> None:
        self.description = description

    def open(self, description, total, unit):
        if description == self.description:
            raise KeyboardInterrupt
        return super().open(description, total, unit)


def test_resume_continues_exactly(tmp_path):
    straight = train(TrainConfig(**FAST, epochs=2, limit=256, out=str(tmp_path / "a")))
    previous = progress.use_reporter(_InterruptAt("epoch 2/2"))
    try:
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**FAST, epochs=2, limit=256, out=str(tmp_path / "b")))
    finally:
        progress.use_reporter(previous)
    assert load_checkpoint(tmp_path / "b" / "last.pt").epoch == 1
    resumed = train(TrainConfig(**FAST, epochs=2, limit=256, out=str(tmp_path / "b"), resume=True))
    a = load_checkpoint(straight.run_dir / "last.pt").model_state
    b = load_checkpoint(resumed.run_dir / "last.pt").model_state
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_refuses_other_architecture_or_data(embedded_run):
    result = runner.invoke(app, ["train", "--model", "resnet32", "--epochs", "3", "--out", str(embedded_run),
                                 "--resume", "--device", "cpu"])
    assert result.exit_code == 2 and "is a resnet20 checkpoint, but --model is resnet32" in result.output
    result = runner.invoke(app, ["train", "--model", "resnet20", "--data", "synthetic", "--epochs", "3",
                                 "--out", str(embedded_run), "--resume", "--device", "cpu"])
    assert result.exit_code == 2 and "was trained on embedded" in result.output
    result = runner.invoke(app, ["train", "--model", "resnet20", "--epochs", "3", "--out", str(embedded_run),
                                 "--device", "cpu"])
    assert result.exit_code == 2 and "already holds a run" in result.output


def test_config_file_gives_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: synthetic\nmodel: resnet20\nepochs: 1\nbatch_size: 32\nlimit: 64\nlr: 0.01\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(cfg), "--batch-size", "16", "--out", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["batch_size"] == 16 and saved["lr"] == 0.01 and saved["data"] == "synthetic"


def test_loading_into_a_different_architecture_fails_clearly(embedded_run):
    from advpipe.errors import AdvpipeError
    from advpipe.models.checkpoint import load_state_into
    from advpipe.models.registry import create_model

    ckpt = load_checkpoint(embedded_run / "last.pt")
    with pytest.raises(AdvpipeError, match="does not fit this architecture"):
        load_state_into(create_model("resnet32", 10), ckpt.model_state)


def test_bf16_on_a_cpu_that_emulates_it_warns_and_auto_stays_fp32(monkeypatch, caplog):
    """bf16 without AVX-512 BF16 or AMX runs ~10x slower than fp32 (benchmarks/README.md): say so once."""
    import logging

    from advpipe import precision as precision_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision_module, "fast_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="advpipe.precision"):
        assert precision_module.effective_precision(cpu, "auto") == "fp32"
        assert precision_module.effective_precision(cpu, "fp32") == "fp32"
        assert not caplog.records
        assert precision_module.effective_precision(cpu, "bf16") == "bf16"
    assert len(caplog.records) == 1 and "emulated" in caplog.records[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(precision_module, "fast_bf16", lambda device: True)
    with caplog.at_level(logging.WARNING, logger="advpipe.precision"):
        assert precision_module.effective_precision(cpu, "bf16") == "bf16"
    assert not caplog.records
