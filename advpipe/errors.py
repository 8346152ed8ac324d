"""The one exception type for errors a user can fix (bad input, missing data, mismatched files)."""

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


def _rebuild(cls: type, message: str, fields: tuple[str, ...]) -> AdvpipeError:
    return cls(message, fields=fields)
