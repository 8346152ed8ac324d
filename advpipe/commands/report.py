"""``advpipe report``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from advpipe.cli import app
from advpipe.commands.errors_cli import user_errors
from advpipe.commands.reporting import echo


@app.command()
@user_errors
def report(
    runs: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR", help="Run folders (each with eval.json from advpipe evaluate), or evaluation JSON files."),
    out_dir: Path = typer.Option(Path("report"), "--out", help="Folder for report.md and the plots."),
    csv: bool = typer.Option(False, "--csv", help="Also write report.csv (one row per run)."),
    force: bool = typer.Option(False, "--force", help="Compare runs even if they were evaluated on different data."),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help="Run name to mark the others against with +/- (M-TLAT style)."),
    cam: int = typer.Option(0, "--cam", help="Also draw cams.png: Grad-CAM of the first N test images for every run."),
) -> None:
    """Compare evaluated runs: a Markdown table like the papers', training curves and robustness bars."""
    from advpipe.eval.report import ReportConfig, build_report

    result = build_report(ReportConfig(runs=tuple(str(r) for r in runs), out=str(out_dir), csv=csv, force=force,
                                       baseline=baseline, cam=cam))
    for warning in result.warnings:
        echo(f"warning: {warning}")
    for path in result.files:
        echo(f"wrote {path}")
