"""Benchmark AdvMask's batched square sampler against a straightforward per-image NumPy version.

Measures masks/s of :func:`advpipe.augment.advmask.sample_squares` at batch 128 and 256 on CIFAR-sized
attack masks (32x32, about 100 clustered points, l in [2,15], p in [0.2,0.4], o_max 0.1) and, in the
same run, a plain per-image NumPy implementation of the same rules; writes
``benchmarks/results/bench_augment.json`` with the numbers and the machine they came from.

Run: ``.venv/bin/python benchmarks/bench_augment.py [--device cpu] [--threads 1,2]``. On a machine
shared with other busy processes, set ``OMP_WAIT_POLICY=PASSIVE``: otherwise OpenMP workers spin
between parallel kernels and starve the main thread (recorded in the report).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from advpipe.augment.advmask import DEFAULT_MAX_CANDIDATES, sample_squares

L_RANGE, P_RANGE, O_MAX = (2, 15), (0.2, 0.4), 0.1
OUT = Path(__file__).parent / "results" / "bench_augment.json"


def attack_like_masks(n: int, seed: int, size: int = 32, points: int = 100) -> torch.Tensor:
    """Masks with about ``points`` points per image, drawn from 2-4 Gaussian clusters plus 20% uniform."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size * size, dtype=torch.bool)
    k = 4
    centres = 4 + torch.rand(n, k, 2, generator=g) * (size - 8)
    spread = 2 + 4 * torch.rand(n, k, 1, generator=g)
    draws = points * 2  # duplicates and out-of-image draws are dropped; 2x leaves about ``points`` distinct
    which = torch.randint(0, k, (n, draws), generator=g)
    yx = centres.gather(1, which[..., None].expand(n, draws, 2)) + \
        spread.gather(1, which[..., None]) * torch.randn(n, draws, 2, generator=g)
    uniform = torch.rand(n, draws, generator=g) < 0.2
    yx = torch.where(uniform[..., None], torch.rand(n, draws, 2, generator=g) * size, yx).round().long()
    inside = ((yx >= 0) & (yx < size)).all(-1)
    flat = (yx[..., 0] * size + yx[..., 1]).clamp(0, size * size - 1)
    masks.scatter_(1, flat, inside)
    # trim to ``points`` by dropping random extras so every image is close to the target count
    keys = torch.rand(n, size * size, generator=g).masked_fill_(~masks, 2.0)
    keep = keys.argsort(1)[:, :points]
    out = torch.zeros_like(masks).scatter_(1, keep, True) & masks
    return out.view(n, size, size)


def numpy_squares(mask: np.ndarray, rng: np.random.Generator, k_max: int) -> np.ndarray:
    """The same rules, one image at a time, written plainly: returns the (H,W) keep mask."""
    h, w = mask.shape
    p, o = rng.uniform(*P_RANGE), rng.uniform(0, O_MAX)
    t_max, target = math.floor(P_RANGE[1] * h * w + 1e-6), math.ceil(p * h * w - 1e-6)

    def run(points: np.ndarray) -> np.ndarray:
        cover = np.zeros((h, w), bool)
        boxes: list[tuple[int, int, int, int, int]] = []
        covered = 0
        for r, c in points[rng.permutation(len(points))[:k_max]]:
            if covered >= target:
                break
            side = int(rng.integers(L_RANGE[0], L_RANGE[1] + 1))
            y0, x0 = r - side // 2, c - side // 2
            y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y0 + side, h), min(x0 + side, w)
            area = (y1 - y0) * (x1 - x0)
            clash = False
            for a0, b0, a1, b1, a_area in boxes:
                inter = max(0, min(y1, a1) - max(y0, a0)) * max(0, min(x1, b1) - max(x0, b0))
                if inter > o * min(area, a_area):
                    clash = True
                    break
            if clash:
                continue
            new = area - int(cover[y0:y1, x0:x1].sum())
            if covered + new > t_max:
                continue
            cover[y0:y1, x0:x1] = True
            covered += new
            boxes.append((y0, x0, y1, x1, area))
        return cover

    points = np.argwhere(mask)
    cover = run(points)
    if len(points) == 0 or cover.sum() < math.ceil(P_RANGE[0] * h * w - 1e-6):
        cover = run(np.argwhere(np.ones_like(mask)))
    return ~cover


def time_kernel(masks: torch.Tensor, repeats: int, seed: int, backend: str) -> dict[str, float]:
    """Median and best seconds per call of sample_squares on ``masks`` with the given scan backend."""
    g = torch.Generator(device=masks.device).manual_seed(seed)
    for _ in range(3):  # includes numba's compile (or cache load) on the first call
        sample_squares(masks, L_RANGE, P_RANGE, O_MAX, g, backend=backend)
    times, cpu_times = [], []
    for _ in range(repeats):
        if masks.device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        out = sample_squares(masks, L_RANGE, P_RANGE, O_MAX, g, backend=backend)
        if masks.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    frac = out.masked_fraction().float()
    b = len(masks)
    return {"batch": b, "median_s": statistics.median(times), "best_s": min(times),
            "masks_per_s": b / statistics.median(times), "masks_per_s_best": b / min(times),
            "masks_per_s_cpu_time": b / statistics.median(cpu_times),
            "mean_masked_fraction": float(frac.mean()), "fallback_rate": float(out.fallback_used.float().mean())}


