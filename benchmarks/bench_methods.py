"""Epoch time of every online training method relative to plain training, against its predicted cost.

Usage: python benchmarks/bench_methods.py [--model resnet20] [--data embedded] [--limit 512]
       [--batch-size 128] [--reps 3] [--device auto] [--precision fp32] [--threads N]

Every method trains its own copy of the same model on the same batches, side by side: each batch
goes through every method in turn (rotating order), ``--reps`` epochs, and the ratio is median
epoch time / median plain epoch time.
What is timed is the training loop's per-batch work: ``method.step``, backward and the SGD step,
as in ``advpipe.train.loop`` (the device loader, identical for every method, and evaluation are
excluded).

Predicted cost: each method reports its passes per step (``Method.passes()``) in full-batch units:
forwards, backwards through weights and inputs, input-only backwards (attack gradients) and, for
A-FAN, head-only passes. The benchmark prices one pass of each kind on this machine by timing a
forward, a forward + backward and a forward + input-only backward of the same model on the same
batches, interleaved with the methods' steps (head passes scale by the head's share of forward
FLOPs), so the pass-count
prediction is ``sum(passes * unit time) / (forward + backward time)``. On CPUs an input-only
backward costs nearly as much as a full one (BN/ReLU backward and data movement dominate the
small weight gradients), which is why calibrated prices beat the textbook F=1, B=2, B_in=1; that
textbook ratio is also reported (``predicted_ratio_textbook``), as is a FLOP count of one actual
step plus backward (``predicted_ratio_flops``). Goal: measured ratio <= pass-count prediction * 1.15.

Anchor (a-fan.txt Tab. 4, ResNet-18 on CIFAR-10, GTX 1080 Ti): AdvProp 123 s / 23 s = 5.3x,
A-FAN 56 s / 23 s = 2.4x per epoch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402

import advpipe.train  # noqa: E402,F401  (registers the methods)
from advpipe.data.batch import Batch  # noqa: E402
from advpipe.data.datasets import load_dataset  # noqa: E402
from advpipe.data.loader import DeviceLoader  # noqa: E402
from advpipe.precision import autocast_context  # noqa: E402
from advpipe.models.build import build_model  # noqa: E402
from advpipe.models.normalize import unwrap  # noqa: E402
from advpipe.train.methods import MethodContext, build_method  # noqa: E402
from advpipe.devices import resolve_device  # noqa: E402

METHODS = ["standard", "advprop", "afan", "m2at", "mtlat", "mixup", "tlat"]
TEXTBOOK = {"forward": 1.0, "backward": 2.0, "input_backward": 1.0}
HEAD_OF = {"head_forward": "forward", "head_backward": "backward", "head_input_backward": "input_backward"}


class FlopCount(TorchDispatchMode):
    """Counts matmul/conv FLOPs of every aten op, forward and backward (``torch.utils.flop_counter``'s
    formulas). FlopCounterMode itself cannot run ``autograd.grad`` on leaves, which attacks need."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def predicted_ratio(passes: dict[str, float], head_share: float, unit: dict[str, float]) -> float:
    """Cost of a step with these passes relative to plain training, given per-pass costs ``unit``."""
    cost = sum(unit[k] * v for k, v in passes.items() if k in unit)
    cost += sum(unit[HEAD_OF[k]] * v * head_share for k, v in passes.items() if k in HEAD_OF)
    return cost / (unit["forward"] + unit["backward"])


def pass_probes(model: torch.nn.Module) -> dict[str, Callable[[Batch], None]]:
    """Callables running one forward, forward + full backward, forward + input-only backward."""

    def forward(batch: Batch) -> None:
        torch.nn.functional.cross_entropy(model(batch.images), batch.labels)

    def full(batch: Batch) -> None:
        torch.nn.functional.cross_entropy(model(batch.images), batch.labels).backward()
        model.zero_grad(set_to_none=True)

    def input_only(batch: Batch) -> None:
        leaf = batch.images.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(leaf), batch.labels), leaf)

    return {"pass:forward": forward, "pass:full": full, "pass:input": input_only}


def step_flops(method, model, batch: Batch) -> int:
    """FLOPs of one ``method.step`` plus the backward of its loss (matmul/conv ops)."""
    counter = FlopCount()
    with counter:
        out = method.step(model, batch, torch.Generator(device=batch.images.device).manual_seed(0))
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.total


def head_share(method, model, batch: Batch) -> float:
    """Forward FLOPs of A-FAN's head as a share of the full model's forward FLOPs (0 for others)."""
    if not hasattr(method, "split"):
        return 0.0
    layer, head = method.split(unwrap(model))
    feats = []
    handle = unwrap(model).get_submodule(layer).register_forward_hook(lambda m, i, o: feats.append(o))
    full = FlopCount()
    with torch.no_grad(), full:
        model(batch.images)
    handle.remove()
    part = FlopCount()
    with torch.no_grad(), part:
        head(feats[0])
    return part.total / max(1, full.total)


