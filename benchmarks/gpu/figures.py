"""The headline figures of the GPU kit, measured with the code of benchmarks/bench_augment.py and bench_attack.py.

Each function takes the device and the sizes (run_kit.py holds the full and the dry-run sizes)
and returns a JSON-able dict. docs/gpu.md says what each figure means and which goal it meets.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parents[1]
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_attack  # noqa: E402
import bench_augment  # noqa: E402

from advpipe.attacks.sparse import SparseAttackConfig  # noqa: E402
from advpipe.augment.base import AugmentContext, build_augment  # noqa: E402
from advpipe.data.batch import Batch  # noqa: E402
from advpipe.data.datasets import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from advpipe.precision import autocast_context  # noqa: E402
from advpipe.models.normalize import Normalized  # noqa: E402
from advpipe.models.registry import create_model  # noqa: E402
from advpipe.train.methods import MethodContext, build_method  # noqa: E402

#: CIFAR-10's training split, the store a full precompute writes
CIFAR10_TRAIN = 50_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_speed(device: torch.device, batches: list[int], repeats: int) -> dict[str, Any]:
    """AdvMask ``sample_squares`` masks/s with the torch backend (the CUDA default) per batch size.

    CIFAR-sized attack-like masks (about 100 clustered points per 32x32 image) and the paper's
    CIFAR-10 settings, timed by :func:`bench_augment.time_kernel` (3 warm-up calls, then the median).
    """
    masks = bench_augment.attack_like_masks(max(batches), seed=0)
    out: dict[str, Any] = {"backend": "torch", "repeats": repeats,
                           "settings": {"l": bench_augment.L_RANGE, "p": bench_augment.P_RANGE,
                                        "o_max": bench_augment.O_MAX, "points_per_image": 100}}
    for b in batches:
        out[str(b)] = bench_augment.time_kernel(masks[:b].to(device), repeats, seed=b, backend="torch")
    return out


def train_step_ratio(device: torch.device, *, model: str, batch: int, blocks: int, steps_per_block: int,
                     precision: str) -> dict[str, Any]:
    """Time of a training step with ``--aug advmask`` (prob 0.8) over one with ``--aug none``.

    The step is the training loop's (advpipe/train/loop.py): augmentation, then the standard
    method under ``autocast_context(precision)``, GradScaler (fp16 only), SGD; the model is in
    channels_last as the loop puts it on CUDA. Blocks of ``steps_per_block`` steps are timed
    between two synchronisations, so the GPU queue stays full as in training; advmask and none
    blocks alternate so drifting clocks hit both alike. The ratio is of the median block times.
    """
    torch.manual_seed(0)
    net = Normalized(create_model(model, 10), CIFAR10_MEAN, CIFAR10_STD).to(device)
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    method = build_method("standard", MethodContext(10, 1, (32, 32)))
    aug = build_augment("advmask", AugmentContext("cifar10", (32, 32), 10, CIFAR10_MEAN, epochs=1))
    aug.set_epoch(0, 1)  # full strength: 0.8 of each batch occluded
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, 3, 32, 32, generator=g, device=device)
    labels = torch.randint(0, 10, (batch,), generator=g, device=device)
    masks = bench_augment.attack_like_masks(batch, seed=3).to(device)
    base = Batch(images, labels, torch.arange(batch, device=device), {"attack_mask": masks})

    def step(augment: bool) -> None:
        b = base.replace(images=aug(base.images, side=base.side, generator=g)) if augment else base
        with autocast_context(device, precision):
            loss = method.step(net, b, g)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def block(augment: bool) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps_per_block):
            step(augment)
        _sync(device)
        return time.perf_counter() - start

    block(False), block(True)  # warm-up: cuDNN's algorithm choice, allocator, numba or kernel caches
    none_t, adv_t = [], []
    for _ in range(blocks):
        none_t.append(block(False))
        adv_t.append(block(True))
    none_s, adv_s = statistics.median(none_t) / steps_per_block, statistics.median(adv_t) / steps_per_block
    return {"model": model, "batch": batch, "precision": precision, "channels_last": True, "blocks": blocks,
            "steps_per_block": steps_per_block, "none_step_s": none_s, "advmask_step_s": adv_s,
            "ratio": adv_s / none_s, "none_images_per_s": batch / none_s, "advmask_images_per_s": batch / adv_s}


def attack_speed(device: torch.device, *, model: str, batches: list[int], steps: int, repeat: int,
                 precision: str) -> dict[str, Any]:
    """Sparse-attack and MI-FGSM images/s per batch size (fresh weights, noise images), projected to T = 200.

    :func:`bench_attack._time_row` times both attacks at ``steps`` and ``2 * steps`` (fastest of
    ``repeat`` interleaved rounds, MI-FGSM under the same autocast); :func:`bench_attack._row`
    splits fixed and per-step cost and projects images/s and the cost ratio to the default steps.
    """
    torch.manual_seed(0)
    net = Normalized(create_model(model, 10), CIFAR10_MEAN, CIFAR10_STD).to(device).eval().requires_grad_(False)
    dtype = None if precision == "fp32" else precision
    default_steps = SparseAttackConfig().steps
    rows: dict[str, Any] = {}
    for b in batches:
        x, y = bench_attack._batch(net, b, None, device)
        timings = bench_attack._time_row(net, x, y, [steps, 2 * steps], repeat, dtype, device)
        rows[str(b)] = bench_attack._row(b, steps, default_steps, timings)
    return {"model": model, "precision": precision, "weights": "random", "steps": steps, "repeat": repeat,
            "projected_to_steps": default_steps, "batches": rows}


def precompute_projection(attack: dict[str, Any], n: int = CIFAR10_TRAIN) -> dict[str, Any]:
    """Seconds for ``n`` images at the default steps, from the fastest batch size's projected images/s.

    Where noise kept :func:`bench_attack._row` from projecting a batch size, its time at ``steps``
    is scaled linearly to the default steps instead (an over-estimate: it scales the fixed part too).
    Model loading, data reads and store writes are not counted.
    """
    default_steps = attack["projected_to_steps"]
    per_batch = {}
    for b, row in attack["batches"].items():
        if "projected_sparse_images_per_s" in row:
            per_batch[b] = (row["projected_sparse_images_per_s"], "projected")
        else:
            per_batch[b] = (row["sparse_images_per_s"] * attack["steps"] / default_steps, "scaled")
    best = max(per_batch, key=lambda b: per_batch[b][0])
    rate, basis = per_batch[best]
    return {"images": n, "steps": default_steps, "model": attack["model"], "precision": attack["precision"],
            "batch": int(best), "images_per_s": rate, "basis": basis, "seconds": n / rate,
            "seconds_by_batch": {b: n / r for b, (r, _) in per_batch.items()}}
