"""A study's YAML: shared training settings, a grid of axes, optional masks, evaluation and report.

Example (``configs/studies/*.yaml``)::

    name: table1-cifar10-cpu
    train: {data: cifar10, model: resnet20, limit: 5000, epochs: 15}
    grid: {aug: [none, cutout, advmask], seed: [0, 1, 2]}
    masks: {checkpoint: "builtin:resnet20-cifar10", eps: 8/255, steps: 25}
    evaluate: {attacks: ["fgsm:eps=2/255"], checkpoint: last}
    report: {baseline: none}

Every grid point is one :class:`TrainConfig`; the whole grid is built, and so validated, before
any run starts.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from advpipe.errors import AdvpipeError
from advpipe.train.config import TrainConfig
from advpipe.yamlfile import read_yaml_mapping

_SECTIONS = {"name", "out", "train", "grid", "masks", "evaluate", "report"}
_MASK_KEYS = {"checkpoint", "eps", "steps", "split", "limit", "batch_size", "seed", "precision", "encoder",
              "attack_options"}
_EVAL_KEYS = {"attacks", "corruptions", "severities", "checkpoint", "limit"}
#: TrainConfig fields a study sets itself (per run) or that belong to the command line
_RESERVED = {"out", "resume", "overwrite", "masks"}


@dataclass(frozen=True)
class MaskSpec:
    """The attack masks a study needs, precomputed once into ``<study>/masks/``."""

    checkpoint: str
    eps: Fraction = Fraction(8, 255)
    steps: int | None = None
    split: str = "train"
    limit: int | None = None
    batch_size: int | None = None
    seed: int = 0
    precision: str = "auto"
    encoder: str | None = None
    #: any other SparseAttackConfig field, as precompute's ``--attack-opt`` (e.g. ``lambda_rule: adaptive``)
    attack_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSpec:
    """How every run is evaluated: which checkpoint (``last`` or ``best``) and which perturbations."""

    attacks: tuple[str, ...] = ()
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    checkpoint: str = "last"
    limit: int | None = None


@dataclass(frozen=True)
class RunSpec:
    """One grid point: its name (from its axis values), folder, training config and evaluation."""

    name: str
    axes: dict[str, Any]
    train: TrainConfig
    evaluate: EvalSpec


@dataclass(frozen=True)
class StudyConfig:
    """A parsed, validated study."""

    name: str
    out: Path
    runs: tuple[RunSpec, ...]
    masks: MaskSpec | None = None
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    baseline: str = "none"
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def store_path(self) -> Path | None:
        """Where the study's mask store lives (None when it declares no masks)."""
        return None if self.masks is None else self.out / "masks" / "masks.zarr"


def _fail(source: str, message: str) -> AdvpipeError:
    return AdvpipeError(f"study {source}: {message}")


def read_study_file(path: str | Path) -> dict[str, Any]:
    """Read a study YAML file into a dict; unreadable or non-mapping files are refused."""
    raw = read_yaml_mapping(path, "study file", "a mapping with 'train' and 'grid' sections")
    if not raw:
        raise AdvpipeError(f"study file {str(path)!r} is empty; it needs 'train' and 'grid' sections")
    return raw


def _section(raw: dict, key: str, source: str, allowed: set[str] | None = None) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(source, f"'{key}' must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed) if allowed is not None else []
    if unknown:
        raise _fail(source, f"unknown {key} keys {unknown}; known: {', '.join(sorted(allowed or ()))}")
    return value


def _value_name(value: Any) -> str:
    text = str(value).replace("/", "_").replace("+", "_").replace(" ", "")
    return text if isinstance(value, str) else text.lower()


def run_name(axes: dict[str, Any]) -> str:
    """A run folder's name from its axis values, e.g. ``aug-cutout_seed-1``."""
    return "_".join(f"{k.replace('_', '-')}-{_value_name(v)}" for k, v in axes.items())


def parse_study(raw: dict[str, Any], *, source: str = "config", out: str | None = None,
                data_dir: str | None = None) -> StudyConfig:
    """Build and validate the whole study from its YAML dict; any problem raises AdvpipeError before a run starts."""
    unknown = sorted(set(raw) - _SECTIONS)
    if unknown:
        raise _fail(source, f"unknown sections {unknown}; known: {', '.join(sorted(_SECTIONS))}")
    name = str(raw.get("name") or Path(source).stem)
    known = {f.name for f in dataclasses.fields(TrainConfig)} - _RESERVED
    base = _section(raw, "train", source)
    grid = _section(raw, "grid", source)
    for key in list(base) + list(grid):
        if key.replace("-", "_") not in known:
            raise _fail(source, f"unknown training option {key!r}; study axes and train keys are TrainConfig "
                                f"fields: {', '.join(sorted(known))}")
    if not grid:
        raise _fail(source, "the grid is empty; give at least one axis, e.g. grid: {aug: [none, cutout]}")
    axes: dict[str, list] = {}
    for key, values in grid.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise _fail(source, f"grid axis {key!r} has no values")
        if len({yaml.safe_dump(v) for v in values}) != len(values):
            raise _fail(source, f"grid axis {key!r} repeats a value")
        axes[key.replace("-", "_")] = values
    base = {k.replace("-", "_"): v for k, v in base.items()}
    if data_dir is not None:
        base["data_dir"] = data_dir
    study_out = Path(out or raw.get("out") or Path("studies") / name)
    evaluate = _eval_spec(_section(raw, "evaluate", source, _EVAL_KEYS), source)
    masks = _mask_spec(_section(raw, "masks", source, _MASK_KEYS), source) if raw.get("masks") else None
    store = None if masks is None else study_out / "masks" / "masks.zarr"
    runs = []
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes, combo))
        rname = run_name(point)
        values = {**base, **point, "out": str(study_out / "runs" / rname)}
        if "milestones" in values and isinstance(values["milestones"], list):
            values["milestones"] = tuple(values["milestones"])
        try:
            cfg = TrainConfig(**values)
        except AdvpipeError as exc:
            raise _fail(source, f"run {rname}: {exc}") from exc
        except TypeError as exc:
            raise _fail(source, f"run {rname}: {exc}") from exc
        if _needs_masks(cfg, source, rname):
            if store is None:
                raise _fail(source, f"run {rname}: --aug {cfg.aug} needs attack masks; declare a 'masks' section")
            cfg = replace(cfg, masks=str(store))
        runs.append(RunSpec(rname, point, cfg, evaluate))
    return StudyConfig(name, study_out, tuple(runs), masks, evaluate, str(_section(raw, "report", source, {"baseline"})
                                                                            .get("baseline", "none")), raw)


