"""Turn a finished training run into a checkpoint shipped in the package (``builtin:<name>``).

    python tools/make_builtin_checkpoint.py RUN_DIR NAME --recipe "advpipe train ..."

Keeps the last epoch's weights (never a checkpoint chosen on test accuracy), drops the optimizer
state and local paths, and records the recipe, the commit, the training data's fingerprint and
the test accuracy in the checkpoint's ``info``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from advpipe.models.checkpoint import BUILTIN_DIR, load_checkpoint, save_checkpoint


def main() -> int:
    """Write ``advpipe/models/builtin/NAME.pt`` from ``RUN_DIR/last.pt``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("name")
    ap.add_argument("--recipe", required=True, help="the command that trained the run")
    ap.add_argument("--commit", help="commit of the code that trained it (default: HEAD)")
    args = ap.parse_args()
    ckpt = load_checkpoint(args.run_dir / "last.pt")
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    config = {**ckpt.config, "data_dir": None, "out": None}
    info = {"name": args.name, "recipe": args.recipe, "commit": commit,
            "train_data": {"name": ckpt.dataset, "fingerprint": ckpt.fingerprint},
            "test_acc": ckpt.metrics.get("test_acc"), "epoch": ckpt.epoch,
            "made": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": str(torch.__version__)}
    out = BUILTIN_DIR / f"{args.name}.pt"
    save_checkpoint(out, replace(ckpt, state={}, config=config, info=info,
                                 metrics={k: v for k, v in ckpt.metrics.items() if k != "test_per_class"}))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): test accuracy {info['test_acc']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
