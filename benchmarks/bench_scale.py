"""Scale-out on this machine: precompute with 1 vs 2 dask workers, DDP training with 1 vs 2 processes.

Usage: python benchmarks/bench_scale.py [--quick] [--steps 10] [--images 192] [--threads 1] [--workdir DIR]

Everything runs through the CLI as a user would: ``advpipe train`` (``--nproc-per-node 1|2``;
images/s of the last epoch from metrics.jsonl, i.e. the global rate of all processes) and
``advpipe precompute-masks --workers 1|2`` into fresh stores with the same configuration. The
1-process training run also provides the checkpoint the precompute attacks.

Precompute rates:
- ``end_to_end_img_s``: images / wall time of the whole command (imports, cluster start, finalize);
- ``steady_img_s``: from the write times of the ``chunk_done`` flags. With W workers the first W
  completions are skipped (they include worker start-up), then rate = images of the later chunks /
  (last completion - W-th completion).
Scaling efficiency = speedup / workers. Each process gets ``--threads`` CPU threads
(OMP_NUM_THREADS), 1 by default, so a worker stands for one device; on a 2-core machine two
workers are then the most that can scale. ``parallel_ceiling`` runs a fixed resnet20 workload in 1
and then 2 concurrent processes: the aggregate speedup a second process can get on this machine
right now, with no dask or DDP involved. On a shared, busy machine it is well below 2, and the
load averages before and after are recorded too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

QUICK = {"images": 192, "chunk_size": 16, "steps": 10, "train_limit": 1024, "epochs": 2, "batch_size": 64}
FULL = {"images": 960, "chunk_size": 48, "steps": 50, "train_limit": 2000, "epochs": 3, "batch_size": 128}


def advpipe(args: list[str], cwd: Path, threads: int) -> tuple[float, str]:
    """Run ``python -m advpipe ARGS`` in ``cwd``; return (wall seconds, stdout); raise with stderr on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "advpipe", *args], cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"advpipe {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def train_rate(nproc: int, cfg: dict[str, Any], work: Path, out: Path, threads: int) -> dict[str, Any]:
    """Train resnet20 on embedded with ``nproc`` DDP processes; return the last epoch's global images/s."""
    seconds, _ = advpipe(["train", "--data", "embedded", "--model", "resnet20", "--limit", str(cfg["train_limit"]),
                          "--epochs", str(cfg["epochs"]), "--batch-size", str(cfg["batch_size"]), "--device", "cpu",
                          "--precision", "fp32", "--nproc-per-node", str(nproc), "--out", str(out), "--overwrite"],
                         work, threads)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"processes": nproc, "images_per_s": epochs[-1]["images_per_s"],
            "images_per_s_by_epoch": [e["images_per_s"] for e in epochs],
            "global_batch": nproc * cfg["batch_size"], "wall_s": seconds}


def precompute_rate(workers: int, cfg: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    """Attack ``cfg['images']`` embedded images into a fresh store with ``workers`` dask workers; return the rates."""
    store = work / f"bench-{workers}w.zarr"
    seconds, stdout = advpipe(["precompute-masks", "--model", "resnet20", "--data", "embedded",
                               "--limit", str(cfg["images"]), "--chunk-size", str(cfg["chunk_size"]),
                               "--batch-size", str(cfg["chunk_size"]), "--steps", str(cfg["steps"]),
                               "--workers", str(workers), "--out", str(store), "--overwrite"], work, threads)
    times = sorted(p.stat().st_mtime for p in (store / "chunk_done" / "c").iterdir() if p.name.isdigit())
    later = len(times) - workers
    steady = later * cfg["chunk_size"] / (times[-1] - times[workers - 1]) if later > 0 else None
    attack = json.loads((store / "zarr.json").read_text())["attributes"]["advpipe"]["attack"]
    return {"workers": workers, "chunks": len(times), "end_to_end_img_s": cfg["images"] / seconds,
            "steady_img_s": steady, "wall_s": seconds, "cli_line": stdout.splitlines()[0],
            "attack": {k: attack[k] for k in ("steps", "init_steps", "encoder", "batch_size")}}


# A fixed amount of single-process CPU work: resnet20 forward+backward, 40 steps of 16 images.
_PROBE = """
import time, torch
from advpipe.models.registry import create_model
torch.manual_seed(0)
m = create_model("resnet20", num_classes=10, image_size=32)
x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
for _ in range(3):
    torch.nn.functional.cross_entropy(m(x), y).backward()
t = time.perf_counter()
for _ in range(40):
    torch.nn.functional.cross_entropy(m(x), y).backward()
print(time.perf_counter() - t)
"""


def parallel_ceiling(threads: int) -> dict[str, float]:
    """Aggregate speedup of 2 concurrent copies of a fixed workload over 1: what a shared machine can give."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def run(copies: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(copies)]
        return [float(p.communicate()[0]) for p in procs]

    alone = run(1)[0]
    pair = run(2)
    return {"one_process_s": alone, "two_processes_s": pair, "speedup": 2 * alone / max(pair)}


def scaling(one: float | None, two: float | None, n: int = 2) -> dict[str, float | None]:
    """Speedup of ``two`` over ``one`` and efficiency = speedup / n."""
    if not one or not two:
        return {"speedup": None, "efficiency": None}
    return {"speedup": two / one, "efficiency": two / one / n}


def main() -> None:
    """Run the benchmark and write benchmarks/results/bench_scale.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 cores)")
    for key, value in FULL.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                            help=f"default {value} ({QUICK[key]} with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs and stores go (default: a temp folder)")
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    ceiling = parallel_ceiling(args.threads)
    print(f"2 independent processes vs 1 on this machine now: {ceiling['speedup']:.2f}x")

    # The 1-process run trains the checkpoint precompute-masks finds at runs/embedded/resnet20/none/best.pt.
    train = {n: train_rate(n, cfg, work, work / ("runs/embedded/resnet20/none" if n == 1 else f"ddp{n}"), args.threads)
             for n in (1, 2)}
    for n, r in train.items():
        print(f"train, {n} process(es): {r['images_per_s']:.1f} img/s (global batch {r['global_batch']})")
    pre = {w: precompute_rate(w, cfg, work, args.threads) for w in (1, 2)}
    for w, r in pre.items():
        steady = f"{r['steady_img_s']:.2f}" if r["steady_img_s"] else "-"
        print(f"precompute, {w} worker(s): steady {steady} img/s, end to end {r['end_to_end_img_s']:.2f} img/s")

    result = {
        "mode": "quick" if args.quick else "full",
        "config": {**cfg, "threads_per_process": args.threads, "model": "resnet20", "data": "embedded",
                   "train_precision": "fp32", "device": "cpu"},
        "train_ddp": {"runs": list(train.values()),
                      **scaling(train[1]["images_per_s"], train[2]["images_per_s"])},
        "precompute": {"runs": list(pre.values()),
                       "steady": scaling(pre[1]["steady_img_s"], pre[2]["steady_img_s"]),
                       "end_to_end": scaling(pre[1]["end_to_end_img_s"], pre[2]["end_to_end_img_s"])},
        "parallel_ceiling": ceiling,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "workdir": str(work),
    }
    path = write_result("bench_scale", result)
    print(f"train DDP 2 vs 1: efficiency {result['train_ddp']['efficiency']:.2f}; precompute 2 vs 1 workers: "
          f"steady efficiency {result['precompute']['steady']['efficiency'] or float('nan'):.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
