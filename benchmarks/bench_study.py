"""Scheduling overhead of ``advpipe study``: a study of short runs on dask against the runs' own time.

Run: ``python benchmarks/bench_study.py [--runs 6] [--epochs 6] [--limit 2000]``. It runs one study
of ``--runs`` short ResNet-20 runs on the embedded data (a fresh interpreter, as a user would,
with the default local cluster of one worker), then reads ``study.json``: the wall time of the
command, the sum of the runs' own train + evaluation time measured inside the tasks, and the
difference, which is everything the study adds. It is split into the final report (plots and
tables, timed by the study) and the rest (cluster start, the worker's imports, scheduling,
polling), the scheduling overhead. Goal (issue #12): under 2% of the runs' own time.
Writes ``benchmarks/results/bench_study.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402


def main() -> None:
    """Run the study once and record its overhead."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--limit", type=int, default=2000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="advpipe-bench-study-"))
    study = {"name": "bench", "train": {"data": "embedded", "model": "resnet20", "limit": args.limit,
                                        "epochs": args.epochs, "precision": "bf16"},
             "grid": {"seed": list(range(args.runs))}, "evaluate": {"checkpoint": "last"}}
    (folder / "study.yaml").write_text(yaml.safe_dump(study))
    advpipe = shutil.which("advpipe") or str(Path(sys.executable).parent / "advpipe")
    load_before = os.getloadavg()
    started = time.perf_counter()
    subprocess.run([advpipe, "study", str(folder / "study.yaml"), "--out", str(folder / "s")], check=True)
    outer = time.perf_counter() - started
    summary = json.loads((folder / "s" / "study.json").read_text())
    own = summary["runs_own_s"]
    result = {
        "runs": args.runs, "epochs": args.epochs, "limit": args.limit,
        "command_wall_s": outer, "study_wall_s": summary["wall_s"], "runs_own_s": own,
        "report_s": summary["report_s"],
        "overhead_with_report_s": outer - own, "overhead_with_report_fraction": (outer - own) / own,
        # scheduling overhead: everything but the runs and the final report (cluster start, imports, polling)
        "overhead_s": outer - own - summary["report_s"], "overhead_fraction": (outer - own - summary["report_s"]) / own,
        "per_run_own_s": [r["train_s"] + r["eval_s"] for r in summary["runs"].values()],
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "goal": "overhead under 2% of the runs' own time",
    }
    result["goal_met"] = result["overhead_fraction"] < 0.02
    path = write_result("bench_study", result)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"overhead {result['overhead_s']:.1f} s = {100 * result['overhead_fraction']:.2f}% of {own:.0f} s of runs "
          f"(goal < 2%): {path}")


if __name__ == "__main__":
    main()
