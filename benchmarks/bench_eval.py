"""Evaluation throughput: clean accuracy, PGD-10 and the full corruption suite, in images/s.

Usage: python benchmarks/bench_eval.py [--device auto] [--model resnet20] [--n 256] [--threads N]

The model is freshly initialised (throughput does not depend on the weights) and evaluated on
the first ``--n`` images of the embedded CIFAR-10 test subset, through the same library passes
that ``advpipe evaluate`` runs. The corruption suite is every registered corruption at every
severity; its kernels are also timed alone (without the model) per corruption.
Writes benchmarks/results/bench_eval.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import time_it, write_result  # noqa: E402

from advpipe.data.datasets import load_dataset  # noqa: E402
from advpipe.data.loader import DeviceLoader  # noqa: E402
from advpipe.eval.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, SEVERITIES  # noqa: E402
from advpipe.eval.robustness import accuracy_pass, attack_pass, corruption_pass  # noqa: E402
from advpipe.eval.specs import parse_attack_spec  # noqa: E402
from advpipe.models.build import build_model  # noqa: E402
from advpipe.devices import resolve_device  # noqa: E402


def main() -> None:
    """Run the benchmark and write benchmarks/results/bench_eval.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--n", type=int, default=256, help="evaluated images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    ds = load_dataset("embedded", "test", limit=args.n)
    torch.manual_seed(0)
    model = build_model(args.model, ds).to(device).eval()
    loader = DeviceLoader(ds, batch_size=args.batch_size, device=device, train=False)
    n = len(ds)
    results: dict = {"device": str(device), "model": args.model, "images": n, "batch_size": args.batch_size,
                     "precision": "fp32", "throughput_images_per_s": {}, "corruption_kernels_images_per_s": {}}
    speeds = results["throughput_images_per_s"]

    accuracy_pass(model, loader, ds.num_classes)  # warm-up
    clean = accuracy_pass(model, loader, ds.num_classes)
    speeds["clean"] = n / clean["seconds"]
    print(f"clean: {speeds['clean']:,.0f} images/s")

    spec = parse_attack_spec("pgd:eps=8/255,steps=10")
    started = time.perf_counter()
    attack_pass(model, loader, spec, ds.num_classes, clean=clean, total=len(loader))
    speeds["pgd-10"] = n / (time.perf_counter() - started)
    print(f"pgd-10: {speeds['pgd-10']:,.1f} images/s")

    started = time.perf_counter()
    for name in ALL_CORRUPTIONS:
        corruption_pass(model, loader, name, SEVERITIES, ds.num_classes, clean=clean, total=len(loader))
    suite_s = time.perf_counter() - started
    corrupted_images = n * len(ALL_CORRUPTIONS) * len(SEVERITIES)
    speeds["corruption_suite"] = corrupted_images / suite_s
    results["corruption_suite"] = {"corruptions": len(ALL_CORRUPTIONS), "severities": len(SEVERITIES),
                                   "corrupted_images": corrupted_images, "seconds": suite_s,
                                   "clean_images_per_s": n / suite_s}
    print(f"corruption suite ({len(ALL_CORRUPTIONS)} x {len(SEVERITIES)}): {speeds['corruption_suite']:,.0f} "
          f"corrupted images/s, {suite_s:.1f} s for {n} images")

    x = next(iter(loader)).images
    for name in ALL_CORRUPTIONS:
        corruption = CORRUPTIONS.get(name)
        g = torch.Generator(device=device).manual_seed(0)
        seconds = time_it(lambda: [corruption(x, s, generator=g) for s in SEVERITIES], repeat=3, sync=sync)
        results["corruption_kernels_images_per_s"][name] = len(x) * len(SEVERITIES) / seconds
    slowest = min(results["corruption_kernels_images_per_s"].items(), key=lambda kv: kv[1])
    print(f"corruption kernels alone: slowest {slowest[0]} at {slowest[1]:,.0f} images/s")
    print(f"wrote {write_result('bench_eval', results)}")


if __name__ == "__main__":
    main()
