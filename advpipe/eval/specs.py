"""Attack specs for ``advpipe evaluate --attack``: ``KIND[:KEY=VALUE,...]`` parsed into AttackSpec.

Grammar (no ``eval`` anywhere; fractions go through :func:`advpipe.utils.parse_fraction`)::

    SPEC   := "default" | KIND | KIND ":" PARAM ("," PARAM)*
    PARAM  := KEY "=" VALUE

Kinds live in the :data:`ATTACKS` registry (see ``docs/evaluation.md`` for the table). Each kind
declares its parameters with parsers and defaults; unknown kinds or keys, duplicates, missing
required keys and malformed values raise :class:`AdvpipeError` naming the accepted forms.

Example::

    spec = parse_attack_spec("pgd:eps=8/255,steps=20")
    spec.key    # 'pgd:eps=8/255,steps=20,step=2/255,start=random'
    spec.label  # 'PGD-20 8/255'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from advpipe.attacks import fgsm, least_likely_targets, mifgsm, pgd
from advpipe.attacks.apgd import apgd, apgd_targeted, apgd_worst_case
from advpipe.errors import AdvpipeError
from advpipe.registry import Registry
from advpipe.utils import parse_fraction

#: the M2AT evaluation suite (m2at.txt Sec. 5.1, Table 1): FGSM, PGD-10, PGD-20 and CW-20 at 8/255
DEFAULT_SUITE = ("fgsm:eps=8/255", "pgd:eps=8/255,steps=10", "pgd:eps=8/255,steps=20", "cw:eps=8/255,steps=20")
DEFAULT_NAME = "default"
MAX_STEPS = 10_000

_REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One parameter of an attack kind: how to parse it and its default.

    ``default`` is a value, ``_REQUIRED``, or a function of the already resolved parameters
    (e.g. PGD's step size defaults to ``eps / 4``).
    """

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    def resolve_default(self, resolved: Mapping[str, Any]) -> Any:
        """The default value given the parameters resolved before this one."""
        return self.default(resolved) if callable(self.default) else self.default


@dataclass(frozen=True)
class AttackContext:
    """What an attack run may need besides the batch: randomness and an optional surrogate model."""

    generator: torch.Generator | None = None
    surrogate: nn.Module | None = None


AttackRunner = Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping[str, Any], AttackContext], torch.Tensor]


@dataclass(frozen=True)
class AttackKind:
    """A registered attack kind: its parameters, a short table label and the function that runs it."""

    name: str
    summary: str
    params: tuple[Param, ...]
    run: AttackRunner
    label: Callable[[Mapping[str, Any]], str]
    needs_surrogate: bool = False


@dataclass(frozen=True)
class AttackSpec:
    """A parsed, fully resolved attack: kind plus every parameter (defaults filled in)."""

    kind: str
    params: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    @property
    def values(self) -> dict[str, Any]:
        """The parameters as a dict (Fractions for eps/step sizes)."""
        return dict(self.params)

    @property
    def key(self) -> str:
        """Canonical spec text with every parameter: the stable key in JSON and reports."""
        return f"{self.kind}:" + ",".join(f"{k}={_value_text(v)}" for k, v in self.params)

    @property
    def label(self) -> str:
        """Short human label for tables, e.g. ``PGD-20 8/255``."""
        return ATTACKS.get(self.kind).label(self.values)

    def to_json(self) -> dict[str, Any]:
        """JSON-able parameters (fractions as ``8/255`` text plus their float value)."""
        out: dict[str, Any] = {}
        for k, v in self.params:
            if isinstance(v, Fraction):
                out[k] = _value_text(v)
                out[f"{k}_float"] = float(v)
            else:
                out[k] = v
        return out

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """Attack ``model`` on ``(x, y)`` and return the adversarial images."""
        return ATTACKS.get(self.kind).run(model, x, y, self.values, ctx)


ATTACKS: Registry[AttackKind] = Registry("attack kind")


# --------------------------------------------------------------------------- value parsers


