"""Pretrained and timm models (issue 23, item 1): weights files, library caches, heads, stems, the CLI and API.

Every weights file is written here from a freshly created model; nothing is downloaded.
timm's ``test_resnet`` (0.37M parameters, a deep 3x3 stem) records mean = std = 0.5 in its
pretrained_cfg, which differs from the synthetic data's std of 0.25, so the normalization's
origin is visible.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import advpipe
from advpipe.data.datasets import load_dataset
from advpipe.errors import AdvpipeError
from advpipe.models.build import build_model, build_network, model_from_checkpoint
from advpipe.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from advpipe.models.normalize import Normalized
from advpipe.models.registry import create_model, feature_layer_name
from advpipe.pipeline.reader import open_store
from helpers.hostile import invoke, refused, succeeded

ARCH = "timm:test_resnet"
#: test_resnet's pretrained_cfg normalization
TIMM_MEAN, TIMM_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TRAIN = ("--data", "synthetic", "--limit", "64", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
         "--workers", "0", "--test-subset", "64")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """An ImageNet-shaped (1000-class) test_resnet with seeded weights and non-trivial BN statistics."""
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def files(source, tmp_path_factory) -> dict[str, Path]:
    """The same weights as .safetensors, .pt (plain state dict) and .pth (a training checkpoint under DDP)."""
    root = tmp_path_factory.mktemp("weights")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    paths = {"safetensors": root / "w.safetensors", "pt": root / "w.pt", "pth": root / "train.pth"}
    save_file(state, str(paths["safetensors"]))
    torch.save(state, paths["pt"])
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, paths["pth"])
    return paths


def _body(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


@pytest.mark.parametrize("kind", ["safetensors", "pt", "pth"])
def test_weights_files_load_strictly_with_the_head_replaced(kind, source, files, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="advpipe.models.pretrained"):
        net, norm = build_network(ARCH, 10, 32, pretrained=str(files[kind]))
    want = _body(source)
    got = _body(net)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert net.fc.weight.shape == (10, source.fc.in_features)  # a fresh head for 10 classes
    assert norm == (TIMM_MEAN, TIMM_STD)
    replaced = [r.getMessage() for r in caplog.records if "replaced" in r.getMessage()]
    assert len(replaced) == 1 and "10 classes" in replaced[0] and "1000" in replaced[0]


def test_same_classes_keep_the_head(source, files) -> None:
    net, _ = build_network(ARCH, 1000, 32, pretrained=str(files["safetensors"]))
    assert torch.equal(net.fc.weight, source.fc.weight) and torch.equal(net.fc.bias, source.fc.bias)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), source(x), atol=1e-6)


def test_a_fresh_head_is_drawn_from_the_global_seed(files) -> None:
    heads = []
    for _ in range(2):
        torch.manual_seed(5)
        heads.append(build_network(ARCH, 10, 32, pretrained=str(files["pt"]))[0].fc.weight)
    assert torch.equal(*heads)


def test_another_architecture_is_refused_in_one_line_by_the_cli(files, tmp_path) -> None:
    line = refused(invoke("train", *TRAIN, "--model", "timm:resnet10t", "--pretrained", str(files["safetensors"]),
                          "--out", str(tmp_path / "run")))
    assert "does not fit timm:resnet10t" in line and "differ in shape" in line and "another architecture" in line
    assert not (tmp_path / "run").exists()


def test_missing_tensors_are_an_error_and_extra_ones_a_warning(source, tmp_path, caplog) -> None:
    state = dict(source.state_dict())
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(AdvpipeError, match=r"0 tensors differ in shape, \d+ of its \d+ tensors are missing"):
        build_network(ARCH, 10, 32, pretrained=str(tmp_path / "partial.pt"))
    torch.save({**state, "aux.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    with caplog.at_level(logging.WARNING, logger="advpipe.models.pretrained"):
        net, _ = build_network(ARCH, 1000, 32, pretrained=str(tmp_path / "extra.pt"))
    assert torch.equal(net.fc.weight, source.fc.weight)
    assert any("ignored 1 tensors" in r.getMessage() and "aux.weight" in r.getMessage() for r in caplog.records)


class _Payload:
    """Pickles as a call to ``open(marker, "w")``: loading it unsafely creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_payload_is_refused_and_never_run(writer, tmp_path) -> None:
    def write(path: Path, marker: Path) -> None:
        payload = {"conv1.0.weight": torch.zeros(1), "evil": _Payload(marker)}
        if writer == "torch.save":
            torch.save(payload, path)
        else:
            with open(path, "wb") as fh:
                pickle.dump(payload, fh, protocol=2)

    # the payload is live: an unsafe load of an identical file runs it
    write(tmp_path / "control.pth", tmp_path / "control-marker")
    if writer == "torch.save":
        torch.load(tmp_path / "control.pth", weights_only=False)
    else:
        with open(tmp_path / "control.pth", "rb") as fh:
            pickle.load(fh)
    assert (tmp_path / "control-marker").exists()

    marker = tmp_path / "marker"
    write(tmp_path / "evil.pth", marker)
    line = refused(invoke("train", *TRAIN, "--model", ARCH, "--pretrained", str(tmp_path / "evil.pth"),
                          "--out", str(tmp_path / "run")))
    assert "refused" in line and "weights_only=True" in line
    assert not marker.exists()


