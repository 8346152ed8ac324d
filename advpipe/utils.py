"""Small shared helpers: devices, fractions, atomic writes, file hashes, cache folder."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from fractions import Fraction
from pathlib import Path

import torch

from advpipe.errors import AdvpipeError


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name``: ``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    # meta, xla, ... parse but cannot train or evaluate (meta tensors hold no data)
    if device is None or device.type not in ("cpu", "cuda"):
        raise AdvpipeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdvpipeError(f"device {name!r} requested but CUDA is not available; use device cpu or auto",
                           fields=("device",))
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA GPUs since Ampere; CPUs with AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


#: the largest numerator or denominator a parsed fraction may have
MAX_FRACTION_TERM = 10**18


def parse_fraction(text: str, *, name: str = "value", low: float = 0.0, high: float = 1.0) -> Fraction:
    """Parse ``8/255``, ``0.03137`` or ``8/255.0`` into a Fraction in (low, high] without eval."""
    forms = "accepted forms: 8/255, 0.03137 or 8/255.0"
    raw = str(text).strip()
    # Fraction("1e-10000000") alone takes many seconds: refuse exponents of three or more digits first
    if any(len(exp.lstrip("+-0")) > 2 for exp in re.findall(r"[eE]([+-]?\d+)", raw)):
        raise AdvpipeError(f"{name} {text!r} is too large, too small or too precise; {forms}")
    try:
        if raw.count("/") == 1:
            num, den = (part.strip() for part in raw.split("/"))
            value = Fraction(num) / Fraction(den)
        else:
            value = Fraction(raw)
    except (ValueError, ZeroDivisionError) as exc:
        raise AdvpipeError(f"invalid {name} {text!r}; {forms}") from exc
    if not (low < value <= high):
        raise AdvpipeError(f"{name} {text!r} is outside ({low:g}, {high:g}]; {forms}")
    # 1e-5000 is a valid Fraction whose 5000-digit denominator no float, string or store field can carry
    if max(abs(value.numerator), value.denominator) > MAX_FRACTION_TERM:
        raise AdvpipeError(f"{name} {text!r} is too small or too precise (numerator and denominator must stay "
                           f"below 10^18); {forms}")
    return value


#: the process umask, read once (os.umask can only be read by setting it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; the file gets the mode a plain open would give
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode())


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Return advpipe's cache folder: ``$ADVPIPE_CACHE_DIR`` or ``~/.cache/advpipe``."""
    return Path(os.environ.get("ADVPIPE_CACHE_DIR") or Path.home() / ".cache" / "advpipe")


def check_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and make sure files can be written there, else raise AdvpipeError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise AdvpipeError(f"cannot write to {what} {str(path)!r}: {exc.strerror or exc}") from exc
    return path


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

