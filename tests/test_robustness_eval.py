"""`advpipe evaluate` on released CIFAR-10-C-style files, the full corruption suite, Grad-CAM grids, and `report --cam`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from advpipe.data.datasets import load_dataset
from advpipe.eval.cam import cam_layer, grad_cam
from advpipe.eval.corruptions import ALL_CORRUPTIONS, STANDARD_CORRUPTIONS, corrupt

pytestmark = pytest.mark.usefixtures("one_thread")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 20  # images per severity in the synthetic release tree
FILES = {"gaussian-noise": "gaussian_noise", "fog": "fog", "jpeg": "jpeg_compression", "spatter": "spatter"}


def _cli(*args: str):
    from advpipe.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(res, needle: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny CNN trained on the synthetic task, and a CIFAR-10-C-layout tree of its first N test images."""
    from advpipe.train.config import TrainConfig
    from advpipe.train.loop import train

    root = tmp_path_factory.mktemp("robust")
    out = root / "run"
    train(TrainConfig(data="synthetic", model="test-tiny-cnn", epochs=3, batch_size=64, lr=0.1, schedule="constant",
                      out=str(out), device="cpu", seed=0))
    ds = load_dataset("synthetic", "test", limit=N)
    x = ds.images.float() / 255
    tree = root / "CIFAR-10-C"
    tree.mkdir()
    np.save(tree / "labels.npy", np.tile(ds.labels.numpy().astype(np.uint8), 5))
    for name, stem in FILES.items():
        blocks = [corrupt(x, name, s, generator=torch.Generator().manual_seed(s)) for s in range(1, 6)]
        hwc = (torch.cat(blocks) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.save(tree / f"{stem}.npy", hwc)  # (5N, 32, 32, 3) uint8, severity blocks in order
    return SimpleNamespace(dir=out, ckpt=out / "best.pt", tree=tree, labels=ds.labels)


def _file_accuracy(ckpt: Path, path: Path, labels: torch.Tensor, severity: int) -> float:
    """Independent check: the model's accuracy on one severity block read straight from the .npy."""
    from advpipe.models.build import model_from_checkpoint
    from advpipe.models.checkpoint import load_checkpoint

    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    block = np.load(path)[(severity - 1) * N: severity * N]
    with torch.no_grad():
        pred = model(torch.from_numpy(block).permute(0, 3, 1, 2).float() / 255).argmax(1)
    return float((pred == labels).float().mean())


def test_release_files_end_to_end_with_report(run: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "files.json"
    res = _cli("evaluate", "--checkpoint", run.ckpt, "--limit", N, "--device", "cpu", "--batch-size", 8,
               "--corruptions-dir", run.tree, "--json", out)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert list(result["corruptions"]) == ["gaussian-noise", "fog", "jpeg", "spatter"]  # every file present
    assert result["corruption_source"]["kind"] == "files" and result["corruption_source"]["per_severity"] == N
    assert set(result["corruption_source"]["sha256"]) == {"labels.npy", *(f"{s}.npy" for s in FILES.values())}
    for name, entry in result["corruptions"].items():
        assert [lv["severity"] for lv in entry["severities"]] == [1, 2, 3, 4, 5]
        for lv in entry["severities"]:
            assert lv["n"] == N and lv["params"]["file"] == f"{FILES[name]}.npy"
            assert lv["top1"] == pytest.approx(_file_accuracy(run.ckpt, run.tree / lv["params"]["file"], run.labels,
                                                              lv["severity"]))
    summary = result["summary"]
    standard = [result["corruptions"][n]["top1"] for n in ("gaussian-noise", "fog", "jpeg")]
    assert summary["standard_corruptions"] == 3 and summary["corruptions"] == 4
    assert summary["mean_corruption_top1"] == pytest.approx(np.mean(standard))  # spatter is an extra: not in it
    assert summary["mean_corruption_top1_all"] == pytest.approx(
        np.mean([c["top1"] for c in result["corruptions"].values()]))
    assert "3/15" in res.stdout
    # the report's mean corruption column is the RobustBench-style mean over the standard corruptions
    rep = _cli("report", out, "--out", tmp_path / "report")
    assert rep.exit_code == 0, rep.output
    md = (tmp_path / "report" / "report.md").read_text()
    row = next(ln for ln in md.split("## Accuracy (%)")[1].splitlines() if ln.startswith("| files |"))
    assert row.rstrip(" |").split("|")[-1].strip().strip("*") == f"{100 * summary['mean_corruption_top1']:.2f}"


def test_release_files_select_and_severities(run: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = _cli("evaluate", "--checkpoint", run.ckpt, "--limit", 8, "--device", "cpu", "--corruptions-dir", run.tree,
               "--corruptions", "jpeg_compression,fog", "--severities", "2,5", "--json", out)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert list(result["corruptions"]) == ["fog", "jpeg"]
    assert result["corruptions"]["fog"]["severities"][1]["params"]["rows"] == [4 * N, 4 * N + 8]


def _bad_tree(tmp_path: Path, src: Path, change: str) -> Path:
    tree = tmp_path / change
    tree.mkdir()
    for f in src.iterdir():
        (tree / f.name).write_bytes(f.read_bytes())
    if change == "no-labels":
        (tree / "labels.npy").unlink()
    elif change == "float":
        np.save(tree / "fog.npy", np.load(src / "fog.npy").astype(np.float32))
    elif change == "short":
        np.save(tree / "fog.npy", np.load(src / "fog.npy")[:-1])
    elif change == "size":
        np.save(tree / "fog.npy", np.zeros((5 * N, 16, 16, 3), np.uint8))
    elif change == "labels":
        labels = np.load(src / "labels.npy")
        labels[3 * N + 1] = (labels[3 * N + 1] + 1) % 10
        np.save(tree / "labels.npy", labels)
    elif change == "garbage":
        (tree / "fog.npy").write_bytes(b"not numpy")
    return tree


@pytest.mark.parametrize("change,extra,needle", [
    ("no-labels", [], "labels.npy is missing"),
    ("float", [], "must be a uint8 array of shape (100, 32, 32, 3)"),
    ("short", [], "got shape (99, 32, 32, 3)"),
    ("size", [], "got shape (100, 16, 16, 3)"),
    ("labels", [], "does not match the evaluated test split's labels (severity 4, image 1)"),
    ("garbage", [], "cannot read"),
    ("ok", ["--corruptions", "snow"], "snow.npy is missing"),
    ("ok", ["--corruptions", "occlusion"], "occlusion has no file in the CIFAR-10-C release"),
])
def test_malformed_release_files_are_one_line_errors(run: SimpleNamespace, tmp_path: Path, change: str,
                                                     extra: list[str], needle: str) -> None:
    tree = run.tree if change == "ok" else _bad_tree(tmp_path, run.tree, change)
    res = _cli("evaluate", "--checkpoint", run.ckpt, "--limit", N, "--device", "cpu", "--corruptions-dir", tree,
               *extra, "--json", tmp_path / "x.json")
    _one_line_error(res, needle)
    assert not (tmp_path / "x.json").exists()


def test_release_dir_errors(run: SimpleNamespace, tmp_path: Path) -> None:
    base = ("evaluate", "--checkpoint", run.ckpt, "--device", "cpu", "--corruptions-dir")
    _one_line_error(_cli(*base, tmp_path / "nope"), "is not a folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(_cli(*base, tmp_path / "empty"), "holds none of the release files")
    _one_line_error(_cli(*base, run.tree), "holds 20 images per severity but the evaluated split has")


def test_all_corruptions_through_the_cli(run: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "all.json"
    res = _cli("evaluate", "--checkpoint", run.ckpt, "--limit", 16, "--device", "cpu", "--corruptions", "all",
               "--severities", "3", "--json", out)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert list(result["corruptions"]) == list(ALL_CORRUPTIONS)
    summary = result["summary"]
    assert summary["standard_corruptions"] == 15 and summary["corruptions"] == 23
    assert summary["mean_corruption_top1"] == pytest.approx(
        np.mean([result["corruptions"][n]["top1"] for n in STANDARD_CORRUPTIONS]))
    assert "15/15" in res.stdout and "all 23" in res.stdout


# --------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_finds_the_evidence() -> None:
    # One conv feature that sums the channels, global pooling, and a linear layer: class 0's
    # evidence is the bright square, so its CAM must peak there and vanish elsewhere.
    model = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[4].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    x = torch.zeros(2, 3, 16, 16)
    x[0, :, 2:6, 3:7] = 1.0
    x[1, :, 10:14, 9:13] = 1.0
    assert cam_layer(model, (3, 16, 16)) == "1"  # the ReLU's 16x16 map, not the 1x1 pool
    cams, logits = grad_cam(model, x, torch.tensor([0, 0]))
    assert cams.shape == (2, 16, 16) and cams.max() == pytest.approx(1.0)
    assert cams[0, 2:6, 3:7].min() > 0.9 and cams[0, 10:, :].max() < 0.05
    assert cams[1, 10:14, 9:13].min() > 0.9 and cams[1, :6, :].max() < 0.05
    # the other class has negative evidence everywhere: ReLU leaves nothing
    assert grad_cam(model, x, torch.tensor([1, 1]))[0].max() == 0
    assert not any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch,layer,side", [("resnet20", "model.layer3", 8), ("resnet18", "model.layer4", 4),
                                              ("vgg11", "model.features.20", 4)])
def test_cam_layer_per_architecture(arch: str, layer: str, side: int) -> None:
    from advpipe.models.build import build_model

    model = build_model(arch, load_dataset("synthetic", "test", limit=2))
    assert cam_layer(model, (3, 32, 32)) == layer
    out = {}
    dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: out.update(shape=o.shape))
    model.eval()(torch.zeros(1, 3, 32, 32))
    assert out["shape"][-1] == side


def test_cli_cam_grids_for_evaluate_and_report(run: SimpleNamespace, tmp_path: Path) -> None:
    png = tmp_path / "cams.png"
    res = _cli("evaluate", "--checkpoint", run.ckpt, "--limit", 16, "--device", "cpu", "--cam", 4, "--cam-out", png,
               "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    assert png.read_bytes().startswith(PNG_MAGIC) and f"wrote {png}" in res.stdout
    second = tmp_path / "second"
    second.mkdir()
    (second / "eval.json").write_text((tmp_path / "e.json").read_text())
    rep = _cli("report", tmp_path / "e.json", second, "--out", tmp_path / "rep", "--cam", 3)
    assert rep.exit_code == 0, rep.output
    assert (tmp_path / "rep" / "cams.png").read_bytes().startswith(PNG_MAGIC)
    assert "](cams.png)" in (tmp_path / "rep" / "report.md").read_text()
    _one_line_error(_cli("evaluate", "--checkpoint", run.ckpt, "--cam-out", png), "--cam-out needs --cam N")
    moved = tmp_path / "moved"
    moved.mkdir()
    data = json.loads((tmp_path / "e.json").read_text())
    data["checkpoint"]["path"] = str(tmp_path / "gone" / "best.pt")
    (moved / "eval.json").write_text(json.dumps(data))
    _one_line_error(_cli("report", moved, "--out", tmp_path / "rep2", "--cam", 2), "cannot find the checkpoint")
