"""ResNet-20 training images/s on this CPU: the bare step against the whole ``advpipe train`` loop.

Usage: python benchmarks/bench_train_speed.py [--rounds 3] [--epochs 3] [--old-package DIR] [--compile]

- **bare step**: batch 128 (and 256), SGD with momentum and weight decay, random data, no loader:
  fp32, bf16 autocast, and bf16 with channels_last weights and inputs (``--compile`` adds
  ``torch.compile`` of the model, timed after its compilation);
- **loop**: ``advpipe train`` on the embedded 2,000 images in bf16 through the library, in a fresh
  process per round: the training images/s of its last epochs (``metrics.jsonl``: loader, augmentation,
  step and bookkeeping) and its whole wall time per epoch (with the per-epoch evaluation);
- ``--old-package DIR`` runs the same loop from another checkout (e.g. ``git archive HEAD advpipe``
  unpacked in DIR) in the same rounds, so before and after are measured side by side.

The rounds interleave every variant, so a change of machine load hits all of them alike; the
median round is reported. FLOPs per image are counted with ``torch.utils.flop_counter`` on one
training step, and the share of the CPU's bf16 peak uses the documented per-core rate of the
instruction set this CPU has (see ``peak_bf16``), at the nominal clock ``/proc/cpuinfo`` reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: documented bf16 FLOP per cycle per core: AMX's TMUL does 1,024 bf16 operations a cycle (Intel,
#: 4th-gen Xeon); AVX-512 BF16 issues two VDPBF16PS a cycle on Intel cores with two 512-bit FMA
#: ports, each 32 bf16 multiply-adds (128 FLOP); AMD Zen 4 executes 512-bit VDPBF16PS as two 256-bit
#: halves on its two FMA pipes (64 FLOP a cycle)
BF16_FLOP_PER_CYCLE = {"amx": 1024, "avx512_bf16_intel": 128, "avx512_bf16_amd": 64}


def cpu_facts() -> dict[str, Any]:
    """Model name, nominal MHz and bf16-relevant flags from /proc/cpuinfo."""
    facts: dict[str, Any] = {"model_name": None, "mhz": None, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return facts
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and facts["model_name"] is None:
            facts["model_name"] = value
        elif key == "cpu MHz" and facts["mhz"] is None:
            facts["mhz"] = float(value)
        elif key == "flags" and not facts["flags"]:
            facts["flags"] = sorted(f for f in value.split() if f.startswith(("amx", "avx512_bf16", "avx512f")))
    return facts


def peak_bf16(facts: dict[str, Any], cores: int) -> dict[str, float]:
    """The CPU's bf16 peak in GFLOP/s for each bf16 unit it has (cores x nominal clock x documented rate)."""
    if not facts["mhz"]:
        return {}
    ghz, flags, amd = facts["mhz"] / 1000, set(facts["flags"]), "AMD" in (facts["model_name"] or "")
    out = {}
    if "amx_bf16" in flags:
        out["amx"] = cores * ghz * BF16_FLOP_PER_CYCLE["amx"]
    if "avx512_bf16" in flags:
        out["avx512_bf16"] = cores * ghz * BF16_FLOP_PER_CYCLE["avx512_bf16_amd" if amd else "avx512_bf16_intel"]
    return out


def flops_per_image(batch: int = 32) -> float:
    """FLOPs of one ResNet-20 training step (forward and backward) per image, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from advpipe.data.datasets import load_dataset
    from advpipe.models.build import build_model

    model = build_model("resnet20", load_dataset("embedded", "train")).train()
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


def bare_step(precision: str, channels_last: bool, batch: int, steps: int, compile_model: bool) -> float:
    """Images/s of the bare training step (random data, SGD), after warm-up."""
    from advpipe.data.datasets import load_dataset
    from advpipe.models.build import build_model

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model("resnet20", load_dataset("embedded", "train")).train().to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    net = torch.compile(model) if compile_model else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def loop_once(package_root: Path, epochs: int) -> dict[str, float]:
    """Run ``advpipe train`` (bf16, embedded data) in a fresh process from ``package_root``; its steady rates."""
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys; from advpipe.train.config import TrainConfig; from advpipe.train.loop import train; "
                f"train(TrainConfig(epochs={epochs}, precision='bf16', device='cpu', out=sys.argv[1]))")
        env = {**os.environ, "PYTHONPATH": str(package_root)}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, tmp], check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first epoch pays the warm-up
    n_train = 2000
    return {"train_images_per_s": statistics.median(r["images_per_s"] for r in steady),
            "epoch_time_s": statistics.median(r["epoch_time_s"] for r in steady),
            "wall_s": wall, "wall_images_per_s": n_train * epochs / wall}


def main() -> None:
    """Run the rounds and write benchmarks/results/bench_train_speed.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed bare steps per variant and round")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each loop run")
    parser.add_argument("--old-package", type=Path, help="a checkout whose advpipe/ is the 'before' loop")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the bf16 step")
    args = parser.parse_args()
    load_before = os.getloadavg()
    variants = {"fp32": ("fp32", False, 128), "bf16": ("bf16", False, 128), "bf16_cl": ("bf16", True, 128),
                "bf16_cl_b256": ("bf16", True, 256)}
    rates: dict[str, list] = {k: [] for k in variants}
    compile_rates: list[float] = []
    loops: dict[str, list] = {"after": [], **({"before": []} if args.old_package else {})}
    for r in range(args.rounds):
        for name, (precision, cl, batch) in variants.items():
            rates[name].append(bare_step(precision, cl, batch, args.steps * 128 // batch, False))
        if args.compile:
            compile_rates.append(bare_step("bf16", True, 128, args.steps, True))
        loops["after"].append(loop_once(ROOT, args.epochs))
        if args.old_package:
            loops["before"].append(loop_once(args.old_package, args.epochs))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items())
              + ", " + ", ".join(f"loop {k} {v[-1]['train_images_per_s']:.0f}" for k, v in loops.items()), flush=True)
    bare = {k: statistics.median(v) for k, v in rates.items()}
    loop = {k: {m: statistics.median(run[m] for run in v) for m in v[0]} for k, v in loops.items()}
    flops = flops_per_image()
    facts = cpu_facts()
    peaks = peak_bf16(facts, os.cpu_count() or 1)
    achieved = {"bare_bf16_cl": bare["bf16_cl"] * flops / 1e9, "loop": loop["after"]["train_images_per_s"] * flops / 1e9}
    result = {
        "rounds": args.rounds, "bare_images_per_s": bare, "bare_all_rounds": rates,
        "compile_bf16_cl_images_per_s": statistics.median(compile_rates) if compile_rates else None,
        "loop": loop, "loop_all_rounds": loops,
        "loop_over_bare_bf16_cl": loop["after"]["train_images_per_s"] / bare["bf16_cl"],
        "flops_per_image_train_step": flops, "gflops_per_s": achieved, "cpu": facts, "peak_bf16_gflops_per_s": peaks,
        "share_of_peak": {unit: {k: v / p for k, v in achieved.items()} for unit, p in peaks.items()},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    print(json.dumps({k: result[k] for k in ("bare_images_per_s", "loop", "loop_over_bare_bf16_cl",
                                             "gflops_per_s", "share_of_peak")}, indent=1))
    print(f"wrote {write_result('bench_train_speed', result)}")


if __name__ == "__main__":
    main()
