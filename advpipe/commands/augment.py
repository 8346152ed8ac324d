"""``advpipe augment``: look at what an augmentation does."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from advpipe.cli import DataDirOpt, app
from advpipe.commands.errors_cli import user_errors
from advpipe.commands.reporting import echo
from advpipe.errors import AdvpipeError

augment_app = typer.Typer(help="Inspect augmentations.", no_args_is_help=True)
app.add_typer(augment_app, name="augment", help="Preview augmentations as image grids.")


@augment_app.command("preview")
@user_errors
def preview(
    aug: str = typer.Option("advmask", "--aug", help="Input augmentation to preview (see `advpipe info`)."),
    masks: Optional[str] = typer.Option(None, "--masks", help="Mask store path or URL (advmask, aapm)."),
    data: str = typer.Option("embedded", "--data", help="Dataset name."),
    data_dir: Optional[str] = DataDirOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="The first N samples (must match the mask store)."),
    n: int = typer.Option(16, "--n", help="Number of samples shown."),
    aug_opt: Optional[list[str]] = typer.Option(None, "--aug-opt", help="KEY=VALUE augmentation option (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    out: Path = typer.Option(Path("preview.png"), "--out", help="PNG file to write."),
) -> None:
    """Write a grid of original, attack mask, keep-mask and augmented image."""
    from advpipe.preview import preview_augment, save_preview
    from advpipe.data.datasets import load_dataset
    from advpipe.train.config import parse_key_values

    if n < 1:
        raise AdvpipeError(f"--n must be at least 1, got {n}")
    ds = load_dataset(data, "train", data_dir=data_dir, limit=limit)
    result = preview_augment(aug, ds, n=n, masks=masks, seed=seed,
                             options=parse_key_values(aug_opt or [], "--aug-opt"))
    save_preview(result, out, f"--aug {aug} on {data}")
    echo(f"wrote {out}")
