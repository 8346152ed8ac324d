"""CLI plumbing: the rich progress reporter and turning user errors into one line and exit code 2."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from advpipe import progress
from advpipe.errors import AdvpipeError

F = TypeVar("F", bound=Callable[..., Any])
console = Console(stderr=True)


class _RichTask:
    def __init__(self, bar: Progress, task_id: int) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, n: float = 1, **fields: Any) -> None:
        info = "  ".join(f"{k} {v}" for k, v in fields.items())
        self.bar.update(self.task_id, advance=n, info=info)


class RichReporter:
    """Renders the library's progress tasks as rich progress bars on stderr."""

    def __init__(self) -> None:
        """Create the shared rich Progress (started when the first task opens)."""
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                            transient=False)
        self.open_tasks = 0

    def open(self, description: str, total: float | None, unit: str) -> _RichTask:
        """Start a bar."""
        if self.open_tasks == 0:
            self.bar.start()
        self.open_tasks += 1
        return _RichTask(self.bar, self.bar.add_task(description, total=total, unit=unit, info=""))

    def close(self, task: _RichTask) -> None:
        """Finish a bar; nested bars are removed, top-level ones stay on screen."""
        self.open_tasks -= 1
        if self.open_tasks == 0:
            self.bar.stop()
            for tid in list(self.bar.task_ids):
                self.bar.remove_task(tid)
        else:
            self.bar.remove_task(task.task_id)


def user_errors(func: F) -> F:
    """Decorate a command: AdvpipeError becomes ``error: ...`` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = progress.use_reporter(RichReporter())
        try:
            return func(*args, **kwargs)
        except AdvpipeError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
        finally:
            progress.use_reporter(previous)

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool) -> None:
    """Send library logs to stderr (warnings only unless ``verbose``)."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    # zarr's sibling reads can leave asyncio tasks behind after a damaged-chunk error; their
    # shutdown noise would bury the one-line error
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def echo(message: str = "") -> None:
    """Print a result line to stdout."""
    sys.stdout.write(message + "\n")
