"""The paper's per-dataset alpha_max, the linear encoder's memory guard, and the Tiny-ImageNet / Flowers presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from advpipe.attacks import encoders
from advpipe.attacks.sparse_config import PAPER_ALPHA_MAX, SparseAttackConfig, default_alpha_max
from advpipe.cli import app
from advpipe.errors import AdvpipeError
from advpipe.pipeline.precompute_tensors import precompute_masks
from advpipe.pipeline.reader import open_store
from advpipe.study.config import parse_study
from helpers.replicas import write_tinyimagenet_replica
from helpers.template_task import tiny_cnn

runner = CliRunner()
PRESETS = Path(__file__).parents[1] / "configs" / "studies"
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


# --------------------------------------------------------------------------- alpha_max by dataset


@pytest.mark.parametrize("dataset, shape, expected", [
    ("tinyimagenet", (3, 32, 32), 5.0),       # the dataset's value wins over the 32x32 size rule
    ("tinyimagenet", (3, 64, 64), 5.0),
    ("flowers102", (3, 224, 224), 5.0),
    ("flowers102-random:7", (3, 32, 32), 5.0),  # NAME:OPTION takes NAME's value
    ("cifar10", (3, 64, 64), 100.0),          # CIFAR upsampled keeps the paper's CIFAR value
    ("cifar100", (3, 32, 32), 100.0),
    ("embedded", (3, 32, 32), 100.0),
    ("folder", (3, 32, 32), 100.0),           # not in the table: the size rule
    ("folder", (3, 224, 224), 5.0),
    (None, (3, 32, 32), 100.0),
    (None, (3, 33, 33), 5.0),
])
def test_alpha_max_defaults_to_the_papers_value_for_the_dataset(dataset, shape, expected):
    assert default_alpha_max(shape, dataset) == expected
    assert SparseAttackConfig().resolve(shape, dataset=dataset).alpha_max == expected
    assert SparseAttackConfig(alpha_max=7.0).resolve(shape, dataset=dataset).alpha_max == 7.0  # explicit wins
    assert SparseAttackConfig().resolve(shape, dataset=dataset).encoder == ("linear" if shape[1] <= 32 else "unet")


def test_the_table_holds_the_papers_four_datasets():
    paper = {"cifar10": 100.0, "cifar100": 100.0, "tinyimagenet": 5.0, "flowers102": 5.0}  # advmask.txt Sec. IV-B
    assert {k: PAPER_ALPHA_MAX[k] for k in paper} == paper


@pytest.mark.parametrize("name, expected", [("tinyimagenet", 5.0), ("custom", 100.0)])
def test_precompute_from_python_records_the_datasets_alpha_max(tmp_path, name, expected):
    torch.manual_seed(0)
    model = tiny_cnn(3).eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    cfg = SparseAttackConfig(steps=1, init_steps=1, init_extra_steps=0)
    precompute_masks(model, (x, y), tmp_path / "m.zarr", attack=cfg, batch_size=4, chunk_size=4, name=name,
                     device="cpu")
    attack = open_store(tmp_path / "m.zarr").provenance["attack"]
    assert attack["alpha_max"] == expected and attack["encoder"] == "linear"


@pytest.mark.slow
def test_precompute_at_224_with_the_unet_encoder(tmp_path):
    torch.manual_seed(0)
    model = tiny_cnn(3).eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    cfg = SparseAttackConfig(steps=2, init_steps=1, init_extra_steps=0)  # encoder auto: unet above 32x32
    precompute_masks(model, (x, torch.tensor([0, 1])), tmp_path / "m.zarr", attack=cfg, batch_size=2, chunk_size=2,
                     name="flowers102", device="cpu")
    store = open_store(tmp_path / "m.zarr")
    attack = store.provenance["attack"]
    assert (attack["encoder"], attack["alpha_max"], attack["unet_backbone"]) == ("unet", 5.0, "mobilenet_v2")
    assert store.complete and store.n == 2 and tuple(store.image_shape) == (3, 224, 224)


# --------------------------------------------------------------------------- linear encoder memory


def test_linear_encoder_bytes_count_weights_gradient_and_adam_state():
    c, h, w = 3, 224, 224
    assert encoders.linear_encoder_bytes((c, h, w), 8) == (c * h * w + 1) * h * w * 16
    assert encoders.linear_encoder_bytes((c, h, w), 8, "image") == 8 * encoders.linear_encoder_bytes((c, h, w), 8)
    assert encoders.linear_encoder_bytes((c, h, w), 1) > 100 * 2**30  # 7.55G parameters at 224x224


def test_a_linear_encoder_that_cannot_fit_is_refused_before_allocation(monkeypatch):
    monkeypatch.setattr(encoders, "free_memory_bytes", lambda device: 2**30)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(AdvpipeError, match=r"encoder linear for 3x64x64 images needs 0\.40G parameters") as err:
        encoders.build_encoder("linear", (3, 64, 64), 8, scope="image", generator=gen, device=torch.device("cpu"))
    assert err.value.fields == ("encoder",) and "encoder_scope batch" in str(err.value)
    enc = encoders.build_encoder("linear", (3, 32, 32), 8, generator=gen, device=torch.device("cpu"))  # 50 MB: fits
    assert enc.weight.shape == (3 * 32 * 32, 32 * 32)
    monkeypatch.setattr(encoders, "free_memory_bytes", lambda device: None)  # unknown: no guard
    encoders.check_linear_fits((3, 224, 224), 1, "batch", torch.device("cpu"))


def test_cli_precompute_refuses_the_linear_encoder_before_the_clean_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(encoders, "free_memory_bytes", lambda device: 2**20)
    calls = []
    monkeypatch.setattr("advpipe.pipeline.precompute._clean_accuracy", lambda *a, **k: calls.append(1) or 0.5)
    out = tmp_path / "m.zarr"
    result = runner.invoke(app, ["precompute-masks", "--checkpoint", "builtin:resnet20-cifar10", "--data", "embedded",
                                 "--limit", "4", "--steps", "1", "--encoder", "linear", "--workers", "0",
                                 "--out", str(out)])
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: --encoder linear for 3x32x32 images needs") and "use --encoder unet" in lines[0]
    assert not calls and not out.exists()


# --------------------------------------------------------------------------- presets


def _preset(name: str):
    return parse_study(yaml.safe_load((PRESETS / f"{name}.yaml").read_text()), source=name)


def test_gpu_presets_carry_the_papers_settings():
    tiny = _preset("tinyimagenet-gpu")
    assert {r.train.model for r in tiny.runs} == {"torchvision:resnet18", "torchvision:resnet50",
                                                 "torchvision:wide_resnet50_2"}  # Sec. IV-E
    for run in tiny.runs:
        t = run.train
        assert (t.data, t.image_size, t.pretrained, t.small_stem, t.crop) == ("tinyimagenet", 64, "torchvision", True,
                                                                              "pad")
    flowers = _preset("flowers102-gpu")
    assert {(r.train.data, r.train.model, r.train.image_size) for r in flowers.runs} == {
        ("flowers102-random:0", "torchvision:resnet50", 224)}  # Table II: ResNet-50 at 224, random split
    for study in (tiny, flowers):
        assert study.masks is not None and study.masks.steps == 200
        assert {"none", "advmask"} <= {r.axes["aug"] for r in study.runs}
        assert all(r.train.masks for r in study.runs if r.axes["aug"] == "advmask")


def test_an_unknown_timm_or_torchvision_model_in_a_study_is_one_error():
    raw = yaml.safe_load((PRESETS / "tinyimagenet-smoke-cpu.yaml").read_text())
    for bad in ("timm:no_such_net", "torchvision:no_such_net"):
        raw["train"]["model"] = bad
        with pytest.raises(AdvpipeError, match="unknown model"):
            parse_study(raw, source="x")
    raw["train"]["model"] = "timm:resnet18"
    assert parse_study(raw, source="x").runs


@pytest.mark.slow
def test_the_tinyimagenet_smoke_preset_runs_end_to_end_on_a_replica(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    data = tmp_path / "data"
    write_tinyimagenet_replica(data, classes=3, per_class=4, val_per_class=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    (tmp_path / "weights").mkdir()
    weights = {k: v.contiguous() for k, v in resnet18().state_dict().items()}  # fresh: nothing is downloaded
    save_file(weights, tmp_path / "weights" / "resnet18.safetensors")
    victim = runner.invoke(app, ["train", "--data", "tinyimagenet", "--data-dir", str(data), "--image-size", "32",
                                 "--model", "torchvision:resnet18", "--pretrained", "weights/resnet18.safetensors",
                                 "--small-stem", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                                 "--precision", "fp32", "--out", "runs/tinyimagenet-smoke/victim"])
    assert victim.exit_code == 0, victim.output
    assert (tmp_path / "runs" / "tinyimagenet-smoke" / "victim" / "last.pt").is_file()
    out = tmp_path / "study"
    result = runner.invoke(app, ["study", str(PRESETS / "tinyimagenet-smoke-cpu.yaml"), "--data-dir", str(data),
                                 "--workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for run in ("aug-none_seed-0", "aug-advmask_seed-0"):
        done = json.loads((out / "runs" / run / "study-run.json").read_text())
        assert done["status"] == "done" and done["epochs"] == 1
        assert 0.0 <= done["clean_top1"] <= 1.0
    store = open_store(out / "masks" / "masks.zarr")
    attack = store.provenance["attack"]
    assert attack["alpha_max"] == 5.0 and attack["encoder"] == "linear"  # Tiny-ImageNet's value at 32x32
    assert store.provenance["dataset"]["name"] == "tinyimagenet" and store.n == 12 and store.complete
    lines = (out / "runs" / "aug-advmask_seed-0" / "metrics.jsonl").read_text().splitlines()
    assert len([json.loads(line) for line in lines]) == 1
