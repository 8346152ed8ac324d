"""The GPU kit (benchmarks/gpu/, docs/gpu.md) stays runnable: its CPU dry run, and the wheel checks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

KIT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_kit_{name}", KIT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "kit.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVPIPE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(KIT / "run_kit.py"), "--dry-run", str(out)], capture_output=True,
                          text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert report["dry_run"] is True and report["device"]["type"] == "cpu"
    assert report["versions"]["torch"] and report["versions"]["zarr"] and report["versions"]["advpipe"]
    assert set(report["versions"]["imports"].values()) == {"ok"}
    assert {name: s["status"] for name, s in report["stages"].items()} == dict.fromkeys(
        ("tests", "kernel", "train_step", "attack"), "ok")
    # the cuda tests were collected and, without a GPU, all skipped
    tests = report["tests"]
    assert tests["ok"] and tests["failure"] == tests["error"] == tests["passed"] == 0
    assert tests["skipped"] == len(tests["cases"]) >= 6
    assert all("test_cuda" in c["test"] and "GPU" in c["message"] for c in tests["cases"])
    figs = report["figures"]
    for b in settings["kernel_batches"]:
        kernel = figs["kernel"][str(b)]
        assert kernel["batch"] == b and kernel["masks_per_s"] > 0
        assert 0.15 < kernel["mean_masked_fraction"] < 0.45  # p ~ U[0.2, 0.4] on attack-like masks
    step = figs["train_step"]
    assert step["batch"] == settings["step"]["batch"] and step["none_step_s"] > 0 and step["advmask_step_s"] > 0
    assert step["ratio"] == pytest.approx(step["advmask_step_s"] / step["none_step_s"])
    rows = figs["attack"]["batches"]
    assert list(rows) == [str(b) for b in settings["attack"]["batches"]]
    assert all(r["sparse_images_per_s"] > 0 and r["mifgsm_images_per_s"] > 0 for r in rows.values())
    projection = figs["precompute_projection"]
    assert projection["images"] == 50_000 and projection["steps"] == 200 and projection["seconds"] > 0
    # how the goals and the projection are computed is checked on hand-computed figures below
    goals = report["goals"]
    assert set(goals) == {"kernel_masks_per_s", "advmask_step_ratio", "sparse_cost_vs_mifgsm", "cifar10_precompute_s"}
    assert all(isinstance(g["met"], bool) and "dry run" in g["note"] for g in goals.values())
    assert "goal kernel_masks_per_s" in proc.stdout and f"wrote {out}" in proc.stdout


#: an attack stage's figures, made up so that every projection below can be computed by hand
ATTACK = {"model": "vgg19", "precision": "bf16", "steps": 40, "projected_to_steps": 200, "batches": {
    "128": {"sparse_images_per_s": 100.0, "cost_vs_mifgsm": 1.5, "projected_sparse_images_per_s": 80.0,
            "projected_cost_vs_mifgsm": 1.2},
    "256": {"sparse_images_per_s": 120.0, "cost_vs_mifgsm": 1.4, "projected_sparse_images_per_s": 100.0,
            "projected_cost_vs_mifgsm": 1.25},
    "512": {"sparse_images_per_s": 200.0, "cost_vs_mifgsm": 1.35},  # noise: not projected, scaled instead
}}


def test_precompute_projection_and_goals_on_hand_computed_figures(monkeypatch):
    monkeypatch.syspath_prepend(str(KIT))
    kit = _load("run_kit")
    projection = kit.figures.precompute_projection(ATTACK)
    # 128: 80/s; 256: 100/s; 512: 200/s at 40 steps is 40/s at 200 steps. 50,000 images at 100/s: 500 s.
    assert projection["batch"] == 256 and projection["basis"] == "projected"
    assert projection["images_per_s"] == 100.0 and projection["seconds"] == 500.0
    assert projection["seconds_by_batch"] == {"128": 625.0, "256": 500.0, "512": 1250.0}
    report = {"dry_run": False, "figures": {
        "kernel": {"256": {"masks_per_s": 400_000.0}, "1024": {"masks_per_s": 1_000_000.0}},
        "train_step": {"ratio": 1.031}, "attack": ATTACK, "precompute_projection": projection}}
    goals = kit.goals(report, kit.PROFILES["full"])
    assert {name: (g["value"], g["met"], g["measured_at"]) for name, g in goals.items()} == {
        "kernel_masks_per_s": (1_000_000.0, True, "batch 1024"),  # at the largest batch; the goal is ">= 1e6"
        "advmask_step_ratio": (1.031, False, "batch 256"),  # "<= 1.03"
        "sparse_cost_vs_mifgsm": (1.35, False, "batch >= 256"),  # worst of 256 (projected 1.25) and 512 (1.35)
        "cifar10_precompute_s": (500.0, True, "batch 256"),  # "<= 600"
    }
    assert not any("note" in g for g in goals.values())
    dry = kit.goals({"dry_run": True, "figures": {}}, kit.PROFILES["dry-run"])
    assert all(g["value"] is None and g["met"] is None and "dry run" in g["note"] for g in dry.values())


def test_kit_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(KIT / "run_kit.py"), str(tmp_path / "kit.json")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
    assert not (tmp_path / "kit.json").exists()


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_wheel_check_follows_extras_and_markers_for_the_machine(tmp_path):
    wheels = _load("prepare_wheels")
    a = _fake_wheel(tmp_path, "pkg_a", "1.0", ["pkg-b>=1", "pkg_c[fast]", "old-only; python_version < '3.12'",
                                               "docs-only; extra == 'docs'", "Pkg.There"])
    c = _fake_wheel(tmp_path, "pkg_c", "2.0", ['pkg-d; extra == "fast"', 'pkg-e; extra == "slow"',
                                               "win-only; sys_platform == 'win32'"])
    # pkg-b is neither shipped nor on the machine; pkg-d is needed through pkg_c's "fast" extra
    assert wheels.missing_requirements([a, c], frozenset({"pkg-there"})) == [
        "pkg-a: pkg-b>=1", 'pkg-c: pkg-d; extra == "fast"']
    b = _fake_wheel(tmp_path, "pkg_b", "1.1", [])
    d = _fake_wheel(tmp_path, "pkg_d", "0.1", [])
    assert wheels.missing_requirements([a, b, c, d], frozenset({"pkg-there"})) == []
    assert wheels.duplicates([a, b, _fake_wheel(tmp_path, "pkg_b", "1.2", [])]) == ["pkg-b"]


def test_wheel_pins_ship_only_what_the_machine_lacks():
    wheels = _load("prepare_wheels")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned = {canonicalize_name(Requirement(p).name) for p in wheels.PINS}
    assert {"zarr", "numcodecs", "dask", "distributed", "segmentation-models-pytorch"} <= pinned
    assert not pinned & wheels.DEVICE_HAS  # the machine's own version would be shadowed
    assert {"torch", "timm", "numba", "typer", "rich", "pyyaml", "fsspec"} <= wheels.DEVICE_HAS
    command = wheels.install_command(wheels.DEST)
    assert command.startswith("python3 -m pip install") and "--no-index --no-deps" in command
    assert "--target /tmp/site benchmarks/gpu/wheels/*.whl" in command and command.endswith("PYTHONPATH=/tmp/site")