def _needs_masks(cfg: TrainConfig, source: str, rname: str) -> bool:
    """Whether the run's input augmentation reads attack masks (building it also validates its options)."""
    from advpipe.augment.base import AugmentContext, build_augment
    from advpipe.train.compose import parse_aug
    from advpipe.train.methods import MethodContext, build_method

    from advpipe.models.external import split_arch, torchvision_names
    from advpipe.models.registry import list_models

    library, bare = split_arch(cfg.model)
    if library == "timm":
        import timm

        known = timm.is_model(bare.split(".", 1)[0])
    else:
        known = (bare in torchvision_names()) if library == "torchvision" else \
            cfg.model in list_models(include_torchvision=True)
    if not known:
        raise _fail(source, f"run {rname}: unknown model {cfg.model!r}; see `advpipe info` for the choices")
    aug, method = parse_aug(cfg.aug)
    try:
        augment = build_augment(aug, AugmentContext(cfg.data, (32, 32), 10, (0.5, 0.5, 0.5), cfg.epochs),
                                **dict(cfg.aug_options))
        build_method(method, MethodContext(10, cfg.epochs, (32, 32)), **dict(cfg.method_options))
    except TypeError as exc:
        raise _fail(source, f"run {rname}: bad options for --aug {cfg.aug}: {exc}") from exc
    return "attack_mask" in augment.needs_side


def _eval_spec(raw: dict, source: str) -> EvalSpec:
    from advpipe.eval.corruptions import parse_corruption_list, parse_severities
    from advpipe.eval.specs import parse_attack_specs

    attacks = tuple(str(a) for a in _as_list(raw.get("attacks")))
    corruptions = tuple(str(c) for c in _as_list(raw.get("corruptions")))
    severities = tuple(raw.get("severities") or (1, 2, 3, 4, 5))
    checkpoint = str(raw.get("checkpoint", "last"))
    if checkpoint not in ("last", "best"):
        raise _fail(source, f"evaluate.checkpoint must be last or best, got {checkpoint!r}")
    parse_attack_specs(attacks)
    parse_corruption_list(list(corruptions))
    parse_severities(severities)
    return EvalSpec(attacks, corruptions, severities, checkpoint, raw.get("limit"))


def _mask_spec(raw: dict, source: str) -> MaskSpec:
    from advpipe.fraction import parse_fraction

    if not raw.get("checkpoint"):
        raise _fail(source, "masks.checkpoint is required (a path or builtin:NAME)")
    values = dict(raw)
    values["eps"] = parse_fraction(str(values.get("eps", "8/255")), name="masks.eps")
    options = values.get("attack_options") or {}
    if not isinstance(options, dict):
        raise _fail(source, f"masks.attack_options must be a mapping, got {options!r}")
    values["attack_options"] = {str(k): v for k, v in options.items()}
    spec = MaskSpec(**values)
    from advpipe.pipeline.precompute_config import PrecomputeConfig, attack_config

    try:  # the attack validates its own options, so a bad one is refused before any run starts
        attack_config(PrecomputeConfig(data="embedded", checkpoint=spec.checkpoint, eps=spec.eps, steps=spec.steps,
                                       attack_options=spec.attack_options))
    except (AdvpipeError, TypeError, ValueError) as exc:
        raise _fail(source, f"masks.attack_options: {exc}") from exc
    return spec


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
