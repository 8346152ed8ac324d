"""Checkpoints: one ``.pt`` file with the state_dict and metadata, loadable with weights_only=True.

Checkpoints may come from other teams, so loading never unpickles arbitrary objects and every
field is checked before use.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advpipe import __version__
from advpipe.errors import AdvpipeError
from advpipe.files import atomic_write_bytes

FORMAT = "advpipe-checkpoint/1"
#: checkpoints shipped inside the package, selected as ``builtin:<name>`` (see docs/training.md)
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_PREFIX = "builtin:"
#: the largest checkpoint file read (a last.pt holds the weights and the optimizer state, so a
#: 2 GiB file is a model of about 170M parameters); ``ADVPIPE_MAX_CHECKPOINT_BYTES`` raises it
MAX_CHECKPOINT_BYTES = 2 << 30
MAX_CHECKPOINT_ENV = "ADVPIPE_MAX_CHECKPOINT_BYTES"


def max_checkpoint_bytes() -> int:
    """The checkpoint size limit: ``ADVPIPE_MAX_CHECKPOINT_BYTES`` if set, else :data:`MAX_CHECKPOINT_BYTES`."""
    text = os.environ.get(MAX_CHECKPOINT_ENV, "").strip()
    if not text:
        return MAX_CHECKPOINT_BYTES
    if not text.isdigit() or int(text) <= 0:
        raise AdvpipeError(f"{MAX_CHECKPOINT_ENV} must be a positive number of bytes, got {text[:40]!r}")
    return int(text)


def check_weights_file(path: Path, what: str = "checkpoint") -> None:
    """Refuse (AdvpipeError) a missing, non-regular or oversized file before anything reads it."""
    try:
        st = path.stat()  # follows a symlink: the file it names is what would be read
    except FileNotFoundError:
        raise AdvpipeError(f"{what} {str(path)!r} does not exist") from None
    except OSError as exc:  # a name over 255 bytes, a loop of symlinks, ...
        raise AdvpipeError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block forever, /dev/zero never ends
        raise AdvpipeError(f"{what} {str(path)!r} is not a regular file")
    limit = max_checkpoint_bytes()
    if st.st_size > limit:
        raise AdvpipeError(f"{what} {str(path)!r} is {st.st_size / 2**30:.1f} GiB, over the "
                           f"{limit / 2**30:.1f} GiB limit for checkpoints ({MAX_CHECKPOINT_ENV} raises it)")


def builtin_checkpoints() -> list[str]:
    """Names of the checkpoints shipped in the package (``builtin:<name>``)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.pt"))


def resolve_checkpoint(spec: str | Path) -> Path:
    """The file a checkpoint argument names: a path, or ``builtin:<name>`` for a shipped checkpoint."""
    text = str(spec)
    if not text.startswith(BUILTIN_PREFIX):
        return Path(spec)
    name = text[len(BUILTIN_PREFIX):]
    path = BUILTIN_DIR / f"{name}.pt"
    if name not in builtin_checkpoints():
        raise AdvpipeError(f"unknown built-in checkpoint {text!r}; choose one of: "
                           f"{', '.join(BUILTIN_PREFIX + n for n in builtin_checkpoints()) or '(none shipped)'}")
    return path


