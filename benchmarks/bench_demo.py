"""Time the README's main job, ``advpipe demo``, end to end: wall time and peak memory.

Run: ``python benchmarks/bench_demo.py [--out-dir /tmp/demo-bench] [-- extra demo flags]``. It runs
``advpipe demo --overwrite`` in a subprocess (a fresh interpreter, as a user would) and writes
``benchmarks/results/bench_demo.json`` with the wall time, the peak resident memory of the child
processes and the machine. Goal (issue #4): about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402


def main() -> None:
    """Run the demo once and record how long it took."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="/tmp/advpipe-demo-bench")
    parser.add_argument("extra", nargs="*", help="extra flags for advpipe demo (after --)")
    args = parser.parse_args()
    advpipe = shutil.which("advpipe") or str(Path(sys.executable).parent / "advpipe")
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run([advpipe, "demo", "--out", args.out_dir, "--overwrite", *args.extra],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"advpipe demo failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    path = write_result("bench_demo", {"command": ["advpipe", "demo", *args.extra], "seconds": seconds,
                                       "peak_rss_mb": peak_mb, "load_average_before": load_before,
                                       "summary": proc.stdout.strip().splitlines()})
    print(f"advpipe demo: {seconds / 60:.1f} min wall, peak {peak_mb:,.0f} MB (goal about 10 min); wrote {path}")


if __name__ == "__main__":
    main()