def main() -> None:
    """Run the benchmark and write benchmarks/results/bench_methods.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--limit", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3, help="timed epochs per method (interleaved)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = args.methods.split(",")
    if "standard" not in names:
        names.insert(0, "standard")
    ds = load_dataset(args.data, "train", limit=args.limit)
    loader = DeviceLoader(ds, batch_size=args.batch_size, device=device, seed=0, workers=0)
    ctx = MethodContext(ds.num_classes, 1, tuple(ds.image_shape[1:]))
    load_start = machine()["load_average"]

    runs = {}
    probe = next(iter(loader))
    for name in names:
        method = build_method(name, ctx)
        model = method.prepare(build_model(args.model, ds)).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        passes = method.passes() if hasattr(method, "passes") else {"forward": 1.0, "backward": 1.0}
        share = head_share(method, model, probe)
        runs[name] = {"method": method, "model": model, "opt": opt, "passes": passes, "head_share": share,
                      "flops": step_flops(method, model, probe), "times": []}

    probes = pass_probes(build_model(args.model, ds).to(device).train())
    for fn in probes.values():
        fn(probe)  # warm-up

    def timed(name: str, batch: Batch) -> float:
        sync()
        start = time.perf_counter()
        if name in probes:
            probes[name](batch)
        else:
            run = runs[name]
            with autocast_context(device, args.precision):
                out = run["method"].step(run["model"], batch, run["gen"])
            run["opt"].zero_grad(set_to_none=True)
            out["loss"].backward()
            run["opt"].step()
        sync()
        return time.perf_counter() - start

    # Side by side at the step level: every batch goes through every method, and through the three
    # pass probes that price one pass of each kind, in turn (rotating order), so load changes on a
    # shared machine hit all of them alike. A method's epoch time is the sum of its step times.
    order_all = names + list(probes)
    totals: dict[str, list[float]] = {name: [] for name in order_all}
    for rep in range(args.reps):
        loader.set_epoch(rep)
        epoch_time = dict.fromkeys(order_all, 0.0)
        for run in runs.values():
            run["gen"] = torch.Generator(device=device).manual_seed(rep)
        for i, batch in enumerate(loader):
            shift = i % len(order_all)
            for name in order_all[shift:] + order_all[:shift]:
                epoch_time[name] += timed(name, batch)
        for name in order_all:
            totals[name].append(epoch_time[name])
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {t:.1f}s" for n, t in epoch_time.items()), flush=True)
    for name in names:
        runs[name]["times"] = totals[name]
    steps = len(loader)
    f, fb, fi = (statistics.median(totals[k]) / steps for k in ("pass:forward", "pass:full", "pass:input"))
    unit = {"forward": f, "backward": fb - f, "input_backward": fi - f}
    print("seconds per pass: " + ", ".join(f"{k} {v:.3f}" for k, v in unit.items()), flush=True)

    base_time = statistics.median(runs["standard"]["times"])
    base_flops = runs["standard"]["flops"]
    results = {}
    for name, run in runs.items():
        measured = statistics.median(run["times"]) / base_time
        predicted = predicted_ratio(run["passes"], run["head_share"], unit)
        results[name] = {
            "epoch_seconds": run["times"],
            "measured_ratio": round(measured, 3),
            "passes_per_step": run["passes"],
            "head_flop_share": round(run["head_share"], 5),
            "predicted_ratio_passes": round(predicted, 3),
            "predicted_ratio_textbook": round(predicted_ratio(run["passes"], run["head_share"], TEXTBOOK), 3),
            "predicted_ratio_flops": round(run["flops"] / base_flops, 3),
            "within_budget": measured <= 1.15 * predicted,
        }
        print(f"{name:9s} measured {measured:5.2f}x  predicted {predicted:5.2f}x (passes), "
              f"{run['flops'] / base_flops:5.2f}x (flops)  {'ok' if measured <= 1.15 * predicted else 'OVER'}")
    path = write_result("bench_methods", {
        "command": " ".join(sys.argv),
        "setup": {"model": args.model, "data": args.data, "limit": args.limit, "batch_size": args.batch_size,
                  "steps_per_epoch": len(loader), "reps": args.reps, "device": str(device),
                  "precision": args.precision, "load_average_at_start": load_start},
        "seconds_per_pass": unit,
        "anchor_a_fan_tab4": {"advprop": 5.3, "afan": 2.4, "setting": "ResNet-18, CIFAR-10, GTX 1080 Ti"},
        "methods": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
