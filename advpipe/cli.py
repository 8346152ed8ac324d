"""The ``advpipe`` command line: parse and validate, then call the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from advpipe import __version__
from advpipe.cli_util import echo, setup_logging, user_errors
from advpipe.errors import AdvpipeError

app = typer.Typer(help="advpipe: adversarial attacks as data augmentation (AdvMask masks, AdvProp, A-FAN, M2AT, "
                       "M-TLAT, occlusion baselines).", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)
out = Console()

DataOpt = typer.Option(None, "--data", help="Dataset: embedded (default), cifar10, cifar100, folder, synthetic.")
DataDirOpt = typer.Option(None, "--data-dir", help="Folder holding the data (default $ADVPIPE_DATA_DIR or ./data).")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")


def _version(value: bool) -> None:
    if value:
        echo(f"advpipe {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    """advpipe: adversarial attacks as data augmentation."""
    setup_logging(verbose)


@app.command()
@user_errors
def train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of defaults; flags override it."),
    data: Optional[str] = DataOpt,
    data_dir: Optional[str] = DataDirOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N training samples."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize folder images to this size."),
    download: Optional[bool] = typer.Option(None, "--download", help="Fetch CIFAR with torchvision (needs internet)."),
    model: Optional[str] = typer.Option(None, "--model", help="Architecture (see `advpipe info`); default resnet20."),
    aug: Optional[str] = typer.Option(None, "--aug", help="AUGMENTATION, METHOD or AUGMENTATION+METHOD; default none."),
    masks: Optional[str] = typer.Option(None, "--masks", help="Mask store path or URL for --aug advmask."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default 30)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default 128)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak SGD learning rate (default 0.1)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay (default 5e-4)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine (default), multistep or constant."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear LR warmup length."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (fp16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Run folder (default runs/<data>/<model>/<aug>/)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Loader worker processes for image folders."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run folder from last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the run folder."),
) -> None:
    """Train a classifier with an augmentation and/or training method."""
    from advpipe.train.config import read_config_file, resolve_config
    from advpipe.train.loop import train as run_train

    file_values = read_config_file(config) if config else {}
    overrides = dict(data=data, data_dir=data_dir, limit=limit, image_size=image_size, download=download,
                     model=model, aug=aug, masks=masks, epochs=epochs, batch_size=batch_size, lr=lr,
                     weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs, precision=precision,
                     out=out_dir, seed=seed, device=device, workers=workers,
                     resume=resume or None, overwrite=overwrite or None)
    cfg = resolve_config(file_values, overrides)
    result = run_train(cfg)
    m = result.last_metrics
    echo(f"run folder: {result.run_dir}")
    if m:
        echo(f"epoch {m['epoch']}: test accuracy {m['test_acc']:.4f} (best {result.best_top1:.4f})")


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


@app.command()
@user_errors
def info() -> None:
    """List the datasets, models, augmentations and training methods."""
    import advpipe.augment  # noqa: F401
    import advpipe.train  # noqa: F401
    from advpipe.augment.base import AUGMENTS
    from advpipe.data.datasets import DATASETS
    from advpipe.models.registry import list_models
    from advpipe.train.methods import METHODS

    echo(f"advpipe {__version__}")
    echo("datasets:      " + ", ".join(DATASETS.names()))
    echo("models:        " + ", ".join(list_models()) + " (plus any torchvision classification model)")
    echo("augmentations: " + ", ".join(AUGMENTS.names()))
    echo("methods:       " + ", ".join(m for m in METHODS.names() if m != "standard"))


def main() -> None:
    """Run the advpipe CLI."""
    app()


if __name__ == "__main__":
    main()
