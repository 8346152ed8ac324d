"""The exception types for errors a user can fix (bad input, missing data, mismatched files).

Every one is an :class:`AdvpipeError` (the CLI prints it as one line and exits with code 2); the
subclasses name the cases that code tells apart, so nothing branches on a message's text.
"""

from __future__ import annotations

from typing import Sequence


class AdvpipeError(Exception):
    """A user-fixable error: the CLI prints its message as one line and exits with code 2.

    ``fields`` names the config fields the message mentions (``"lr must be positive"`` has
    ``fields=("lr",)``). Library users read the field names; the CLI writes each as its flag
    (``--lr``), so the library never needs to know the command line.
    """

    def __init__(self, message: str = "", *, fields: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)

    def __reduce__(self):  # keep ``fields`` across processes (dask workers raise these too)
        return _rebuild, (type(self), str(self), self.fields)


class CannotRead(AdvpipeError):
    """A store, or an object of it, could not be read at all (not found, not allowed, not a store): nothing
    about its content is known, so it is bad input rather than a damaged store."""


class StoreUnreachable(CannotRead):
    """A store did not answer: a timeout or no connection (the store may be fine; try again later)."""


class DamagedStore(AdvpipeError):
    """A store was read and is damaged: unreadable bytes, or an object that is not the one its manifest lists."""


class OverwriteRefused(AdvpipeError):
    """Something already there would be replaced; the call names the ``overwrite`` field that allows it."""


def _rebuild(cls: type, message: str, fields: tuple[str, ...]) -> AdvpipeError:
    return cls(message, fields=fields)
