"""Robustness-suite timings: all 23 corruptions (kernels alone and through the model) and APGD-100.

Usage: python benchmarks/bench_robustness.py [--device auto] [--model resnet20] [--n 64] [--attack-n 32]
       [--steps 100] [--batch-size 64] [--threads N]

The model is freshly initialised; so that every image is attacked for all steps (as on a model
that classifies it correctly), the attacks use the model's own clean predictions as labels.
Corruptions run on the first ``--n`` embedded CIFAR-10 test images at all five severities,
attacks on the first ``--attack-n``. APGD-T is timed with 2 target classes and reported per
target (AutoAttack's APGD-T uses 9). Writes benchmarks/results/bench_robustness.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import time_it, write_result  # noqa: E402

from advpipe.attacks import pgd  # noqa: E402
from advpipe.attacks.apgd import apgd, apgd_targeted  # noqa: E402
from advpipe.data.datasets import load_dataset  # noqa: E402
from advpipe.data.loader import DeviceLoader  # noqa: E402
from advpipe.eval.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, SEVERITIES, STANDARD_CORRUPTIONS  # noqa: E402
from advpipe.eval.robustness import accuracy_pass, corruption_pass  # noqa: E402
from advpipe.models.build import build_model  # noqa: E402
from advpipe.devices import resolve_device  # noqa: E402


def main() -> None:
    """Run the benchmark and write benchmarks/results/bench_robustness.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--n", type=int, default=64, help="images for the corruption suite")
    parser.add_argument("--attack-n", type=int, default=32, help="images for the attacks")
    parser.add_argument("--steps", type=int, default=100, help="APGD iterations")
    parser.add_argument("--batch-size", type=int, default=64)
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
    results: dict = {"device": str(device), "model": args.model, "corruption_images": n,
                     "attack_images": args.attack_n, "batch_size": args.batch_size, "apgd_steps": args.steps,
                     "precision": "fp32", "corruption_kernels_images_per_s": {}}

    # corruption kernels alone: one batch, all five severities, images per second
    x = next(iter(loader)).images
    for name in ALL_CORRUPTIONS:
        corruption = CORRUPTIONS.get(name)
        g = torch.Generator(device=device).manual_seed(0)
        seconds = time_it(lambda: [corruption(x, s, generator=g) for s in SEVERITIES], repeat=2, sync=sync)
        results["corruption_kernels_images_per_s"][name] = len(x) * len(SEVERITIES) / seconds
        print(f"{name:18s} kernel {results['corruption_kernels_images_per_s'][name]:10,.0f} images/s")

    # the whole suite through the model, as advpipe evaluate runs it
    clean = accuracy_pass(model, loader, ds.num_classes)
    started = time.perf_counter()
    for name in ALL_CORRUPTIONS:
        corruption_pass(model, loader, name, SEVERITIES, ds.num_classes, clean=clean, total=len(loader))
    suite_s = time.perf_counter() - started
    corrupted = n * len(ALL_CORRUPTIONS) * len(SEVERITIES)
    results["corruption_suite"] = {"corruptions": len(ALL_CORRUPTIONS), "severities": len(SEVERITIES),
                                   "seconds": suite_s, "corrupted_images_per_s": corrupted / suite_s,
                                   "seconds_per_clean_image": suite_s / n,
                                   "standard_15_seconds_per_clean_image_est":
                                       suite_s / n * len(STANDARD_CORRUPTIONS) / len(ALL_CORRUPTIONS)}
    print(f"suite ({len(ALL_CORRUPTIONS)} x 5): {suite_s:.1f} s for {n} images, {corrupted / suite_s:,.0f} corrupted/s")

    # attacks: labels = the model's own predictions, so every image is attacked for every step
    xa = load_dataset("embedded", "test", limit=args.attack_n).images.float().div(255).to(device)
    with torch.no_grad():
        ya = model(xa).argmax(1)
    attacks = {
        f"apgd-ce-{args.steps}": lambda g: apgd(model, xa, ya, eps=8 / 255, steps=args.steps, generator=g),
        f"apgd-dlr-{args.steps}": lambda g: apgd(model, xa, ya, eps=8 / 255, steps=args.steps, loss="dlr", generator=g),
        f"apgd-t-{args.steps} (2 targets)": lambda g: apgd_targeted(model, xa, ya, eps=8 / 255, steps=args.steps,
                                                                    targets=2, generator=g),
        "pgd-20": lambda g: pgd(model, xa, ya, eps=8 / 255, steps=20, step_size=2 / 255, generator=g),
    }
    results["attacks_images_per_s"] = {}
    for name, fn in attacks.items():
        g = torch.Generator(device=device).manual_seed(0)
        seconds = time_it(lambda: fn(g), warmup=0, repeat=1, sync=sync)
        results["attacks_images_per_s"][name] = {"images_per_s": len(xa) / seconds, "seconds": seconds}
        print(f"{name:24s} {len(xa) / seconds:8.2f} images/s ({seconds:.1f} s)")
    print(f"wrote {write_result('bench_robustness', results)}")


if __name__ == "__main__":
    main()
