"""The frozen training configuration, and resolving it from a YAML file plus CLI overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from advpipe.errors import AdvpipeError
from advpipe.utils import read_yaml_mapping
from advpipe.paths import default_run_dir


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved beside its outputs as ``config.yaml``."""

    data: str = "embedded"
    data_dir: str | None = None
    limit: int | None = None
    val_size: int | None = None
    image_size: int | None = None
    download: bool = False
    model: str = "resnet20"
    aug: str = "none"
    aug_options: Mapping[str, Any] = field(default_factory=dict)
    method_options: Mapping[str, Any] = field(default_factory=dict)
    masks: str | None = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    precision: str = "auto"
    out: str | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        validate(self)

    def run_dir(self) -> Path:
        """The run folder: ``--out`` or ``runs/<data>/<model>/<aug>/``."""
        return Path(self.out) if self.out else default_run_dir(self.data, self.model, self.aug)

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-able dict of this config."""
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        out["aug_options"] = dict(self.aug_options)
        out["method_options"] = dict(self.method_options)
        return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict of TrainConfig fields (unknown keys are refused)."""
    raw = read_yaml_mapping(path, "config file", "a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise AdvpipeError(f"config file {str(path)!r} has unknown keys {unknown}; known keys: {', '.join(sorted(known))}")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are read as YAML scalars or lists (``l=[2,15]``, ``eps=0.03``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AdvpipeError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise AdvpipeError(f"{flag} {item!r}: cannot read the value") from None
    return out


def parse_pair(text: str | None, flag: str, kind: type) -> list | None:
    """Parse ``A,B`` into ``[A, B]`` of ``kind`` (None stays None); anything else is refused."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 2 or values[0] > values[1]:
        raise AdvpipeError(f"{flag} expects LOW,HIGH with LOW <= HIGH (e.g. {'2,15' if kind is int else '0.2,0.4'}), got {text!r}")
    return values


def resolve_config(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> TrainConfig:
    """Build the config: dataclass defaults, then the file, then CLI flags that were given."""
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    if "milestones" in values:
        values["milestones"] = tuple(float(m) for m in values["milestones"])
    try:
        return TrainConfig(**values)
    except TypeError as exc:  # a wrong key is refused by read_config_file; this is a wrong kind of value
        raise AdvpipeError(f"bad training option: {exc}") from exc


def validate(cfg: TrainConfig) -> None:
    """Refuse values that cannot make a run, with a message naming the option."""
    for name in ("lr", "momentum", "weight_decay", "gamma", "warmup_epochs"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdvpipeError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
    for name in ("epochs", "batch_size", "seed"):
        if isinstance(getattr(cfg, name), bool) or not isinstance(getattr(cfg, name), int):
            raise AdvpipeError(f"--{name.replace('_', '-')} must be an integer, got {getattr(cfg, name)!r}")
    if cfg.val_size is not None and (isinstance(cfg.val_size, bool) or not isinstance(cfg.val_size, int)
                                     or cfg.val_size < 1):
        raise AdvpipeError(f"--val-size must be a positive number of samples, got {cfg.val_size!r}")
    if cfg.momentum < 0 or cfg.weight_decay < 0:
        raise AdvpipeError(f"--momentum and --weight-decay must be >= 0, got {cfg.momentum} and {cfg.weight_decay}")
    if cfg.epochs < 1:
        raise AdvpipeError(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise AdvpipeError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.lr <= 0:
        raise AdvpipeError(f"--lr must be positive, got {cfg.lr}")
    if cfg.schedule not in ("cosine", "multistep", "constant"):
        raise AdvpipeError(f"--schedule must be cosine, multistep or constant, got {cfg.schedule!r}")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise AdvpipeError(f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs >= cfg.epochs and cfg.warmup_epochs > 0:
        raise AdvpipeError(f"--warmup-epochs must be in [0, epochs), got {cfg.warmup_epochs}")
    if cfg.resume and cfg.overwrite:
        raise AdvpipeError("--resume and --overwrite exclude each other")