def _fraction(name: str) -> Callable[[str], Fraction]:
    return lambda text: parse_fraction(text, name=name)


def _steps(text: str) -> int:
    raw = text.strip()
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_STEPS:
        raise AdvpipeError(f"invalid steps {text!r}; use a whole number from 1 to {MAX_STEPS}")
    return int(raw)


def _start(text: str) -> str:
    raw = text.strip()
    if raw not in ("random", "clean"):
        raise AdvpipeError(f"invalid start {text!r}; use random (uniform noise in the eps ball) or clean")
    return raw


def _count(name: str, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        raw = text.strip()
        if not raw.isdigit() or not 1 <= int(raw) <= high:
            raise AdvpipeError(f"invalid {name} {text!r}; use a whole number from 1 to {high}")
        return int(raw)

    return parse


def _decay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= 100):
        raise AdvpipeError(f"invalid decay {text!r}; use a number from 0 to 100, e.g. 1.0")
    return value


def _path(text: str) -> str:
    raw = text.strip()
    if not raw:
        raise AdvpipeError("surrogate needs a checkpoint path, e.g. surrogate=runs/cifar10/vgg19/none/best.pt")
    return raw


def _value_text(value: Any) -> str:
    return str(value) if not isinstance(value, float) else f"{value:g}"


def eps_text(value: Fraction) -> str:
    """Write an eps for people: ``8/255`` when it is a whole number of 255ths, else ``0.04``."""
    in_255 = value * 255
    return f"{in_255.numerator}/255" if in_255.denominator == 1 else f"{float(value):g}"


# --------------------------------------------------------------------------- the kinds


def _eps(default: Fraction) -> Param:
    return Param("eps", _fraction("eps"), default, f"l_inf radius in [0,1] pixels (default {eps_text(default)})")


_STEP = Param("step", _fraction("step"), lambda p: p["eps"] / 4, "step size (default eps/4, 2/255 at eps 8/255)")
_START = Param("start", _start, "random", "random (default, Madry et al.) or clean (I-FGSM/BIM)")


def _suffix(p: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    extra = [f"{k}={eps_text(v) if isinstance(v, Fraction) else _value_text(v)}" for k, v in p.items()
             if k in defaults and v != defaults[k]]
    return f" ({', '.join(extra)})" if extra else ""


def _run_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Mapping[str, Any],
              ctx: AttackContext) -> torch.Tensor:
    return fgsm(model, x, y, eps=float(p["eps"]), generator=ctx.generator)


def _pgd_runner(loss: str, least_likely: bool) -> AttackRunner:
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Mapping[str, Any],
            ctx: AttackContext) -> torch.Tensor:
        target = least_likely_targets(model, x) if least_likely else y
        return pgd(model, x, target, eps=float(p["eps"]), steps=p["steps"], step_size=float(p["step"]),
                   random_start=p["start"] == "random", targeted=least_likely, loss=loss, generator=ctx.generator)

    return run


def _run_transfer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Mapping[str, Any],
                  ctx: AttackContext) -> torch.Tensor:
    if ctx.surrogate is None:
        raise AdvpipeError("mifgsm-transfer needs its surrogate model loaded (surrogate=PATH)")
    return mifgsm(ctx.surrogate, x, y, eps=float(p["eps"]), steps=p["steps"], step_size=float(p["step"]),
                  decay=p["decay"], generator=ctx.generator)


def _apgd_runner(kind: str) -> AttackRunner:
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Mapping[str, Any],
            ctx: AttackContext) -> torch.Tensor:
        eps, steps = float(p["eps"]), p["steps"]
        if kind == "suite":
            return apgd_worst_case(model, x, y, eps=eps, steps=steps, targets=p["targets"], generator=ctx.generator)
        if kind == "targeted":
            return apgd_targeted(model, x, y, eps=eps, steps=steps, targets=p["targets"], restarts=p["restarts"],
                                 generator=ctx.generator)
        return apgd(model, x, y, eps=eps, steps=steps, loss=kind, restarts=p["restarts"], generator=ctx.generator)

    return run


