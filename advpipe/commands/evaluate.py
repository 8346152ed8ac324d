"""``advpipe evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from advpipe.cli import DataDirOpt, DeviceOpt, app, out
from advpipe.cli_util import echo, user_errors
from advpipe.errors import AdvpipeError

@app.command()
@user_errors
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A .pt file written by advpipe train."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset (default: the one the model was trained on)."),
    data_dir: Optional[str] = DataDirOpt,
    split: str = typer.Option("test", "--split", help="train or test."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N samples only."),
    batch_size: int = typer.Option(256, "--batch-size", help="Evaluation batch size."),
    device: str = DeviceOpt,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Measure a checkpoint's top-1 and per-class accuracy."""
    from advpipe.eval.run import EvalConfig, evaluate as run_eval
    from advpipe.utils import atomic_write_text

    if batch_size < 1:
        raise AdvpipeError(f"--batch-size must be at least 1, got {batch_size}")
    result = run_eval(EvalConfig(checkpoint=str(checkpoint), data=data, data_dir=data_dir, split=split, limit=limit,
                                 batch_size=batch_size, device=device))
    clean = result["clean"]
    table = Table(title=f"{result['checkpoint']['arch']} on {result['data']['name']}/{split} "
                        f"({clean['n']} images)")
    table.add_column("class")
    table.add_column("top-1", justify="right")
    for name, acc in zip(result["data"]["class_names"], clean["per_class"]):
        table.add_row(name, f"{100 * acc:.2f}%")
    table.add_row("[bold]all[/bold]", f"[bold]{100 * clean['top1']:.2f}%[/bold]")
    out.print(table)
    if json_path:
        try:
            atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            raise AdvpipeError(f"cannot write --json {str(json_path)!r}: {exc.strerror}") from None
        echo(f"wrote {json_path}")


