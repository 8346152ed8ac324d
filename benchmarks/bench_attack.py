"""AdvMask sparse attack: speed (images/s, batching, cost vs MI-FGSM), encoder choices, and the sweep.

Usage:
    python benchmarks/bench_attack.py [speed] [--quick] [--steps T] [--repeat R] [--precisions fp32,bf16]
        [--threads N] [--device auto]
    python benchmarks/bench_attack.py sweep --checkpoint best.pt --data-dir DIR [--n 64] \
        [--eps 8/255] [--set KEY=VALUE ...] [--label NAME]

``speed`` times :func:`advpipe.attacks.sparse.sparse_attack` with its default config (only the
steps and the classifier's precision vary) on freshly initialised ResNet-20 and VGG19 at batch
sizes 1, 32 and 128, against plain MI-FGSM with the same number of steps under the same autocast,
then times the encoder options (per-image vs shared linear encoder; U-Net backbones at 64x64 and
224x224). Each attack runs at T and 2T steps (T = 20, fastest of 3 interleaved rounds), which separates the
fixed cost (the sparse attack's initial dense attack) from the per-step cost and projects both to
the default 200 steps. Precisions: fp32, plus bf16 where the device computes it natively (what
``precompute-masks --precision auto`` picks). ``--quick`` uses T = 10, one repeat and U-Net at
64x64 only. Writes benchmarks/results/bench_attack.json.

``sweep`` runs one attack setting (defaults plus ``--set`` overrides) on the first ``--n``
CIFAR-10 test images that the checkpoint classifies correctly, in one batch, and appends a line
(model, its test accuracy, the resolved config, ASR, l0, l2, seconds) to
benchmarks/results/sweep_attack.jsonl. docs/attack.md lists the settings that chose the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write_result  # noqa: E402

from advpipe.attacks.dense import mifgsm  # noqa: E402
from advpipe.attacks.encoders import build_encoder  # noqa: E402
from advpipe.attacks.sparse import SparseAttackConfig, sparse_attack  # noqa: E402
from advpipe.data.datasets import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from advpipe.precision import autocast_context  # noqa: E402
from advpipe.models.normalize import Normalized  # noqa: E402
from advpipe.models.registry import create_model  # noqa: E402
from advpipe.devices import fast_bf16, resolve_device  # noqa: E402

UNET_BACKBONES = ("resnet18", "mobilenet_v2", "efficientnet-b0")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn, repeat: int, device: torch.device) -> float:
    """Fastest of ``repeat`` timed calls: on a shared CPU the minimum is the least contended run."""
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _time_row(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: list[int], repeat: int,
              dtype: str | None, device: torch.device) -> dict:
    """Seconds of the sparse attack and of MI-FGSM (same autocast) on one batch, for each step count."""
    gen = torch.Generator(device=device).manual_seed(0)
    eps = float(SparseAttackConfig().eps)

    def dense(n: int) -> None:
        with autocast_context(device, dtype or "fp32"):
            mifgsm(model, x, y, eps=eps, steps=n)

    # Warm-up with short runs so one-off allocations and kernel selection are not timed.
    sparse_attack(model, x, y, SparseAttackConfig(steps=2, init_steps=1, autocast_dtype=dtype), generator=gen)
    dense(2)
    # Interleaved rounds, fastest kept: the CPU's speed drifts by up to 1.7x over minutes (other
    # tenants of the host), so timing one attack's repeats back to back would bias the ratios.
    t: dict = {}
    for _ in range(repeat):
        for n in steps:
            cfg = SparseAttackConfig(steps=n, autocast_dtype=dtype)
            for key, fn in (("sparse", lambda: sparse_attack(model, x, y, cfg, generator=gen)),
                            ("mifgsm", lambda: dense(n))):
                seconds = _best_of(fn, 1, device)
                t[key, n] = min(t.get((key, n), seconds), seconds)
    return t


def _batch(model: torch.nn.Module, b: int, pool: tuple[torch.Tensor, torch.Tensor] | None,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` images and labels: correctly classified test images when ``pool`` is given, else uniform noise."""
    if pool is None:
        x = torch.rand(b, 3, 32, 32, generator=torch.Generator(device=device).manual_seed(0), device=device)
        with torch.no_grad():
            return x, model(x).argmax(1)
    images, labels = pool
    idx = torch.arange(b) % len(labels)
    return images[idx].to(device), labels[idx].to(device)


