"""Issue 23's done-when commands, end to end on replicas: a timm model from a local weights file attacks the
data (precompute-masks), then trains on its own masks (train --aug advmask).

Tiny-ImageNet at 64x64 with pad-crop-flip; Flowers-102 at 224x224 with RandomResizedCrop. Both tiny on
purpose (a few images, one attack step, one epoch): they check that the path runs and that what it writes
is what the flags asked for, not accuracy. Fresh timm weights are saved here, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from advpipe.cli import app
from advpipe.pipeline.reader import open_store
from helpers.replicas import write_flowers_replica, write_tinyimagenet_replica

runner = CliRunner()
ATTACK = ["--steps", "1", "--attack-opt", "init_steps=1", "--attack-opt", "init_extra_steps=0", "--workers", "0",
          "--batch-size", "4", "--precision", "fp32"]


def _timm_weights(path: Path) -> Path:
    """A fresh timm ResNet-18 state dict as .safetensors (ImageNet head: the loader replaces it)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _precompute_then_train(tmp_path: Path, data: str, size: int, extra_train: list[str], limit: int) -> dict:
    """Run the two commands of the done-when list; return the store's provenance (both exit 0)."""
    weights = _timm_weights(tmp_path / "resnet18.safetensors")
    model = ["--model", "timm:resnet18", "--pretrained", str(weights), "--image-size", str(size)]
    where = ["--data", data, "--data-dir", str(tmp_path / "data")]
    store = tmp_path / "masks.zarr"
    pre = runner.invoke(app, ["precompute-masks", *where, *model, "--limit", str(limit), "--out", str(store),
                              *ATTACK])
    assert pre.exit_code == 0, pre.output
    run = tmp_path / "run"
    train = runner.invoke(app, ["train", *where, *model, "--aug", "advmask", "--masks", str(store),
                                "--limit", str(limit), "--epochs", "1", "--batch-size", "2", "--workers", "0",
                                "--precision", "fp32", "--out", str(run), *extra_train])
    assert train.exit_code == 0, train.output
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == "timm:resnet18" and config["image_size"] == size and config["aug"] == "advmask"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and 0.0 <= metrics[0]["test_acc"] <= 1.0
    masks = open_store(store)
    assert masks.complete and masks.n == limit and tuple(masks.image_shape) == (3, size, size)
    return masks.provenance


@pytest.mark.slow
def test_tinyimagenet_at_64_with_a_timm_model_from_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVPIPE_CACHE_DIR", str(tmp_path / "cache"))
    write_tinyimagenet_replica(tmp_path / "data", classes=3, per_class=2, val_per_class=1)
    provenance = _precompute_then_train(tmp_path, "tinyimagenet", 64, [], limit=4)
    attack = provenance["attack"]
    assert (attack["alpha_max"], attack["encoder"]) == (5.0, "unet")  # the paper's value; U-Net above 32x32
    assert provenance["dataset"]["name"] == "tinyimagenet"


@pytest.mark.slow
def test_flowers102_at_224_with_random_resized_crop(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVPIPE_CACHE_DIR", str(tmp_path / "cache"))
    write_flowers_replica(tmp_path / "data", classes=2, per_class=3)
    provenance = _precompute_then_train(tmp_path, "flowers102", 224, ["--crop", "random-resized"], limit=2)
    assert (provenance["attack"]["alpha_max"], provenance["attack"]["encoder"]) == (5.0, "unet")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["crop"] == "random-resized"
