"""The ``advpipe`` command line: parse and validate, then call the library."""

from __future__ import annotations

import typer
from rich.console import Console

from advpipe import __version__
import sys

from advpipe.commands.errors_cli import OneLineUsageGroup
from advpipe.commands.reporting import echo, plain_width, setup_logging

app = typer.Typer(help="advpipe: adversarial attacks as data augmentation (AdvMask masks, AdvProp, A-FAN, M2AT, "
                       "M-TLAT, occlusion baselines).", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None, cls=OneLineUsageGroup)
out = Console(width=plain_width(sys.stdout))  # tables keep their natural width in files

DataOpt = typer.Option(None, "--data", help="Dataset: embedded (default), cifar10, cifar100, folder, tinyimagenet, flowers102, flowers102-random[:SEED], synthetic.")
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


def main() -> None:
    """Run the advpipe CLI."""
    app()


# Each command lives in its own module under advpipe/commands and registers itself on ``app``.
from advpipe.commands import COMMAND_MODULES  # noqa: E402

for _module in COMMAND_MODULES:
    __import__(f"advpipe.commands.{_module}")

if __name__ == "__main__":
    main()
