"""The one progress helper every long loop reports through; the CLI decides how to render it.

Library code calls :func:`track` or :func:`task`. By default nothing is shown (the library never
prints); the CLI installs a rich-backed reporter with :func:`use_reporter`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")


class Task(Protocol):
    """A handle for one running progress bar."""

    def advance(self, n: float = 1, **fields: Any) -> None:
        """Advance the bar by ``n`` and update its displayed fields (e.g. loss=0.3)."""


class Reporter(Protocol):
    """Something that can open progress tasks (rich in the CLI, a no-op in the library)."""

    def open(self, description: str, total: float | None, unit: str) -> Task: ...

    def close(self, task: Task) -> None: ...


class _NullTask:
    def advance(self, n: float = 1, **fields: Any) -> None:
        pass


class NullReporter:
    """Shows nothing; the default so library calls stay silent."""

    def open(self, description: str, total: float | None, unit: str) -> Task:
        """Return a task that ignores updates."""
        return _NullTask()

    def close(self, task: Task) -> None:
        """Do nothing."""


_reporter: Reporter = NullReporter()


def use_reporter(reporter: Reporter) -> Reporter:
    """Install ``reporter`` for all later progress calls and return the previous one."""
    global _reporter
    previous, _reporter = _reporter, reporter
    return previous


def open_task(description: str, total: float | None = None, unit: str = "it") -> Task:
    """Open a progress task that stays open until :func:`close_task` (for bars that come and go)."""
    return _reporter.open(description, total, unit)


def close_task(handle: Task) -> None:
    """Close a task opened with :func:`open_task`."""
    _reporter.close(handle)


@contextlib.contextmanager
def task(description: str, total: float | None = None, unit: str = "it") -> Iterator[Task]:
    """Open a progress task for the duration of a ``with`` block."""
    handle = _reporter.open(description, total, unit)
    try:
        yield handle
    finally:
        _reporter.close(handle)


def track(items: Iterable[T], description: str, total: float | None = None, unit: str = "it") -> Iterator[T]:
    """Yield from ``items`` while advancing a progress bar by one per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total, unit) as handle:
        for item in items:
            yield item
            handle.advance(1)
