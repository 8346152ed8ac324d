"""Training throughput of resnet20, resnet18 and vgg19 at batch 128, and the device loader alone.

Usage: python benchmarks/bench_train.py [--device auto] [--steps 5] [--precision fp32]
The loader goal: batch production (gather, pad-crop, flip, float) at least 10x faster than one
resnet20 training step, so the loader is never the bottleneck.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import time_it, write_result  # noqa: E402

from advpipe.data.datasets import load_dataset  # noqa: E402
from advpipe.data.loader import DeviceLoader  # noqa: E402
from advpipe.precision import autocast_context  # noqa: E402
from advpipe.models.build import build_model  # noqa: E402
from advpipe.devices import resolve_device  # noqa: E402


def main() -> None:
    """Run the benchmark and write benchmarks/results/bench_train.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--models", default="resnet20,resnet18,vgg19")
    args = parser.parse_args()
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    ds = load_dataset("embedded", "train")
    loader = DeviceLoader(ds, batch_size=args.batch_size, device=device, seed=0)
    batches_per_epoch = len(loader)

    def one_epoch_of_batches() -> None:
        for _ in loader:
            pass

    loader_s = time_it(one_epoch_of_batches, repeat=5, sync=sync) / batches_per_epoch
    results = {"device": str(device), "batch_size": args.batch_size, "precision": args.precision,
               "loader": {"seconds_per_batch": loader_s, "images_per_s": args.batch_size / loader_s}, "models": {}}
    print(f"loader: {args.batch_size / loader_s:,.0f} images/s")
    batch = next(iter(loader))
    for name in args.models.split(","):
        model = build_model(name, ds).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            with autocast_context(device, args.precision):
                loss = F.cross_entropy(model(batch.images), batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step_s = time_it(step, warmup=2, repeat=args.steps, sync=sync)
        results["models"][name] = {"seconds_per_step": step_s, "images_per_s": args.batch_size / step_s}
        print(f"{name}: {args.batch_size / step_s:,.1f} images/s")
    r20 = results["models"].get("resnet20")
    if r20:
        ratio = r20["seconds_per_step"] / loader_s
        results["loader_speedup_over_resnet20_step"] = ratio
        results["loader_goal_met"] = ratio >= 10
        print(f"loader is {ratio:.1f}x faster than a resnet20 step (goal >= 10x)")
    print(f"wrote {write_result('bench_train', results)}")


if __name__ == "__main__":
    main()
