"""``advpipe data``: look at a dataset (summary and an image grid)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from advpipe.cli import DataDirOpt, app
from advpipe.commands.errors_cli import user_errors
from advpipe.commands.reporting import echo
from advpipe.errors import AdvpipeError

data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data", help="Inspect a dataset: summary, fingerprint and an image grid.")


@data_app.command("show")
@user_errors
def show(
    data: str = typer.Option("embedded", "--data", help="Dataset name."),
    data_dir: Optional[str] = DataDirOpt,
    split: str = typer.Option("train", "--split", help="train or test."),
    n: int = typer.Option(32, "--n", help="Number of images in the grid."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize folder images to this size."),
    out: Path = typer.Option(Path("data-grid.png"), "--out", help="PNG file to write."),
) -> None:
    """Print a dataset's size, classes and fingerprint, and draw a grid of its first images."""
    from advpipe.data.datasets import load_dataset
    from advpipe.eval.images import save_image_grid

    if n < 1:
        raise AdvpipeError(f"--n must be at least 1, got {n}")
    ds = load_dataset(data, split, data_dir=data_dir, image_size=image_size)
    n = min(n, len(ds))
    cols = min(n, 8)
    images = ds.load_images(range(n))
    names = [ds.class_names[int(k)] for k in ds.labels[:n]]
    rows = [images[i : i + cols] for i in range(0, n, cols)]
    titles = [names[i : i + cols] for i in range(0, n, cols)]
    save_image_grid(rows, out, cell_titles=titles, title=f"{data}/{split}: first {n} of {len(ds)}")
    echo(f"{data}/{split}: {len(ds)} images of shape {tuple(ds.image_shape)}, {ds.num_classes} classes")
    echo(f"fingerprint: {ds.fingerprint}")
    echo(f"wrote {out}")