def _trained(checkpoint: str, data_dir: str, device: torch.device, pool: int = 1000):
    """(checkpoint, model in eval mode, pool accuracy, correct images, their labels) on the first ``pool`` test images."""
    from advpipe.data.datasets import load_dataset
    from advpipe.models.build import model_from_checkpoint
    from advpipe.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, map_location=device)
    model = model_from_checkpoint(ckpt).to(device).eval().requires_grad_(False)
    ds = load_dataset("cifar10", "test", data_dir=data_dir, limit=pool)
    x, y = ds.images.float().div(255).to(device), ds.labels.to(device)
    with torch.no_grad():
        ok = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(y), 256)]) == y
    return ckpt, model, float(ok.float().mean()), x[ok], y[ok]


def _models(args: argparse.Namespace, device: torch.device) -> dict:
    """arch -> (model, pool of correct test images or None): trained checkpoints if given, else fresh weights."""
    trained = dict(item.split("=", 1) for item in args.checkpoints.split(",")) if args.checkpoints else {}
    out = {}
    for arch in args.models.split(","):
        if arch not in trained:
            torch.manual_seed(0)
            model = Normalized(create_model(arch, 10), CIFAR10_MEAN, CIFAR10_STD).to(device).eval()
            out[arch] = (model.requires_grad_(False), None)
            continue
        ckpt, model, _, x, y = _trained(trained[arch], args.data_dir, device)
        if ckpt.arch != arch:
            raise SystemExit(f"{trained[arch]} holds a {ckpt.arch}, not a {arch}")
        out[arch] = (model, (x, y))
    return out


def _row(b: int, steps: int, default_steps: int, t: dict) -> dict:
    """Images/s and cost ratios of one batch size; below the default steps, the per-step split and projection."""
    row = {
        "sparse_images_per_s": b / t["sparse", steps], "mifgsm_images_per_s": b / t["mifgsm", steps],
        "sparse_seconds": t["sparse", steps], "mifgsm_seconds": t["mifgsm", steps],
        "cost_vs_mifgsm": t["sparse", steps] / t["mifgsm", steps],
    }
    # Timing noise on a shared CPU can make the longer run look faster; then nothing is projected.
    if ("sparse", 2 * steps) in t and all(t[k, 2 * steps] > t[k, steps] for k in ("sparse", "mifgsm")):
        per_step = {k: (t[k, 2 * steps] - t[k, steps]) / steps for k in ("sparse", "mifgsm")}
        fixed = {k: max(t[k, steps] - steps * per_step[k], 0.0) for k in ("sparse", "mifgsm")}
        projected = {k: fixed[k] + default_steps * per_step[k] for k in ("sparse", "mifgsm")}
        row.update({
            "per_step_cost_vs_mifgsm": per_step["sparse"] / per_step["mifgsm"],
            "sparse_fixed_seconds": fixed["sparse"],
            "projected_sparse_images_per_s": b / projected["sparse"],
            "projected_mifgsm_images_per_s": b / projected["mifgsm"],
            "projected_cost_vs_mifgsm": projected["sparse"] / projected["mifgsm"],
        })
    return row


def _speedups(rows: dict) -> dict:
    """Per batch size: the sparse attack's and MI-FGSM's images/s over batch 1, and their ratio.

    MI-FGSM's gain is what batching the classifier alone gives on this device, an upper bound for
    any attack whose cost is mostly classifier passes; ``of_mifgsm_gain`` says how much of it the
    sparse attack keeps (above 1: it gains more, because batching also amortises its encoder).
    """
    out = {}
    for size in sorted(int(k) for k in rows if k != "1"):
        big, one = rows[str(size)], rows["1"]
        key = "projected_" if "projected_sparse_images_per_s" in big and "projected_sparse_images_per_s" in one else ""
        sparse = big[f"{key}sparse_images_per_s"] / one[f"{key}sparse_images_per_s"]
        dense = big[f"{key}mifgsm_images_per_s"] / one[f"{key}mifgsm_images_per_s"]
        out[str(size)] = {"sparse": sparse, "mifgsm": dense, "of_mifgsm_gain": sparse / dense,
                          "basis": "projected" if key else "measured"}
    return out


