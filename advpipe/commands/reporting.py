"""The CLI's terminal output: the stderr console, progress reporters (rich bars or plain log lines), logging, echo."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from advpipe import progress

__all__ = ["LogReporter", "RichReporter", "console", "echo", "make_reporter", "plain_width", "setup_logging"]


def plain_width(stream: Any) -> int | None:
    """The console width for ``stream``: the terminal's, or no wrapping at all (a log file gets whole lines)."""
    isatty = getattr(stream, "isatty", None)
    return None if isatty is not None and isatty() else 1_000_000


console = Console(stderr=True, width=plain_width(sys.stderr))


class _RichTask:
    def __init__(self, bar: Progress, task_id: int) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, n: float = 1, **fields: Any) -> None:
        info = "  ".join(f"{k} {v}" for k, v in fields.items())
        self.bar.update(self.task_id, advance=n, info=escape(info))  # the columns read markup; values are text


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
        return _RichTask(self.bar, self.bar.add_task(escape(description), total=total, unit=escape(unit), info=""))

    def close(self, task: _RichTask) -> None:
        """Finish a bar; nested bars are removed, top-level ones stay on screen."""
        self.open_tasks -= 1
        if self.open_tasks == 0:
            self.bar.stop()
            for tid in list(self.bar.task_ids):
                self.bar.remove_task(tid)
        else:
            self.bar.remove_task(task.task_id)


class _LogTask:
    def __init__(self, reporter: "LogReporter", description: str, total: float | None, unit: str) -> None:
        self.reporter, self.description, self.total, self.unit = reporter, description, total, unit
        self.done, self.info, self.nested = 0.0, "", False
        self.start = self.last = time.monotonic()

    def advance(self, n: float = 1, **fields: Any) -> None:
        self.done += n
        if fields:
            self.info = "  ".join(f"{k} {v}" for k, v in fields.items())
        now = time.monotonic()
        if now - self.last >= self.reporter.interval:
            self.last = now
            self.reporter.emit(self)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description}: {self.done:,.0f}"]
        if self.total:
            parts[0] += f"/{self.total:,.0f}"
            parts.append(f"{100 * self.done / self.total:.0f}%")
        parts.append(f"{rate:,.1f} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"eta {_clock((self.total - self.done) / rate)}")
        return "  ".join(parts + ([self.info] if self.info else []))


def _clock(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LogReporter:
    """Progress for non-terminal stderr (logs, CI, nohup): one plain line per task every ``interval`` s and at the end."""

    def __init__(self, interval: float = 30.0) -> None:
        """Print at most one line per task every ``interval`` seconds."""
        self.interval = interval
        self.depth = 0  # tasks open now; a nested task (an attack batch inside precompute) is quiet

    def open(self, description: str, total: float | None, unit: str) -> _LogTask:
        """Start a task (silently: short tasks print only their final line)."""
        task = _LogTask(self, description, total, unit)
        task.nested = self.depth > 0
        self.depth += 1
        return task

    def close(self, task: _LogTask) -> None:
        """Print the task's final line: for top-level tasks that advanced, and nested ones that ran long."""
        self.depth -= 1
        if task.done and (not task.nested or task.last > task.start):
            self.emit(task)

    def emit(self, task: _LogTask) -> None:
        """Write one progress line to stderr."""
        console.print(task.line(), highlight=False, soft_wrap=True, markup=False)


def make_reporter() -> RichReporter | LogReporter:
    """Rich bars on a terminal, periodic plain lines otherwise."""
    return RichReporter() if console.is_terminal else LogReporter()


def setup_logging(verbose: bool) -> None:
    """Send library logs to stderr (warnings only unless ``verbose``)."""
    from rich.logging import RichHandler

    # a terminal gets rich's columns; a file or pipe gets whole, unwrapped lines
    handler = RichHandler(console=console, show_path=False) if console.is_terminal else logging.StreamHandler(sys.stderr)
    if not console.is_terminal:
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[handler], force=True)
    # zarr's sibling reads can leave asyncio tasks behind after a damaged-chunk error; their
    # shutdown noise would bury the one-line error
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def echo(message: str = "") -> None:
    """Print a result line to stdout."""
    sys.stdout.write(message + "\n")
