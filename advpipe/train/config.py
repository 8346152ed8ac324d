"""The frozen training configuration, and resolving it from a YAML file plus CLI overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from advpipe.errors import AdvpipeError
from advpipe.yamlfile import read_yaml_mapping
from advpipe.paths import default_run_dir


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved beside its outputs as ``config.yaml``."""

    data: str = "embedded"
    data_dir: str | None = None
    limit: int | None = None
    val_size: int | None = None
    test_subset: int | None = 2000
    image_size: int | None = None
    crop: str = "pad"
    download: bool = False
    model: str = "resnet20"
    pretrained: str | None = None
    small_stem: bool = False
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
        except yaml.YAMLError as exc:
            raise AdvpipeError(f"{flag} {item!r}: cannot read the value") from exc
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
    if isinstance(values.get("milestones"), list):  # YAML lists; the type of each entry is validated
        values["milestones"] = tuple(values["milestones"])
    try:
        return TrainConfig(**values)
    except TypeError as exc:  # a wrong key is refused by read_config_file; this is a wrong kind of value
        raise AdvpipeError(f"bad training option: {exc}") from exc


#: fields set only in a config file (no command-line flag)
_FILE_ONLY = {"momentum", "nesterov", "milestones", "gamma"}




def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: what each field's annotation requires of a value, and how a refusal names it
_KINDS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "an integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "float": (_is_finite, "a finite number"),
    "Mapping[str, Any]": (lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
                          "a mapping of option names to values"),
    "tuple[float, ...]": (lambda v: isinstance(v, (tuple, list)) and all(_is_finite(m) for m in v),
                          "a list of finite numbers"),
}


def _check_kinds(cfg: TrainConfig) -> None:
    """Refuse a value of the wrong kind for its field (a YAML ``epochs: abc``, ``lr: "0.1"``, ``milestones: 5``)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind, optional = str(f.type).split("|")[0].strip(), str(f.type).endswith("| None")
        if value is None and optional:
            continue
        check, wanted = _KINDS[kind]
        if not check(value):
            raise AdvpipeError(f"{f.name} must be {wanted}, got {value!r}"[:300],
                               fields=() if f.name in _FILE_ONLY else (f.name,))


def validate(cfg: TrainConfig) -> None:
    """Refuse values that cannot make a run, with a message naming the option."""
    _check_kinds(cfg)
    if cfg.test_subset is not None and cfg.test_subset < 0:
        raise AdvpipeError(f"--test-subset must be 0 (the full test set) or more, got {cfg.test_subset!r}",
                           fields=("test_subset",))
    for name in ("val_size", "limit", "image_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise AdvpipeError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(cfg, name)!r}")
    if cfg.momentum < 0 or cfg.weight_decay < 0:
        raise AdvpipeError(f"momentum and weight_decay must be >= 0, got {cfg.momentum} and {cfg.weight_decay}",
                           fields=("weight_decay",))
    if cfg.epochs < 1:
        raise AdvpipeError(f"epochs must be at least 1, got {cfg.epochs}", fields=("epochs",))
    if cfg.batch_size < 1:
        raise AdvpipeError(f"batch_size must be at least 1, got {cfg.batch_size}", fields=("batch_size",))
    if cfg.workers < 0:
        raise AdvpipeError(f"workers must be 0 or more, got {cfg.workers}", fields=("workers",))
    if cfg.lr <= 0:
        raise AdvpipeError(f"lr must be positive, got {cfg.lr}", fields=("lr",))
    if not all(0 <= m <= 1 for m in cfg.milestones):
        raise AdvpipeError(f"milestones are fractions of training in [0, 1], got {list(cfg.milestones)}")
    if cfg.crop not in ("pad", "random-resized"):
        raise AdvpipeError(f"crop must be pad or random-resized, got {cfg.crop!r}", fields=("crop",))
    if cfg.schedule not in ("cosine", "multistep", "constant"):
        raise AdvpipeError(f"schedule must be cosine, multistep or constant, got {cfg.schedule!r}",
                           fields=("schedule",))
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise AdvpipeError(f"precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}", fields=("precision",))
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs >= cfg.epochs and cfg.warmup_epochs > 0:
        raise AdvpipeError(f"warmup_epochs must be in [0, epochs), got {cfg.warmup_epochs}", fields=("warmup_epochs",))
    if cfg.resume and cfg.overwrite:
        raise AdvpipeError("resume and overwrite exclude each other", fields=("resume", "overwrite"))