def _apgd_label(prefix: str, suffix: str = "") -> Callable[[Mapping[str, Any]], str]:
    def label(p: Mapping[str, Any]) -> str:
        defaults = {"restarts": 1, "targets": 9}
        return f"{prefix}-{p['steps']} {eps_text(p['eps'])}{suffix}{_suffix(p, defaults)}"

    return label


def _pgd_label(prefix: str) -> Callable[[Mapping[str, Any]], str]:
    def label(p: Mapping[str, Any]) -> str:
        defaults = {"step": p["eps"] / 4, "start": "random"}
        return f"{prefix}-{p['steps']} {eps_text(p['eps'])}{_suffix(p, defaults)}"

    return label


def _transfer_label(p: Mapping[str, Any]) -> str:
    defaults = {"step": p["eps"] / p["steps"], "decay": 1.0}
    return f"MI-FGSM-{p['steps']} transfer {eps_text(p['eps'])}{_suffix(p, defaults)}"


ATTACKS.register("fgsm", AttackKind(
    "fgsm", "one signed-gradient step of size eps (Goodfellow et al. 2015; m2at.txt Eq. 5)",
    (_eps(Fraction(8, 255)),), _run_fgsm, lambda p: f"FGSM {eps_text(p['eps'])}"))
ATTACKS.register("pgd", AttackKind(
    "pgd", "l_inf PGD on cross-entropy (Madry et al. 2018; m2at.txt Eq. 6)",
    (_eps(Fraction(8, 255)), Param("steps", _steps, 10, "iterations (default 10)"), _STEP, _START),
    _pgd_runner("ce", False), _pgd_label("PGD")))
ATTACKS.register("cw", AttackKind(
    "cw", "l_inf PGD on the Carlini-Wagner margin loss, M2AT's CW-k (m2at.txt Sec. 5.1, Table 1)",
    (_eps(Fraction(8, 255)), Param("steps", _steps, 20, "iterations (default 20)"), _STEP, _START),
    _pgd_runner("cw", False), _pgd_label("CW")))
ATTACKS.register("pgd-ll", AttackKind(
    "pgd-ll", "targeted l_inf PGD towards the least likely class, PGD_LL (m-tlat.txt Sec. 4.1)",
    (_eps(Fraction(1, 25)), Param("steps", _steps, 10, "iterations (default 10)"), _STEP, _START),
    _pgd_runner("ce", True), _pgd_label("PGD-LL")))
ATTACKS.register("mifgsm-transfer", AttackKind(
    "mifgsm-transfer", "black-box MI-FGSM crafted on a surrogate checkpoint (Dong et al. 2018; m-tlat.txt Sec. 4.1)",
    (Param("surrogate", _path, _REQUIRED, "checkpoint of the surrogate model (required)"), _eps(Fraction(1, 25)),
     Param("steps", _steps, 10, "iterations (default 10)"),
     Param("step", _fraction("step"), lambda p: p["eps"] / p["steps"], "step size (default eps/steps)"),
     Param("decay", _decay, 1.0, "momentum decay mu (default 1.0)")),
    _run_transfer, _transfer_label, needs_surrogate=True))

_APGD_STEPS = Param("steps", _steps, 100, "iterations (default 100, as in AutoAttack)")
_RESTARTS = Param("restarts", _count("restarts", 100), 1, "random restarts on the samples not broken yet (default 1)")
_TARGETS = Param("targets", _count("targets", 999), 9, "target classes, the most likely after the top one (default 9)")
ATTACKS.register("apgd-ce", AttackKind(
    "apgd-ce", "Auto-PGD on cross-entropy, AutoAttack's first attack (Croce & Hein 2020)",
    (_eps(Fraction(8, 255)), _APGD_STEPS, _RESTARTS), _apgd_runner("ce"), _apgd_label("APGD-CE")))
ATTACKS.register("apgd-dlr", AttackKind(
    "apgd-dlr", "Auto-PGD on the Difference of Logits Ratio loss (Croce & Hein 2020, Eq. 4)",
    (_eps(Fraction(8, 255)), _APGD_STEPS, _RESTARTS), _apgd_runner("dlr"), _apgd_label("APGD-DLR")))