def time_numpy(masks: torch.Tensor, seed: int) -> dict[str, float]:
    """Seconds per image of the per-image NumPy implementation."""
    rng = np.random.default_rng(seed)
    arr = masks.cpu().numpy()
    t = time.perf_counter()
    keeps = [numpy_squares(m, rng, DEFAULT_MAX_CANDIDATES) for m in arr]
    elapsed = time.perf_counter() - t
    return {"images": len(arr), "seconds": elapsed, "masks_per_s": len(arr) / elapsed,
            "mean_masked_fraction": float(np.mean([1 - k.mean() for k in keeps]))}


def train_step_ratio(device: torch.device, steps: int, batch: int = 128) -> dict[str, float]:
    """Time of a resnet18 training step with ``--aug advmask`` (prob 0.8) over the time with ``--aug none``."""
    import torch.nn.functional as F

    from advpipe.augment.base import AugmentContext, build_augment
    from advpipe.models.normalize import Normalized
    from advpipe.models.registry import create_model

    model = Normalized(create_model("resnet18", 10), (0.5,) * 3, (0.25,) * 3).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    aug = build_augment("advmask", AugmentContext("cifar10", (32, 32), 10, (0.49, 0.48, 0.45), epochs=1))
    aug.set_epoch(0, 1)  # full strength: 0.8 of each batch occluded
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, 3, 32, 32, generator=g, device=device)
    labels = torch.randint(0, 10, (batch,), generator=g, device=device)
    masks = attack_like_masks(batch, seed=3).to(device)
    side = {"attack_mask": masks}

    def step(augment: bool) -> None:
        x = aug(images, side=side, generator=g) if augment else images
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(augment: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(augment)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step(False), step(True)
    # interleave the two so machine noise hits both alike
    none_t, adv_t = [], []
    for _ in range(steps):
        none_t.append(timed(False))
        adv_t.append(timed(True))
    return {"steps": steps, "batch": batch, "none_step_s": statistics.median(none_t),
            "advmask_step_s": statistics.median(adv_t),
            "ratio": statistics.median(adv_t) / statistics.median(none_t)}


def machine() -> dict[str, object]:
    """Where the numbers come from."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "default_torch_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_before": os.getloadavg() if hasattr(os, "getloadavg") else None}


def main() -> None:
    """Run the benchmark and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread counts to measure (default: 1 and torch's default)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--numpy-images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--train-steps", type=int, default=5,
                        help="interleaved resnet18 steps for the advmask/none step-time ratio (0 skips it)")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, default_threads})
    device = torch.device(args.device)
    info = {**machine(), "device": str(device)}
    report: dict[str, object] = {"machine": info,
                                 "settings": {"image": [32, 32], "l": L_RANGE, "p": P_RANGE, "o_max": O_MAX,
                                              "points_per_image": 100, "max_candidates": DEFAULT_MAX_CANDIDATES}}
    masks = attack_like_masks(max(256, args.numpy_images), seed=0)
    reference = time_numpy(masks[: args.numpy_images], seed=1)
    # the default backend on CPU is numba (compiled scan); the batched torch rounds run beside it
    backends = ["numba", "torch"] if device.type == "cpu" else ["torch"]
    runs = {}
    for backend in backends:
        for n in threads:
            torch.set_num_threads(n)
            runs[f"{backend}/{n}"] = {str(b): time_kernel(masks[:b].to(device), args.repeats, seed=b, backend=backend)
                                      for b in (128, 256)}
    torch.set_num_threads(default_threads)
    report["sample_squares_by_backend_threads"] = runs
    report["numpy_per_image"] = reference
    report["speedup_vs_numpy"] = {n: {b: k["masks_per_s"] / reference["masks_per_s"] for b, k in run.items()}
                                  for n, run in runs.items()}
    if args.train_steps:
        report["resnet18_step_ratio"] = train_step_ratio(device, args.train_steps)
        r = report["resnet18_step_ratio"]
        print(f"resnet18 step with --aug advmask / --aug none: {r['ratio']:.3f} (goal < 1.05)")
    info["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for n, run in runs.items():
        for b, k in run.items():
            print(f"sample_squares backend/threads {n} batch {b}: {k['masks_per_s']:,.0f} masks/s "
                  f"(best {k['masks_per_s_best']:,.0f}, by CPU time {k['masks_per_s_cpu_time']:,.0f}); "
                  f"x{k['masks_per_s'] / reference['masks_per_s']:.1f} vs NumPy")
    print(f"numpy per image: {reference['masks_per_s']:,.0f} masks/s; wrote {args.out}")


if __name__ == "__main__":
    main()