def bench_speed(args: argparse.Namespace) -> None:
    """Images/s of the sparse attack and MI-FGSM per precision, model and batch size; encoder timings.

    Both attacks are timed at ``steps`` and at ``2 * steps``, MI-FGSM under the same autocast as
    the sparse attack's classifier. The difference gives the cost per step and the rest the fixed
    cost (the sparse attack's initial dense attack and extra forwards), from which images/s and the
    cost ratio at the default number of steps are projected.
    """
    device = resolve_device(args.device)
    default_steps = SparseAttackConfig().steps
    steps = args.steps or (10 if args.quick else 20)
    repeat = args.repeat or (1 if args.quick else 3)
    step_counts = [steps] if steps >= default_steps else [steps, 2 * steps]
    precisions = args.precisions.split(",") if args.precisions else (
        ["fp32", "bf16"] if fast_bf16(device) else ["fp32"])
    models = _models(args, device)
    results: dict = {"device": str(device), "steps": steps, "repeat": repeat, "quick": args.quick,
                     "projected_to_steps": default_steps if len(step_counts) > 1 else None,
                     "fast_bf16": fast_bf16(device),
                     "weights": {arch: "trained" if pool is not None else "random" for arch, (_, pool) in models.items()},
                     "config": SparseAttackConfig(steps=steps).to_dict(), "precisions": {}, "encoders": {}}
    for precision in precisions:
        dtype = None if precision == "fp32" else precision
        by_model: dict = {}
        for arch, (model, pool) in models.items():
            rows: dict = {}
            for b in [int(v) for v in args.batch_sizes.split(",")]:
                x, y = _batch(model, b, pool, device)
                timings = _time_row(model, x, y, step_counts, repeat, dtype, device)
                row = rows[str(b)] = _row(b, steps, default_steps, timings)
                line = (f"{precision} {arch} B={b}: sparse {row['sparse_images_per_s']:.2f} img/s, MI-FGSM "
                        f"{row['mifgsm_images_per_s']:.2f} img/s at {steps} steps (x{row['cost_vs_mifgsm']:.2f})")
                if "projected_cost_vs_mifgsm" in row:
                    line += (f"; per step x{row['per_step_cost_vs_mifgsm']:.2f}; projected at {default_steps} "
                             f"steps: {row['projected_sparse_images_per_s']:.3f} img/s, "
                             f"x{row['projected_cost_vs_mifgsm']:.2f}")
                print(line, flush=True)
            if "1" in rows and len(rows) > 1:
                rows["batched_speedup_over_batch_1"] = _speedups(rows)
                for size, sp in rows["batched_speedup_over_batch_1"].items():
                    print(f"{precision} {arch} B={size} over B=1 ({sp['basis']}): sparse x{sp['sparse']:.2f}, "
                          f"MI-FGSM x{sp['mifgsm']:.2f}", flush=True)
            by_model[arch] = rows
        results["precisions"][precision] = by_model
    if not args.skip_encoders:
        results["encoders"] = bench_encoders(device, quick=args.quick)
    path = write_result(args.result_name, results)
    print(f"wrote {path}")


def bench_encoders(device: torch.device, *, quick: bool) -> dict:
    """Per-image cost of one encoder step (forward, backward, Adam) for each encoder option."""
    out: dict = {}

    def step_time(enc: torch.nn.Module, shape: tuple[int, ...]) -> float:
        opt = torch.optim.Adam(enc.parameters(), lr=1e-3, fused=True)
        params = list(enc.parameters())
        d = torch.rand(shape, device=device) * 0.06 - 0.03

        def one() -> None:
            leaf = d.clone().requires_grad_(True)
            grads = torch.autograd.grad(torch.sigmoid(enc(leaf)).sum(), [leaf, *params], allow_unused=True)
            for p, g in zip(params, grads[1:]):
                p.grad = g
            opt.step()

        one()
        return _best_of(one, 2 if quick else 4, device)

    gen = torch.Generator(device=device).manual_seed(0)
    b = 32
    for scope in ("batch", "image"):
        enc = build_encoder("linear", (3, 32, 32), b, scope=scope, generator=gen, device=device)
        t = step_time(enc, (b, 3, 32, 32))
        n = sum(p.numel() for p in enc.parameters())
        out[f"linear/{scope}@32/B{b}"] = {"ms_per_image": 1000 * t / b, "parameters": n,
                                          "param_plus_adam_MB": 3 * 4 * n / 2**20}
        print(f"linear {scope} 32x32 B={b}: {1000 * t / b:.2f} ms/img, {n / 1e6:.1f}M params", flush=True)
    sizes = [(64, 8)] if quick else [(64, 8), (224, 2)]
    for backbone in UNET_BACKBONES:
        for size, bb in sizes:
            enc = build_encoder("unet", (3, size, size), bb, options={"backbone": backbone}, generator=gen,
                                device=device).train()
            t = step_time(enc, (bb, 3, size, size))
            n = sum(p.numel() for p in enc.parameters())
            out[f"unet-{backbone}@{size}/B{bb}"] = {"ms_per_image": 1000 * t / bb, "parameters": n}
            print(f"unet {backbone} {size}x{size} B={bb}: {1000 * t / bb:.1f} ms/img, {n / 1e6:.1f}M params",
                  flush=True)
    return out


