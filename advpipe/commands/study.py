"""``advpipe study``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from advpipe.cli import DataDirOpt, DeviceOpt, app
from advpipe.commands.errors_cli import user_errors
from advpipe.commands.reporting import echo
from advpipe.errors import AdvpipeError


@app.command()
@user_errors
def study(
    config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="Study file: train settings, grid, masks, evaluate."),
    data_dir: Optional[str] = DataDirOpt,
    out_dir: Optional[str] = typer.Option(None, "--out", help="Study folder (default: the file's 'out', else studies/<name>)."),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="Local dask workers (default: one per GPU, one on the CPU); 0 runs in this process."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of an existing dask scheduler."),
    device: str = DeviceOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the study and list its runs; run nothing."),
) -> None:
    """Run a grid of training runs (resumable), evaluate each, and report mean ± std across seeds."""
    from advpipe.study.config import parse_study, read_study_file
    from advpipe.study.runner import is_done, run_study

    if workers is not None and workers < 0:
        raise AdvpipeError(f"--workers must be 0 or more, got {workers}")
    if workers is not None and scheduler is not None:
        raise AdvpipeError("--workers and --scheduler exclude each other")
    cfg = parse_study(read_study_file(config), source=str(config), out=out_dir, data_dir=data_dir)
    done = sum(is_done(r) for r in cfg.runs)
    echo(f"study {cfg.name}: {len(cfg.runs)} runs ({done} done) in {cfg.out}")
    if dry_run:
        for run in cfg.runs:
            echo(f"  {run.name}{'  (done)' if is_done(run) else ''}")
        return
    result = run_study(cfg, workers=workers, scheduler=scheduler, device=device)
    echo(f"ran {len(result.records)} run(s), skipped {result.skipped} finished one(s) in {result.wall_s:.0f} s")
    for path in result.report_files:
        echo(f"wrote {path}")
    if result.failures:
        detail = "; ".join(f"{name}: {msg}" for name, msg in result.failures.items())
        raise AdvpipeError(f"{len(result.failures)} of {len(cfg.runs)} runs failed ({detail}); fix and rerun to continue")