def test_normalization_comes_from_the_weights_metadata(source, files, tmp_path) -> None:
    ds = load_dataset("synthetic", "train", limit=8)
    assert ds.std == (0.25, 0.25, 0.25)  # the data's own, used without pretrained weights
    assert build_model(ARCH, ds).std.flatten().tolist() == list(ds.std)
    # the architecture's pretrained metadata (timm pretrained_cfg)
    assert build_model(ARCH, ds, pretrained=str(files["pt"])).std.flatten().tolist() == list(TIMM_STD)
    # metadata recorded in the safetensors file wins
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "meta.safetensors"),
              metadata={"mean": json.dumps([0.1, 0.2, 0.3]), "std": json.dumps([0.4, 0.5, 0.6])})
    model = build_model(ARCH, ds, pretrained=str(tmp_path / "meta.safetensors"))
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(model.std.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    # an advpipe checkpoint's mean/std
    net = create_model(ARCH, 10, 32)
    save_checkpoint(tmp_path / "ck.pt", Checkpoint(arch=ARCH, num_classes=10, dataset="synthetic", fingerprint="x",
                                                   mean=(0.3,) * 3, std=(0.2,) * 3, image_size=32,
                                                   model_state=net.state_dict()))
    model = build_model(ARCH, ds, pretrained=str(tmp_path / "ck.pt"))
    assert torch.allclose(model.std.flatten(), torch.full((3,), 0.2))
    assert torch.equal(model.model.fc.weight, net.fc.weight)  # 10 classes both: the head is kept
    with pytest.raises(AdvpipeError, match=f"advpipe checkpoint of {ARCH}, not of timm:resnet10t"):
        build_model("timm:resnet10t", ds, pretrained=str(tmp_path / "ck.pt"))
    # a torchvision architecture: its default weights' transforms (ImageNet statistics)
    tv = create_model("torchvision:mobilenet_v3_small", 1000)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model = build_model("torchvision:mobilenet_v3_small", ds, pretrained=str(tmp_path / "tv.pth"))
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def _last_stage(net: nn.Module, size: int) -> tuple[int, int]:
    seen = []
    handle = net.layer4.register_forward_hook(lambda m, i, o: seen.append(o.shape[-2:]))
    with torch.no_grad():
        net.eval()(torch.rand(1, 3, size, size))
    handle.remove()
    return tuple(seen[0])


@pytest.mark.parametrize("arch", [ARCH, "torchvision:resnet18"])
def test_small_stem_keeps_resolution_at_64(arch) -> None:
    assert _last_stage(create_model(arch, 10, 64), 64) == (2, 2)  # 32x downsampling
    small = create_model(arch, 10, 64, small_stem=True)
    assert _last_stage(small, 64) == (8, 8)  # 8x: stride-1 stem conv, no max-pool
    assert isinstance(small.maxpool, nn.Identity)
    first = small.conv1 if isinstance(small.conv1, nn.Conv2d) else small.conv1[0]
    assert first.stride == (1, 1) and first.kernel_size == ((7, 7) if arch.startswith("torchvision") else (3, 3))


def test_small_stem_loads_the_same_weights_and_is_refused_elsewhere(source, files) -> None:
    net, _ = build_network(ARCH, 10, 64, pretrained=str(files["safetensors"]), small_stem=True)
    assert torch.equal(net.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(AdvpipeError, match="resnet20 has no such stem"):
        create_model("resnet20", 10, small_stem=True)


def test_training_records_arch_stem_and_normalization_for_evaluation(files, tmp_path) -> None:
    run = tmp_path / "run"
    succeeded(invoke("train", *TRAIN, "--model", ARCH, "--pretrained", str(files["safetensors"]), "--small-stem",
                     "--out", str(run)))
    ckpt = load_checkpoint(run / "best.pt")
    assert (ckpt.arch, ckpt.small_stem, ckpt.mean, ckpt.std) == (ARCH, True, TIMM_MEAN, TIMM_STD)
    assert ckpt.config["pretrained"] == str(files["safetensors"])
    model = model_from_checkpoint(ckpt)
    assert isinstance(model.model.maxpool, nn.Identity) and model.model.conv1[0].stride == (1, 1)
    # resuming with another stem would change the architecture under the weights
    more = [a if a != "1" else "2" for a in TRAIN]  # --epochs 2
    line = refused(invoke("train", *more, "--model", ARCH, "--out", str(run), "--resume", "--pretrained",
                          str(files["safetensors"])))
    assert "small-stem" in line


def test_api_create_model_with_pretrained(source, files) -> None:
    net = advpipe.create_model(ARCH, num_classes=10, image_size=64, pretrained=files["pt"])
    assert not isinstance(net, Normalized)  # bare, as timm's create_model
    assert all(torch.equal(v, _body(source)[k]) for k, v in _body(net).items())
    model = advpipe.create_model(ARCH, 10, pretrained=str(files["safetensors"]), small_stem=True, normalized=True)
    assert isinstance(model, Normalized) and model.std.flatten().tolist() == list(TIMM_STD)
    assert isinstance(model.model.maxpool, nn.Identity)
    with pytest.raises(AdvpipeError, match="records no normalization"):
        advpipe.create_model("resnet20", 10, normalized=True)
    assert feature_layer_name("timm:resnet10t") == "layer4" == feature_layer_name("torchvision:resnet18")


def test_library_sources_read_only_their_local_caches(monkeypatch, tmp_path, source) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    arch = "torchvision:mobilenet_v3_small"
    with pytest.raises(AdvpipeError, match="not in the torch hub cache .*pass download") as info:
        build_network(arch, 10, 32, pretrained="torchvision")
    assert info.value.fields == ("download", "pretrained")
    with pytest.raises(AdvpipeError, match="not in the Hugging Face cache"):
        build_network(ARCH, 10, 32, pretrained="timm")
    # torchvision: the file torch hub would have downloaded, under its own name
    tv = create_model(arch, 1000)
    (tmp_path / "torch/hub/checkpoints").mkdir(parents=True)
    torch.save(tv.state_dict(), tmp_path / "torch/hub/checkpoints/mobilenet_v3_small-047dcff4.pth")
    net, norm = build_network(arch, 10, 32, pretrained="torchvision")
    assert torch.equal(net.features[0][0].weight, tv.features[0][0].weight)
    assert norm == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # timm: the Hugging Face cache layout (refs/main -> snapshots/<revision>/model.safetensors)
    repo = tmp_path / "hf/models--timm--test_resnet.r160_in1k"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(repo / "snapshots" / revision / "model.safetensors"))
    net, norm = build_network(ARCH, 10, 32, pretrained="timm")
    assert torch.equal(net.conv1[0].weight, source.conv1[0].weight) and norm == (TIMM_MEAN, TIMM_STD)


def test_cli_without_download_says_how_to_get_library_weights(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    line = refused(invoke("train", *TRAIN, "--model", "torchvision:mobilenet_v3_small", "--pretrained", "torchvision",
                          "--out", str(tmp_path / "run")))
    assert "--download" in line and "torch hub cache" in line
    line = refused(invoke("train", *TRAIN, "--model", "resnet18", "--pretrained", "torchvision",
                          "--out", str(tmp_path / "run")))
    assert "--model torchvision:resnet18" in line


@pytest.mark.parametrize("name, content, needle", [
    ("w.npz", b"x", "unknown type '.npz'"),
    ("w.safetensors", b"garbage" * 4, "not a readable safetensors file"),
    ("w.pt", None, "holds no state dict"),
])
def test_unreadable_weights_files_are_refused(name, content, needle, tmp_path) -> None:
    path = tmp_path / name
    if content is None:
        torch.save({"epoch": 3, "lr": 0.1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(AdvpipeError, match=needle):
        build_network(ARCH, 10, 32, pretrained=str(path))


def test_precompute_attacks_a_pretrained_victim_and_resumes(files, tmp_path) -> None:
    args = ("precompute-masks", "--data", "synthetic", "--model", ARCH, "--pretrained", str(files["safetensors"]),
            "--limit", "4", "--steps", "2", "--workers", "0", "--device", "cpu", "--image-size", "32")
    out = succeeded(invoke(*args, "--out", str(tmp_path / "m.zarr")))
    assert "attacked 4 images" in out
    victims = list((tmp_path / "victims").glob("*.pt"))
    assert len(victims) == 1
    victim = load_checkpoint(victims[0])
    assert (victim.arch, victim.mean, victim.std, victim.image_size) == (ARCH, TIMM_MEAN, TIMM_STD, 32)
    assert victim.fingerprint == f"pretrained:{files['safetensors']}"
    assert open_store(tmp_path / "m.zarr").provenance["model"]["arch"] == ARCH
    # the victim is rewritten byte for byte (its head is seeded), so the store resumes as complete
    assert "already complete" in succeeded(invoke(*args, "--out", str(tmp_path / "m.zarr")))
    line = refused(invoke("precompute-masks", "--data", "synthetic", "--model", ARCH, "--small-stem", "--limit", "4",
                          "--out", str(tmp_path / "n.zarr")))
    assert "--small-stem" in line and "--pretrained" in line
