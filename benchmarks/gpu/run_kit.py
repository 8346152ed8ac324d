"""The GPU kit: check every CUDA path and measure the headline figures in one run (docs/gpu.md).

Usage, from the repository root:
    python benchmarks/gpu/run_kit.py OUT.json            # a CUDA machine: well under 8 minutes on one H200
    python benchmarks/gpu/run_kit.py --dry-run OUT.json  # the same stages, tiny sizes, CPU (tests/test_gpu_kit.py)

Stages, each timed and recorded even when it fails:
1. ``tests``: ``pytest -m cuda tests/test_cuda.py`` in a subprocess (junit XML parsed per test);
2. ``kernel``: AdvMask kernel masks/s, torch backend, batch 256 and 1024;
3. ``train_step``: ResNet-18 step time with ``--aug advmask`` over ``--aug none``, batch 256,
   fp16 autocast and channels_last;
4. ``attack``: sparse attack and MI-FGSM images/s, VGG19 in bf16, batch 128, 256 and 512, timed at
   40 and 80 steps and projected to the default 200; then the projected time of a full CIFAR-10
   train-split precompute.
The JSON (device, versions, settings, test outcomes, figures, goals met or not, stage times) is
rewritten after every stage, so a run cut short still leaves what it measured. Exit code 0 when every
stage ran and every test passed, 1 otherwise (goals missed do not fail the run), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's advpipe, the one the tests run

import torch  # noqa: E402

import figures  # noqa: E402
from common import machine  # noqa: E402

import advpipe  # noqa: E402
from advpipe.devices import fast_bf16  # noqa: E402
from advpipe.files import atomic_write_text  # noqa: E402

#: sizes of a real run and of the CPU dry run (the same code at tiny sizes, with ResNet-20 for speed)
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"device": "cuda", "test_timeout_s": 300, "kernel_batches": [256, 1024], "kernel_repeats": 30,
             "step": {"model": "resnet18", "batch": 256, "blocks": 7, "steps_per_block": 10, "precision": "fp16"},
             "attack": {"model": "vgg19", "batches": [128, 256, 512], "steps": 40, "repeat": 3, "precision": "bf16"},
             "cost_goal_from_batch": 256},
    "dry-run": {"device": "cpu", "test_timeout_s": 240, "kernel_batches": [16, 32], "kernel_repeats": 2,
                "step": {"model": "resnet20", "batch": 4, "blocks": 2, "steps_per_block": 1, "precision": "bf16"},
                "attack": {"model": "resnet20", "batches": [2, 4], "steps": 2, "repeat": 1, "precision": "bf16"},
                "cost_goal_from_batch": 4},
}
#: name -> (how the value compares, target, what it is); docs/gpu.md explains each
GOALS = {
    "kernel_masks_per_s": (">=", 1_000_000, "AdvMask kernel masks/s at the largest batch (1024)"),
    "advmask_step_ratio": ("<=", 1.03, "ResNet-18 step time, --aug advmask over --aug none, batch 256"),
    "sparse_cost_vs_mifgsm": ("<=", 1.3, "sparse attack time over MI-FGSM's at batch 256 and above (worst)"),
    "cifar10_precompute_s": ("<=", 600, "projected seconds for the CIFAR-10 train split, VGG19, T = 200"),
}
PACKAGES = ("torch", "torchvision", "numpy", "numba", "zarr", "numcodecs", "dask", "distributed",
            "segmentation-models-pytorch", "timm", "typer", "rich", "pytest")


def versions() -> dict[str, Any]:
    """Python, the packages advpipe runs on, CUDA/cuDNN/NCCL, advpipe and the checkout's commit."""
    out: dict[str, Any] = {"python": platform.python_version(), "advpipe": advpipe.__version__,
                           "advpipe_path": str(Path(advpipe.__file__).parent)}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    # the shipped wheels and numba must import, not only be installed (advpipe imports smp lazily)
    out["imports"] = {}
    for module in ("zarr", "numcodecs", "google_crc32c", "dask", "distributed", "segmentation_models_pytorch", "numba"):
        try:
            importlib.import_module(module)
            out["imports"][module] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded, the stages that need it fail on their own
            out["imports"][module] = f"{type(exc).__name__}: {exc}"
    out["torch_built_with_cuda"] = torch.version.cuda
    out["cudnn"] = out["nccl"] = None
    if torch.cuda.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError, TypeError):
            pass
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["commit"] = None
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    """What the figures ran on: the GPU's name, capability, memory and driver, or just the CPU."""
    info: dict[str, Any] = {"type": device.type, "fast_bf16": fast_bf16(device)}
    if device.type != "cuda":
        return {**info, "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                multiprocessors=props.multi_processor_count, count=torch.cuda.device_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        info["driver"], info["max_sm_clock"] = [v.strip() for v in smi[0].split(",")][:2]
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        info["driver"] = None
    return info


def run_tests(timeout_s: float) -> dict[str, Any]:
    """``pytest -m cuda tests/test_cuda.py`` in its own process group; per-test outcomes from its junit XML.

    With pytest-timeout installed (the lent machine has it) each test gets a third of the time, so
    one hung test (an NCCL or dask start, say) fails alone; past ``timeout_s`` the whole group,
    dask workers included, is killed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        junit, log = Path(tmp) / "junit.xml", Path(tmp) / "pytest.log"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "tests/test_cuda.py"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd.insert(-1, f"--timeout={int(timeout_s // 3)}")
        out: dict[str, Any] = {"command": " ".join(cmd[1:]), "timed_out": False}
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                out["returncode"] = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                out["returncode"], out["timed_out"] = None, True
        text = log.read_text(errors="replace")
        out["output_tail"] = text[-4000:]
        print(text[-1500:], flush=True)
        cases = []
        if junit.is_file():
            for case in ET.parse(junit).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for child in case:
                    if child.tag in ("failure", "error", "skipped"):
                        outcome, message = child.tag, (child.get("message") or child.text or "")[:600]
                cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                              "seconds": float(case.get("time") or 0), "message": message})
    out["cases"] = cases
    for outcome in ("passed", "failure", "error", "skipped"):
        out[outcome] = sum(c["outcome"] == outcome for c in cases)
    out["ok"] = out["returncode"] == 0 and not out["failure"] and not out["error"]
    return out


def _goal(name: str, value: float | None, where: str) -> dict[str, Any]:
    op, target, what = GOALS[name]
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    return {"what": what, "target": f"{op} {target:g}", "value": value, "met": met, "measured_at": where}


def goals(report: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """Each goal's value from the figures measured so far, and whether it is met (None: not measured)."""
    figs = report["figures"]
    kernel = figs.get("kernel")
    biggest = str(max(profile["kernel_batches"]))
    attack = figs.get("attack")
    costs = None
    if attack:
        costs = [row.get("projected_cost_vs_mifgsm", row["cost_vs_mifgsm"]) for b, row in attack["batches"].items()
                 if int(b) >= profile["cost_goal_from_batch"]]
    step, projection = figs.get("train_step"), figs.get("precompute_projection")
    out = {
        "kernel_masks_per_s": _goal("kernel_masks_per_s", kernel[biggest]["masks_per_s"] if kernel else None,
                                    f"batch {biggest}"),
        "advmask_step_ratio": _goal("advmask_step_ratio", step["ratio"] if step else None,
                                    f"batch {profile['step']['batch']}"),
        "sparse_cost_vs_mifgsm": _goal("sparse_cost_vs_mifgsm", max(costs) if costs else None,
                                       f"batch >= {profile['cost_goal_from_batch']}"),
        "cifar10_precompute_s": _goal("cifar10_precompute_s", projection["seconds"] if projection else None,
                                      f"batch {projection['batch']}" if projection else "-"),
    }
    if report["dry_run"]:
        for goal in out.values():
            goal["note"] = "dry run: tiny sizes on the CPU, the goal does not apply"
    return out


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: the device, the tests, each figure and its goal."""
    dev, tests = report["device"], report.get("tests") or {}
    lines = [f"advpipe GPU kit{' (dry run)' if report['dry_run'] else ''} on {dev.get('name')} "
             f"({report['total_seconds']:.0f} s)"]
    lines += [f"import {m} FAILED: {state}" for m, state in report["versions"]["imports"].items() if state != "ok"]
    if tests:
        lines.append(f"cuda tests: {tests['passed']} passed, {tests['failure']} failed, {tests['error']} errors, "
                     f"{tests['skipped']} skipped" + (" (TIMED OUT)" if tests["timed_out"] else ""))
        lines += [f"  {c['outcome'].upper()} {c['test']}: {c['message'][:200]}" for c in tests["cases"]
                  if c["outcome"] in ("failure", "error")]
    kernel = report["figures"].get("kernel")
    if kernel:
        lines.append("kernel: " + ", ".join(f"batch {b} {kernel[b]['masks_per_s']:,.0f} masks/s"
                                            for b in kernel if b.isdigit()))
    attack = report["figures"].get("attack")
    if attack:
        for b, row in attack["batches"].items():
            rate = row.get("projected_sparse_images_per_s")
            lines.append(f"attack batch {b}: sparse {row['sparse_images_per_s']:,.1f} img/s, MI-FGSM "
                         f"{row['mifgsm_images_per_s']:,.1f} img/s at {attack['steps']} steps; x"
                         f"{row.get('projected_cost_vs_mifgsm', row['cost_vs_mifgsm']):.2f}"
                         + (f", {rate:,.1f} img/s at {attack['projected_to_steps']} steps" if rate else ""))
    for name, goal in report["goals"].items():
        value = "not measured" if goal["value"] is None else f"{goal['value']:,.3f}"
        state = {True: "met", False: "NOT met", None: "-"}[goal["met"]]
        lines.append(f"goal {name} ({goal['measured_at']}): {value} (target {goal['target']}): {state}")
    for name, stage in report["stages"].items():
        if stage["status"] != "ok":
            lines.append(f"stage {name}: {stage['status']} {stage.get('error', '')}".rstrip())
    return "\n".join(lines)


def _stage(report: dict[str, Any], name: str, fn: Callable[[], Any], deadline: float, device: torch.device,
           out: Path) -> Any:
    """Run one stage unless the time budget is spent; record its time, peak memory and any error; save the JSON."""
    record: dict[str, Any] = {"status": "skipped", "error": "time budget spent"}
    result = None
    if time.monotonic() < deadline:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.monotonic()
        try:
            result = fn()
            record = {"status": "ok"}
        except Exception as exc:  # noqa: BLE001 - one broken stage must not cost the others' figures
            record = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        record["seconds"] = time.monotonic() - start
        if device.type == "cuda":
            record["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    report["stages"][name] = record
    print(f"[kit] {name}: {record['status']} ({record.get('seconds', 0):.1f} s)", flush=True)
    save(report, out)
    return result


def save(report: dict[str, Any], out: Path) -> None:
    """Write the report atomically (a run killed mid-write keeps the previous version)."""
    atomic_write_text(out, json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the stages, write the JSON, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the JSON report")
    parser.add_argument("--dry-run", action="store_true", help="the same stages at tiny sizes on the CPU")
    parser.add_argument("--skip-tests", action="store_true", help="measure only")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no stage after this many seconds (default 450: the run stays under 8 minutes)")
    args = parser.parse_args(argv)
    profile = PROFILES["dry-run" if args.dry_run else "full"]
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run to check the kit on the CPU", file=sys.stderr)
        return 2
    device = torch.device(profile["device"], 0) if profile["device"] == "cuda" else torch.device("cpu")
    started = time.monotonic()
    deadline = started + args.budget_s
    report: dict[str, Any] = {
        "kit": "advpipe-gpu-kit", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dry_run": args.dry_run, "device": device_info(device), "machine": machine(), "versions": versions(),
        "settings": profile, "environment": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                                                                             "PYTHONPATH")},
        "tests": None, "figures": {}, "goals": {}, "stages": {}, "total_seconds": 0.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save(report, args.out)
    if not args.skip_tests:
        report["tests"] = _stage(report, "tests", lambda: run_tests(min(profile["test_timeout_s"], args.budget_s / 2)),
                                 deadline, device, args.out)
    figs = report["figures"]
    stages = (
        ("kernel", lambda: figures.kernel_speed(device, profile["kernel_batches"], profile["kernel_repeats"])),
        ("train_step", lambda: figures.train_step_ratio(device, **profile["step"])),
        ("attack", lambda: figures.attack_speed(device, **profile["attack"])),
    )
    for name, fn in stages:
        result = _stage(report, name, fn, deadline, device, args.out)
        if result is not None:
            figs[name] = result
        if name == "attack" and result is not None:
            figs["precompute_projection"] = figures.precompute_projection(result)
        report["goals"] = goals(report, profile)
        report["total_seconds"] = time.monotonic() - started
        save(report, args.out)
    print(summary(report))
    print(f"wrote {args.out}")
    tests_ok = args.skip_tests or bool(report["tests"] and report["tests"]["ok"])
    return 0 if tests_ok and all(s["status"] == "ok" for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
