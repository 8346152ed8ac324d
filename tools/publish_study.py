"""Copy a study's small results (no checkpoints) into a folder that can be committed, and report on them.

    python tools/publish_study.py STUDY_DIR DEST [--baseline NAME]   (default: the study's own report.baseline)

For every finished run it copies ``config.yaml``, ``metrics.jsonl``, ``eval.json``,
``study-run.json`` and ``attempts.jsonl`` into ``DEST/runs/<run>/``; then ``advpipe report``
aggregates exactly those runs into ``DEST/`` (report.md, aggregates.json/csv/png, curves). A later
session can resume the study from DEST: finished runs are recognised by their ``study-run.json``
and skipped, so only the missing runs are trained.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from advpipe.eval.report import ReportConfig, build_report

SMALL = ("config.yaml", "metrics.jsonl", "eval.json", "study-run.json", "attempts.jsonl")


def main() -> int:
    """Copy finished runs and write the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--baseline", default=None)
    args = ap.parse_args()
    done = []
    for run in sorted((args.study / "runs").iterdir()):
        if not (run / "study-run.json").is_file():
            continue
        target = args.dest / "runs" / run.name
        target.mkdir(parents=True, exist_ok=True)
        for name in SMALL:
            if (run / name).is_file():
                shutil.copy2(run / name, target / name)
        done.append(target)
    if (args.study / "study.json").is_file():
        shutil.copy2(args.study / "study.json", args.dest / "study.json")
    total = len(json.loads((args.study / "study.json").read_text())["runs"]) if (args.study / "study.json").is_file() \
        else None
    baseline = args.baseline
    if baseline is None and (args.study / "study.json").is_file():
        config = json.loads((args.study / "study.json").read_text()).get("config", {})
        baseline = (config.get("report") or {}).get("baseline")
    result = build_report(ReportConfig(runs=tuple(str(d) for d in done), out=str(args.dest), csv=True,
                                       baseline=baseline or "none"))
    (args.dest / "published.json").write_text(json.dumps({"runs_finished": [d.name for d in done],
                                                          "runs_in_study": total}, indent=2) + "\n")
    print(f"{len(done)} finished runs of {total}; wrote {', '.join(str(f) for f in result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