@dataclass
class Checkpoint:
    """The parts of an advpipe checkpoint; ``state`` holds optimizer/scheduler state for resume."""

    arch: str
    num_classes: int
    dataset: str
    fingerprint: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    model_state: dict[str, torch.Tensor]
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    method: str = "standard"
    state: dict[str, Any] = field(default_factory=dict)
    #: free provenance (recipe, commit, ...) of a published checkpoint; optional in the file
    info: dict[str, Any] = field(default_factory=dict)
    #: the ResNet stem was adapted for small inputs (``--small-stem``); optional in the file
    small_stem: bool = False


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (an interrupted save never leaves a half file)."""
    payload = {
        "format": FORMAT,
        "advpipe_version": __version__,
        "arch": ckpt.arch,
        "num_classes": ckpt.num_classes,
        "dataset": ckpt.dataset,
        "fingerprint": ckpt.fingerprint,
        "mean": list(ckpt.mean),
        "std": list(ckpt.std),
        "image_size": ckpt.image_size,
        "epoch": ckpt.epoch,
        "metrics": ckpt.metrics,
        "config": ckpt.config,
        "method": ckpt.method,
        "model_state": ckpt.model_state,
        "state": ckpt.state,
        "info": ckpt.info,
        "small_stem": ckpt.small_stem,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate an advpipe checkpoint (a path or ``builtin:<name>``); anything else raises AdvpipeError."""
    path = resolve_checkpoint(path)
    check_weights_file(path, "checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdvpipeError(f"{path} is not a readable advpipe checkpoint ({first[:160]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AdvpipeError(f"{path} is not an advpipe checkpoint (expected format {FORMAT!r})")
    try:
        ckpt = Checkpoint(
            arch=_typed(payload, "arch", str),
            num_classes=_typed(payload, "num_classes", int),
            dataset=_typed(payload, "dataset", str),
            fingerprint=_typed(payload, "fingerprint", str),
            mean=tuple(float(v) for v in payload["mean"]),
            std=tuple(float(v) for v in payload["std"]),
            image_size=_typed(payload, "image_size", int),
            model_state=_typed(payload, "model_state", dict),
            epoch=_typed(payload, "epoch", int),
            metrics=_typed(payload, "metrics", dict),
            config=_typed(payload, "config", dict),
            method=_typed(payload, "method", str),
            state=_typed(payload, "state", dict),
            info=_typed({"info": payload.get("info", {})}, "info", dict),
            small_stem=_typed({"small_stem": payload.get("small_stem", False)}, "small_stem", bool),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AdvpipeError(f"{path} is a damaged advpipe checkpoint: {exc}") from exc
    if not all(isinstance(v, torch.Tensor) for v in ckpt.model_state.values()):
        raise AdvpipeError(f"{path} is a damaged advpipe checkpoint: model_state holds non-tensors")
    problem = _field_problem(ckpt)
    if problem:
        raise AdvpipeError(f"{path} is a damaged advpipe checkpoint: {problem}")
    return ckpt


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state`` that hold a NaN or an infinity."""
    return [name for name, value in state.items() if isinstance(value, torch.Tensor)
            and (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all())]


def _short(values: tuple[float, ...]) -> str:
    """A list for a message, cut after 4 entries."""
    return str(list(values[:4]))[:-1] + (f", ... ({len(values)} values)]" if len(values) > 4 else "]")


def _field_problem(ckpt: Checkpoint) -> str | None:
    """What makes a parsed checkpoint unusable (bad normalization, non-finite weights), or None."""
    mean, std = ckpt.mean, ckpt.std
    channels = next((v.shape[1] for v in ckpt.model_state.values() if v.dim() == 4), None)  # the stem conv
    if not mean or len(mean) != len(std) or (channels is not None and len(mean) not in (1, channels)):
        return (f"normalization mean={_short(mean)} std={_short(std)} does not fit a model of "
                f"{channels if channels is not None else 'unknown'} input channels")
    if not all(math.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
        return f"normalization mean={_short(mean)} std={_short(std)} must be finite with std > 0"
    if ckpt.num_classes < 1 or ckpt.image_size < 1 or ckpt.epoch < 0:
        return f"num_classes {ckpt.num_classes}, image_size {ckpt.image_size} and epoch {ckpt.epoch} must be positive"
    training = ckpt.state.get("model", {})
    bad = non_finite_tensors(ckpt.model_state) + non_finite_tensors(training if isinstance(training, dict) else {})
    if bad:
        return f"{len(bad)} weight tensors hold NaN or infinite values (first {bad[0]!r})"
    return None


def _typed(payload: dict, key: str, kind: type) -> Any:
    value = payload[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"field {key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly; a mismatch raises AdvpipeError naming the difference."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise AdvpipeError(f"{source} does not fit this architecture: {detail[:200]}") from exc
