"""The AdvMask sparse attack at 224x224: peak memory and images/s per step, and a projected GPU time.

Usage:
    python benchmarks/bench_attack_224.py [--quick] [--batches 1,8,32] [--encoders unet,linear]
        [--precisions bf16] [--steps 3] [--threads 2] [--timeout 900]

Each configuration (encoder, batch, precision) runs in a child process of its own, so its peak
resident memory is its own: the parent reads the child's ``ru_maxrss`` from ``os.wait4`` (the
peak RSS of that one process, tensors included), and the child reports its ``ru_maxrss`` just
before the attack (imports, victim and images) so the attack's share is the difference.

The victim is torchvision's ResNet-50 with fresh weights (no download) and 1,000 classes,
normalization inside, on uniform-noise 224x224 images; the attack is
:func:`advpipe.attacks.sparse.sparse_attack` with the default config except ``steps`` = T, a
one-step dense start (``init_steps=1, init_extra_steps=0``: the start is a fixed cost, not
timed), the encoder and the classifier's autocast precision. The time per step is taken between
consecutive ``on_step`` calls (steps 1..T-1: the steady steps; step 0 carries the first-call
costs); the fastest steady step is kept (on a shared CPU it is the least contended one).
``--quick`` (for a loaded 2-core machine, where batch 32 alone takes over half an hour) runs
T = 3 at batch 1 and T = 2 (one steady step) at batch 8, skips batch 32, and extrapolates its
memory linearly from batches 1 and 8 (marked as such in the JSON).

The linear encoder at 224x224 has (3*224*224 + 1) x 224*224 = 7.55G parameters; the attack
refuses it when its weights, gradient and Adam state exceed the free memory
(:func:`advpipe.attacks.encoders.check_linear_fits`), and the child records that refusal.

The FLOPs of one attack step (encoder forward and backward, victim forward and input-gradient
backward, one fp32 success-check forward) are counted with ``torch.utils.flop_counter`` at batch 1.
From them and an ASSUMED sustained GPU throughput the script projects the time of 50,000 images at
T = 200 (plus the default dense start, about 10 victim forward+backward passes per image): a
projection, not a measurement. Writes benchmarks/results/bench_attack_224.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

SIZE = 224
CLASSES = 1000
#: assumed sustained throughput of one H100 on this convnet workload, TFLOP/s (see docs/scaling.md):
#: MLPerf-class ResNet-50 training reaches about 5,000 img/s x 12.3 GFLOP = 60 TFLOP/s per H100;
#: a plain PyTorch attack loop is taken at 1/3 to 2/3 of that
GPU_TFLOPS_ASSUMED = (20.0, 40.0)
PROJECT_IMAGES, PROJECT_STEPS, PROJECT_INIT_PASSES = 50_000, 200, 10


def _victim():
    """Fresh-weight torchvision ResNet-50 with ImageNet normalization inside, eval mode, no parameter grads."""
    import torch
    import torchvision

    from advpipe.data.datasets import IMAGENET_MEAN, IMAGENET_STD
    from advpipe.models.normalize import Normalized

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, num_classes=CLASSES)
    return Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval().requires_grad_(False)


def child(encoder: str, batch: int, precision: str, steps: int, threads: int, size: int, out: Path) -> None:
    """Run one attack and write its timings (and the RSS before it) to ``out`` as JSON."""
    import torch

    from advpipe.attacks.sparse import SparseAttackConfig, sparse_attack
    from advpipe.errors import AdvpipeError

    torch.set_num_threads(threads)
    model = _victim()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen)
    y = torch.randint(0, CLASSES, (batch,), generator=gen)
    cfg = SparseAttackConfig(steps=steps, init_steps=1, init_extra_steps=0, encoder=encoder,
                             autocast_dtype=None if precision == "fp32" else precision)
    stamps: list[float] = []
    record: dict = {"rss_before_attack_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    start = time.perf_counter()
    try:
        sparse_attack(model, x, y, cfg, generator=gen, on_step=lambda info: stamps.append(time.perf_counter()))
    except AdvpipeError as exc:
        record["refused"] = str(exc)
    record["total_s"] = time.perf_counter() - start
    record["first_step_after_s"] = stamps[0] - start if stamps else None
    record["steady_step_s"] = [b - a for a, b in zip(stamps, stamps[1:])]
    out.write_text(json.dumps(record))


def run_child(encoder: str, batch: int, precision: str, steps: int, threads: int, timeout: float,
              size: int = SIZE) -> dict:
    """One configuration in its own process: its record plus the process's peak RSS (from wait4)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "row.json", Path(tmp) / "stderr.txt"
        cmd = [sys.executable, __file__, "--child", encoder, str(batch), precision, str(steps), str(threads),
               str(size), str(out)]
        with open(err, "w") as err_fh:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_fh)
        start = time.perf_counter()
        status = None
        while time.perf_counter() - start < timeout:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.5)
        if status is None or not pid:
            proc.kill()  # our own child, by its pid
            _, status, usage = os.wait4(proc.pid, 0)
            return {"encoder": encoder, "batch": batch, "precision": precision, "steps": steps,
                    "timed_out_after_s": timeout, "peak_rss_mib": usage.ru_maxrss / 1024}
        row = {"encoder": encoder, "batch": batch, "precision": precision, "steps": steps,
               "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "exit_status": os.waitstatus_to_exitcode(status)}
        if out.is_file():
            rec = json.loads(out.read_text())
            row["rss_before_attack_mib"] = round(rec.pop("rss_before_attack_kib") / 1024, 1)
            row["attack_rss_delta_mib"] = round(row["peak_rss_mib"] - row["rss_before_attack_mib"], 1)
            row.update(rec)
            if rec["steady_step_s"]:
                step = min(rec["steady_step_s"])  # the least contended step on a shared CPU
                row["step_s"] = round(step, 3)
                row["images_per_s_per_step"] = round(batch / step, 4)
                row["s_per_image_step"] = round(step / batch, 3)
        else:
            row["stderr_tail"] = err.read_text()[-600:]
        return row


def step_flops() -> dict:
    """FLOPs per image of one attack step and of one dense-start pass, counted at batch 1 (fp32)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from advpipe.attacks.encoders import build_encoder

    model = _victim()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, SIZE, SIZE, generator=gen)
    y = torch.zeros(1, dtype=torch.long)
    enc = build_encoder("unet", (3, SIZE, SIZE), 1, generator=gen, device=torch.device("cpu")).train()
    counts = {}
    leaf = (torch.rand_like(x) * 0.03).requires_grad_(True)
    with FlopCounterMode(display=False) as fc:  # the step of sparse.py: encoder, victim, grads of delta and encoder
        m = torch.sigmoid(5.0 * enc(leaf))
        loss = F.cross_entropy(model(x + leaf * m), y)
        loss.backward()  # = autograd.grad(loss, [leaf, *params]) in FLOPs (the victim's weights need no grad)
    counts["unet_step"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(x)
    counts["victim_forward"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            enc(leaf.detach())
    counts["unet_forward"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        leaf2 = leaf.detach().requires_grad_(True)
        F.cross_entropy(model(x + leaf2), y).backward()
    counts["dense_pass"] = fc.get_total_flops()  # one PGD step of the dense start
    # one attack step also runs an fp32 success check on the images that look adversarial: at most one forward
    counts["attack_step_upper"] = counts["unet_step"] + counts["victim_forward"]
    return {k: round(v / 1e9, 2) for k, v in counts.items()}


def project(flops: dict, rows: list[dict]) -> dict:
    """Projected time of PROJECT_IMAGES images at PROJECT_STEPS steps: GPU from assumed TFLOP/s, CPU from the rate."""
    per_image = (PROJECT_STEPS * flops["attack_step_upper"] + PROJECT_INIT_PASSES * flops["dense_pass"]) * 1e9
    total = PROJECT_IMAGES * per_image
    lo, hi = (total / (t * 1e12) / 3600 for t in reversed(GPU_TFLOPS_ASSUMED))
    out = {"what": f"{PROJECT_IMAGES} images, T = {PROJECT_STEPS} plus {PROJECT_INIT_PASSES} dense-start passes, "
                   "U-Net encoder, ResNet-50 victim at 224x224; a projection, not a measurement",
           "flop_per_image": round(per_image / 1e12, 2), "flop_per_image_unit": "TFLOP",
           "assumed_gpu_tflops_sustained": list(GPU_TFLOPS_ASSUMED),
           "gpu_hours_one_h100": [round(lo, 1), round(hi, 1)]}
    timed = [r for r in rows if r.get("encoder") == "unet" and r.get("s_per_image_step")]
    if timed:
        best = min(timed, key=lambda r: r["s_per_image_step"])
        cpu_s = PROJECT_IMAGES * PROJECT_STEPS * best["s_per_image_step"]
        out["cpu_days_this_machine"] = round(cpu_s / 86400, 1)
        out["cpu_rate_basis"] = (f"batch {best['batch']}, {best['precision']}: "
                                 f"{best['s_per_image_step']} s per image-step")
        out["cpu_sustained_gflops"] = round(flops["unet_step"] / best["s_per_image_step"], 1)
    return out


def main() -> None:
    """Parse the flags, run every configuration in its own process, count FLOPs, project, write JSON."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        enc, b, prec, steps, threads, size, out = sys.argv[2:9]
        child(enc, int(b), prec, int(steps), int(threads), int(size), Path(out))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 at T = 3, batch 8 at T = 2, no batch 32")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--encoders", default="unet,linear")
    ap.add_argument("--precisions", default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    ap.add_argument("--size", type=int, default=SIZE, help="image side (224; smaller only to try the script)")
    args = ap.parse_args()
    load_start = os.getloadavg()
    started = time.time()
    rows = []
    for enc in args.encoders.split(","):
        for prec in args.precisions.split(","):
            for b in (int(v) for v in args.batches.split(",")):
                if args.quick and b > 8:
                    continue
                steps = 2 if args.quick and b > 1 else args.steps
                if enc == "linear" and rows and any(r["encoder"] == "linear" and "refused" in r for r in rows):
                    continue  # refused at the smallest batch: a larger one needs at least as much memory
                row = run_child(enc, b, prec, steps, args.threads, args.timeout, args.size)
                print(json.dumps(row), flush=True)
                rows.append(row)
    flops = step_flops()
    from advpipe.attacks.encoders import linear_encoder_bytes

    result = {
        "command": "python benchmarks/bench_attack_224.py " + " ".join(sys.argv[1:]),
        "victim": "torchvision resnet50, fresh weights, 1000 classes, 224x224 uniform-noise images",
        "load_average_start": load_start, "wall_s": round(time.time() - started, 1),
        "rows": rows, "flops_gflop_per_image": flops,
        "linear_encoder_224_gib": round(linear_encoder_bytes((3, SIZE, SIZE), 1) / 2**30, 1),
        "projection": project(flops, rows),
    }
    unet = {r["batch"]: r["attack_rss_delta_mib"] for r in rows
            if r["encoder"] == "unet" and "attack_rss_delta_mib" in r}
    if 32 not in unet and len(unet) >= 2:
        (b0, m0), (b1, m1) = sorted(unet.items())[:2]
        slope = (m1 - m0) / (b1 - b0)
        result["unet_attack_rss_delta_mib_batch32_extrapolated"] = {
            "value": round(m0 + slope * (32 - b0), 0), "per_image_mib": round(slope, 1),
            "how": f"linear through batches {b0} and {b1}; not measured"}
    path = write_result("bench_attack_224", result)
    print(json.dumps(result["projection"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
