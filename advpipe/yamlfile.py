"""Read a user's YAML file that must hold a mapping; every failure is a one-line user error."""

from __future__ import annotations

from pathlib import Path

from advpipe.errors import AdvpipeError

__all__ = ["read_yaml_mapping"]


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict:
    """Read a YAML file that must hold a mapping (empty = {}); unreadable, non-UTF-8 or invalid files are user errors."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise AdvpipeError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise AdvpipeError(f"{what} {str(path)!r} is not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        raise AdvpipeError(f"{what} {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise AdvpipeError(f"{what} {str(path)!r} must hold {expected}")
    return raw