def _parse_value(text: str):
    """A --set value: JSON (numbers, true/false/null, strings) or a fraction such as 8/255."""
    if "/" in text and text.replace("/", "").isdigit():
        num, den = text.split("/")
        return Fraction(int(num), int(den))
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def bench_sweep(args: argparse.Namespace) -> None:
    """One sweep setting on correctly classified CIFAR-10 test images; appends a JSON line."""
    device = resolve_device(args.device)
    ckpt, model, pool_acc, x_ok, y_ok = _trained(args.checkpoint, args.data_dir, device, args.pool)
    x, y = x_ok[args.skip: args.skip + args.n], y_ok[args.skip: args.skip + args.n]
    overrides = {"eps": _parse_value(args.eps), "autocast_dtype": args.autocast}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)
    cfg = SparseAttackConfig(**overrides)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    res = sparse_attack(model, x, y, cfg, generator=gen)
    seconds = time.perf_counter() - start
    summary = res.summary()
    line = {
        "label": args.label, "model": ckpt.arch, "checkpoint": str(args.checkpoint),
        "model_test_acc": ckpt.metrics.get("test_acc"), "model_epoch": ckpt.epoch,
        "pool_clean_acc": pool_acc, "n": len(y), "skip": args.skip, "seed": args.seed,
        "overrides": {k: (str(v) if isinstance(v, Fraction) else v) for k, v in overrides.items()},
        "config": res.config, **summary, "images_per_s": len(y) / seconds, "seconds": seconds,
        "threads": torch.get_num_threads(), "machine": machine()["platform"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(line) + "\n")
    print(f"{args.label or overrides}: ASR {summary['asr']:.1%}, l0 {summary['l0_elements']:.1f} elements "
          f"({summary['l0_pixels']:.1f} px, median {summary['l0_elements_median']:.0f}), l2 {summary['l2']:.3f}, "
          f"init ASR {summary['init_asr']:.1%}, {len(y) / seconds:.2f} img/s", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Parse the sub-command (``speed`` when none is given) and run it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("speed", "sweep", "-h", "--help") for a in argv):
        argv.insert(0, "speed")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto")
    common.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("speed", parents=[common], help="images/s, batching, cost vs MI-FGSM, encoders")
    speed.add_argument("--quick", action="store_true", help="10 steps, one repeat, U-Net at 64x64 only")
    speed.add_argument("--steps", type=int, default=None, help="T (default 20; quick 10): below the config's 200, "
                       "attacks are timed at T and 2T steps and projected to 200")
    speed.add_argument("--models", default="resnet20,vgg19")
    speed.add_argument("--batch-sizes", default="1,32,128")
    speed.add_argument("--precisions", default=None,
                       help="comma list of fp32, bf16, fp16 (default: fp32,bf16 where bf16 is native, else fp32)")
    speed.add_argument("--repeat", type=int, default=None, help="interleaved timing rounds, fastest kept "
                       "(default 3; quick 1)")
    speed.add_argument("--checkpoints", default=None, help="ARCH=PATH,... trained models to time on correctly "
                       "classified CIFAR-10 test images (needs --data-dir); others use fresh weights and noise")
    speed.add_argument("--data-dir", default=None, help="CIFAR-10 folder for --checkpoints")
    speed.add_argument("--skip-encoders", action="store_true", help="time only the attacks")
    speed.add_argument("--result-name", default="bench_attack", help="results/<name>.json")
    sweep = sub.add_parser("sweep", parents=[common], help="one attack setting on a trained checkpoint")
    sweep.add_argument("--checkpoint", required=True)
    sweep.add_argument("--data-dir", required=True)
    sweep.add_argument("--n", type=int, default=64, help="correctly classified test images attacked")
    sweep.add_argument("--skip", type=int, default=0, help="skip this many correctly classified images first")
    sweep.add_argument("--pool", type=int, default=1000, help="test images searched for correct ones")
    sweep.add_argument("--eps", default="8/255")
    sweep.add_argument("--autocast", default="bf16", help="autocast dtype for the optimisation (bf16, fp16, none)")
    sweep.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--label", default="")
    sweep.add_argument("--out", default=str(RESULTS / "sweep_attack.jsonl"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "sweep" and args.autocast == "none":
        args.autocast = None
    {"speed": bench_speed, "sweep": bench_sweep}[args.command](args)


if __name__ == "__main__":
    main()