ATTACKS.register("apgd-t", AttackKind(
    "apgd-t", "targeted Auto-PGD on the targeted DLR loss towards each of the top classes (Croce & Hein 2020, Eq. 5)",
    (_eps(Fraction(8, 255)), _APGD_STEPS, _TARGETS, _RESTARTS), _apgd_runner("targeted"), _apgd_label("APGD-T")))
ATTACKS.register("apgd-suite", AttackKind(
    "apgd-suite", "per image the worst case of APGD-CE and APGD-T (AutoAttack's first two attacks, not all four)",
    (_eps(Fraction(8, 255)), _APGD_STEPS, _TARGETS), _apgd_runner("suite"),
    _apgd_label("APGD-CE+T", " worst case")))


# --------------------------------------------------------------------------- parsing


def accepted_forms() -> str:
    """One line listing the spec grammar and every kind with its keys."""
    kinds = "; ".join(f"{name}[:{','.join(p.name + '=' for p in ATTACKS.get(name).params)}]"
                      for name in ATTACKS.names())
    return (f"accepted forms: '{DEFAULT_NAME}' (the M2AT suite) or KIND[:KEY=VALUE,...] with {kinds} "
            "(e.g. fgsm:eps=8/255, pgd:eps=8/255,steps=10, cw:steps=20, pgd-ll:eps=0.04,steps=10, "
            "mifgsm-transfer:surrogate=PATH,eps=0.04, apgd-ce:eps=8/255,steps=100, apgd-suite)")


def parse_attack_spec(text: str) -> AttackSpec:
    """Parse one ``KIND[:KEY=VALUE,...]`` spec into a resolved AttackSpec (AdvpipeError if invalid)."""
    raw = str(text).strip()
    kind_name, sep, rest = raw.partition(":")
    kind_name = kind_name.strip().lower()
    if not kind_name:
        raise AdvpipeError(f"empty attack spec {text!r}; {accepted_forms()}")
    if kind_name not in ATTACKS:
        raise AdvpipeError(f"unknown attack kind {kind_name!r} in {text!r}; {accepted_forms()}")
    kind = ATTACKS.get(kind_name)
    given: dict[str, str] = {}
    if sep:
        if not rest.strip():
            raise AdvpipeError(f"attack spec {text!r} has ':' but no parameters; {accepted_forms()}")
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().lower()
            if not eq or not key or not value.strip():
                raise AdvpipeError(f"attack spec {text!r}: expected KEY=VALUE, got {item.strip()!r}; "
                                   f"{accepted_forms()}")
            if key in given:
                raise AdvpipeError(f"attack spec {text!r} gives {key!r} twice")
            given[key] = value
    known = [p.name for p in kind.params]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise AdvpipeError(f"attack spec {text!r}: unknown key {unknown[0]!r} for {kind_name}; "
                           f"its keys are {', '.join(known)}")
    resolved: dict[str, Any] = {}
    for param in kind.params:
        if param.name in given:
            try:
                resolved[param.name] = param.parse(given[param.name])
            except AdvpipeError as exc:
                raise AdvpipeError(f"attack spec {text!r}: {exc}") from None
        else:
            value = param.resolve_default(resolved)
            if value is _REQUIRED:
                raise AdvpipeError(f"attack spec {text!r}: {kind_name} needs {param.name}= ({param.help})")
            resolved[param.name] = value
    return AttackSpec(kind_name, tuple(resolved.items()))


def parse_attack_specs(texts: Iterable[str]) -> list[AttackSpec]:
    """Parse several specs, expanding ``default`` to the M2AT suite and dropping exact duplicates."""
    specs: list[AttackSpec] = []
    for text in texts:
        expanded = DEFAULT_SUITE if str(text).strip().lower() == DEFAULT_NAME else (text,)
        for item in expanded:
            spec = parse_attack_spec(item)
            if spec not in specs:
                specs.append(spec)
    return specs
