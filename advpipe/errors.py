"""The one exception type for errors a user can fix (bad input, missing data, mismatched files)."""


class AdvpipeError(Exception):
    """A user-fixable error: the CLI prints its message as one line and exits with code 2."""
