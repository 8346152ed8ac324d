"""CLI error plumbing: a user error or a usage error becomes one ``error:`` line and exit code 2."""

from __future__ import annotations

import asyncio
import difflib
import functools
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.markup import escape
from typer.core import TyperGroup

from advpipe import progress
from advpipe.commands.flags import with_flags
from advpipe.commands.reporting import console, make_reporter
from advpipe.errors import AdvpipeError

try:  # typer >= 0.20 ships its own copy of click; older typer uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors  # type: ignore[no-redef]

__all__ = ["OneLineUsageGroup", "click_errors", "error_text", "settle_zarr_tasks", "usage_error_line", "user_errors"]

F = TypeVar("F", bound=Callable[..., Any])


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
