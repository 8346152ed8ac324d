"""``advpipe demo``: the whole pipeline on the embedded data."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from advpipe.cli import DataDirOpt, app, out
from advpipe.commands.errors_cli import user_errors
from advpipe.commands.reporting import echo
from advpipe.errors import AdvpipeError


@app.command()
@user_errors
def demo(
    out_dir: str = typer.Option("demo", "--out", help="Folder for runs, masks and the preview."),
    data: str = typer.Option("embedded", "--data", help="Dataset (embedded needs no files)."),
    data_dir: Optional[str] = DataDirOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N training samples."),
    model: str = typer.Option("resnet20", "--model", help="Architecture of the trained runs."),
    victim: str = typer.Option("builtin:resnet20-cifar10", "--victim", help="Checkpoint whose attack masks AdvMask uses."),
    epochs: int = typer.Option(45, "--epochs", help="Epochs of each training run."),
    attack_steps: int = typer.Option(25, "--attack-steps", help="Steps of the sparse attack."),
    eps: str = typer.Option("8/255", "--eps", help="l_inf budget of the sparse attack (8/255, 0.03137)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every stage instead of reusing finished ones."),
) -> None:
    """Precompute AdvMask masks with a real victim, train none/cutout/advmask, evaluate and compare."""
    from advpipe.demo import DemoConfig, run_demo
    from advpipe.fraction import parse_fraction

    if epochs < 1 or attack_steps < 1:
        raise AdvpipeError("--epochs and --attack-steps must be at least 1")
    result = run_demo(DemoConfig(out=out_dir, data=data, data_dir=data_dir, limit=limit, model=model, victim=victim, epochs=epochs,
                                 attack_steps=attack_steps, eps=parse_fraction(eps, name="--eps"), device=device,
                                 seed=seed, overwrite=overwrite))
    s = result.mask_summary
    echo(f"mask store: {result.store} (ASR {100 * (s.get('asr') or 0):.1f}% on the images the victim classifies "
         f"correctly, median l0 {s.get('l0_pixels_median') or 0:.0f} pixels)")
    table = Table(title=f"{model} on {data}, one seed: clean top-1 against none")
    for col in ("--aug", "train top-1", "clean top-1", "train - test", "vs none", "attack", "robust top-1",
                "run folder"):
        table.add_column(col, justify="left" if col in ("--aug", "attack", "run folder") else "right")
    for row in result.rows:
        diff = f"{row['clean_diff_pp']:+.2f} pp, {row['verdict']}" if "clean_diff_pp" in row else "baseline"
        train = "-" if row["train_top1"] is None else f"{100 * row['train_top1']:.2f}%"
        gap = "-" if row["gap_pp"] is None else f"{row['gap_pp']:+.1f} pp"
        table.add_row(row["aug"], train, f"{100 * row['clean_top1']:.2f}%", gap, diff, row["attack"],
                      f"{100 * row['robust_top1']:.2f}%", row["run"])
    out.print(table)
    base = result.rows[0]
    if base["gap_pp"] is not None:
        echo(f"{base['aug']}: last-epoch train accuracy {100 * base['train_top1']:.1f}% (on its cropped and flipped "
             f"batches), {base['gap_pp']:.1f} points above its test accuracy"
             + (": it over-fits, the regime where occlusion can help" if base["gap_pp"] >= 20 else ""))
    if result.noise_pp is not None:
        from advpipe.demo import SEED_NOISE

        echo(f"seed noise: std {result.noise_pp:.2f} pp of clean top-1 in this setting, over {SEED_NOISE['seeds']} "
             f"seeds of {SEED_NOISE['rows']} ({SEED_NOISE['source']}); a one-seed difference must exceed "
             "1.96 x sqrt(2) x std to count")
    else:
        echo("seed noise: not measured for these settings (only for the defaults); run `advpipe study` with "
             "several seeds to tell")
    echo(f"preview: {result.preview}")
