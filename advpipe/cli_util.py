"""CLI plumbing: the rich progress reporter and turning user errors into one line and exit code 2."""

from __future__ import annotations

import asyncio
import difflib
import functools
import logging
import sys
import time
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from advpipe import progress
from advpipe.commands.flags import with_flags
from advpipe.errors import AdvpipeError

try:  # typer >= 0.20 ships its own copy of click; older typer uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors  # type: ignore[no-redef]

F = TypeVar("F", bound=Callable[..., Any])


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


class OneLineUsageGroup(TyperGroup):
    """The command group: a usage error (unknown option, bad value, missing option) is one ``error:`` line, exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Run the CLI; typer's multi-line usage box is replaced by :func:`usage_error_line`."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # a bare group: its help, as before
            exc.show()
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:
            console.print(f"[red]error:[/red] {escape(usage_error_line(exc))}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except click_errors.ClickException as exc:
            console.print(f"[red]error:[/red] {escape(_one_line(exc.format_message()))}", highlight=False,
                          soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            console.print("aborted", highlight=False)
            sys.exit(1)
        # a finished command returns None; typer.Exit(code) comes back as its int code
        sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


def usage_error_line(exc: Any) -> str:
    """One line for a click usage error: what is wrong, the closest flag for an unknown one, and where help is."""
    ctx = exc.ctx
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    if isinstance(exc, click_errors.NoSuchOption):
        names = [o for p in (ctx.command.get_params(ctx) if ctx is not None else []) for o in p.opts + p.secondary_opts
                 if o.startswith("-")]
        closest = list(exc.possibilities or []) or difflib.get_close_matches(exc.option_name, names, n=1, cutoff=0.0)
        command = f" for '{ctx.command_path}'" if ctx is not None else ""
        hint = f"; the closest is {closest[0]}" if closest else ""
        return f"no such option {exc.option_name}{command}{hint}{where}"
    return _one_line(exc.format_message()).rstrip(".") + where


def _one_line(message: str) -> str:
    """``message`` on one line, starting lower-case like the other ``error:`` lines."""
    text = " ".join(message.split())
    return text[:1].lower() + text[1:]


def user_errors(func: F) -> F:
    """Decorate a command: AdvpipeError becomes ``error: ...`` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = progress.use_reporter(make_reporter())
        try:
            return func(*args, **kwargs)
        except AdvpipeError as exc:
            console.print(f"[red]error:[/red] {escape(with_flags(error_text(exc), exc.fields))}", highlight=False,
                          soft_wrap=True)
            settle_zarr_tasks()
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
        finally:
            progress.use_reporter(previous)

    return wrapper  # type: ignore[return-value]


def settle_zarr_tasks(timeout_s: float = 5.0) -> None:
    """Let the chunk reads zarr still runs after an error finish (bounded), so exit does not destroy them mid-await.

    When one chunk of a multi-chunk read fails, its siblings keep running on zarr's event-loop
    thread; if the process exits first, zarr's atexit closes the loop under them and Python prints
    "Exception ignored in <coroutine ...>" with a traceback below the one-line error.
    """
    sync = sys.modules.get("zarr.core.sync")
    loop = getattr(sync, "loop", [None])[0] if sync is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def rest() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout_s)

    try:
        asyncio.run_coroutine_threadsafe(rest(), loop).result(timeout_s + 1)
    except Exception:  # noqa: BLE001 - best effort on the way out; the error line is already printed
        pass


def error_text(exc: BaseException) -> str:
    """The one line to print for ``exc``: a DataLoader worker's re-raise carries the worker's traceback, so
    only the original message (its last line) is kept."""
    text = str(exc).strip()
    if "\nOriginal Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        text = last.removeprefix(prefix)
    return " ".join(text.split("\n"))


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
