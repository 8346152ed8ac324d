"""The one attack registry: every kind the evaluation, the sparse attack's ``L_init`` and the training methods run.

Each :class:`AttackKind` declares its parameters (with a text parser for ``advpipe evaluate
--attack KIND:KEY=VALUE`` specs, and a default), a short table label and the function that runs
it. :mod:`advpipe.eval.specs` parses spec strings into these parameters; the sparse attack runs
``ATTACKS.get(config.init_attack)`` for ``L_init`` (:mod:`advpipe.attacks.init_attack`); the
training methods (PGD-AT, M2AT, AdvProp, M-TLAT) call their attacker through it as well.

Example::

    pgd = ATTACKS.get("pgd")
    x_adv = pgd(model, x, y, eps=8 / 255, steps=10, generator=g)       # step defaults to eps/4
    pgd.label(pgd.resolve({"eps": Fraction(8, 255), "steps": 20}))     # 'PGD-20 8/255'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping

import torch
from torch import nn

from advpipe.attacks.apgd import apgd, apgd_targeted, apgd_worst_case
from advpipe.attacks.dense import fgsm, least_likely_targets, mifgsm, pgd
from advpipe.errors import AdvpipeError
from advpipe.registry import Registry
from advpipe.fraction import parse_fraction

MAX_STEPS = 10_000

#: the default of a parameter that has none: the caller must give it
REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One parameter of an attack kind: how to parse it from spec text and its default.

    ``default`` is a value, :data:`REQUIRED`, or a function of the already resolved parameters
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
    """What an attack run may need besides the batch and its parameters.

    ``generator`` is the only source of randomness; ``surrogate`` is the model a transfer attack
    crafts on; ``targeted`` says that ``y`` holds target classes (kinds with ``targetable``).
    """

    generator: torch.Generator | None = None
    surrogate: nn.Module | None = None
    targeted: bool = False


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
    targetable: bool = False

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter in declaration order, given or defaulted (values already parsed).

        Unknown names raise TypeError listing the known ones; a missing required one raises AdvpipeError.
        """
        known = [p.name for p in self.params]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise TypeError(f"unknown parameter(s) {unknown} for attack {self.name}; known: {', '.join(known)}")
        resolved: dict[str, Any] = {}
        for param in self.params:
            value = given[param.name] if param.name in given else param.resolve_default(resolved)
            if value is REQUIRED:
                raise AdvpipeError(f"attack {self.name} needs {param.name} ({param.help})")
            resolved[param.name] = value
        return resolved

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 generator: torch.Generator | None = None, surrogate: nn.Module | None = None,
                 targeted: bool = False, **params: Any) -> torch.Tensor:
        """Run the kind on ``(x, y)`` with ``params`` (defaults filled in); ``y`` is the target when ``targeted``."""
        if targeted and not self.targetable:
            raise AdvpipeError(f"attack {self.name} has no targeted form")
        return self.run(model, x, y, self.resolve(params), AttackContext(generator, surrogate, targeted))


ATTACKS: Registry[AttackKind] = Registry("attack kind")


def _register(kind: AttackKind) -> None:
    """Register ``kind`` under its own name."""
    ATTACKS.register(kind.name, kind)


# --------------------------------------------------------------------------- value parsers and labels


def _fraction(name: str) -> Callable[[str], Fraction]:
    return lambda text: parse_fraction(text, name=name)


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


_steps = _count("steps", MAX_STEPS)


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


def value_text(value: Any) -> str:
    """A parameter value as spec text (``%g`` for floats)."""
    return str(value) if not isinstance(value, float) else f"{value:g}"


def eps_text(value: Fraction) -> str:
    """Write an eps for people: ``8/255`` when it is a whole number of 255ths, else ``0.04``."""
    in_255 = Fraction(value) * 255
    return f"{in_255.numerator}/255" if in_255.denominator == 1 else f"{float(value):g}"


def _suffix(p: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    extra = [f"{k}={eps_text(v) if isinstance(v, Fraction) else value_text(v)}" for k, v in p.items()
             if k in defaults and v != defaults[k]]
    return f" ({', '.join(extra)})" if extra else ""


def _number(value: Any) -> float | torch.Tensor:
    """A parameter as the attack functions take it: floats, or a per-sample tensor as it is."""
    return value if isinstance(value, torch.Tensor) else float(value)


# --------------------------------------------------------------------------- runners


def _run_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Mapping[str, Any],
              ctx: AttackContext) -> torch.Tensor:
    return fgsm(model, x, y, eps=_number(p["eps"]), targeted=ctx.targeted, generator=ctx.generator)


def _pgd_runner(loss: str, least_likely: bool = False, early_stop: bool = False) -> AttackRunner:
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Mapping[str, Any],
            ctx: AttackContext) -> torch.Tensor:
        target = least_likely_targets(model, x) if least_likely else y
        return pgd(model, x, target, eps=_number(p["eps"]), steps=p["steps"], step_size=_number(p["step"]),
                   random_start=p["start"] == "random", targeted=least_likely or ctx.targeted, loss=loss,
                   generator=ctx.generator, early_stop=early_stop)

    return run


def _mifgsm_runner(transfer: bool) -> AttackRunner:
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Mapping[str, Any],
            ctx: AttackContext) -> torch.Tensor:
        if transfer and ctx.surrogate is None:
            raise AdvpipeError("mifgsm-transfer needs its surrogate model loaded (surrogate=PATH)")
        return mifgsm(ctx.surrogate if transfer else model, x, y, eps=_number(p["eps"]), steps=p["steps"],
                      step_size=_number(p["step"]), decay=p["decay"], targeted=ctx.targeted, generator=ctx.generator)

    return run


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


def _pgd_label(prefix: str, suffix: str = "") -> Callable[[Mapping[str, Any]], str]:
    def label(p: Mapping[str, Any]) -> str:
        defaults = {"step": p["eps"] / 4, "start": "random"}
        return f"{prefix}-{p['steps']} {eps_text(p['eps'])}{suffix}{_suffix(p, defaults)}"

    return label


def _mifgsm_label(suffix: str) -> Callable[[Mapping[str, Any]], str]:
    def label(p: Mapping[str, Any]) -> str:
        defaults = {"step": p["eps"] / p["steps"], "decay": 1.0}
        return f"MI-FGSM-{p['steps']}{suffix} {eps_text(p['eps'])}{_suffix(p, defaults)}"

    return label


# --------------------------------------------------------------------------- the kinds


def _eps(default: Fraction) -> Param:
    return Param("eps", _fraction("eps"), default, f"l_inf radius in [0,1] pixels (default {eps_text(default)})")


def _iterations(default: int) -> Param:
    return Param("steps", _steps, default, f"iterations (default {default})")


_STEP = Param("step", _fraction("step"), lambda p: p["eps"] / 4, "step size (default eps/4, 2/255 at eps 8/255)")
_START = Param("start", _start, "random", "random (default, Madry et al.) or clean (I-FGSM/BIM)")
_MI_STEP = Param("step", _fraction("step"), lambda p: p["eps"] / p["steps"], "step size (default eps/steps)")
_DECAY = Param("decay", _decay, 1.0, "momentum decay mu (default 1.0)")
_PGD_PARAMS = (_eps(Fraction(8, 255)), _iterations(10), _STEP, _START)

_register(AttackKind(
    "fgsm", "one signed-gradient step of size eps (Goodfellow et al. 2015; m2at.txt Eq. 5)",
    (_eps(Fraction(8, 255)),), _run_fgsm, lambda p: f"FGSM {eps_text(p['eps'])}", targetable=True))
_register(AttackKind(
    "pgd", "l_inf PGD on cross-entropy (Madry et al. 2018; m2at.txt Eq. 6)",
    _PGD_PARAMS, _pgd_runner("ce"), _pgd_label("PGD"), targetable=True))
_register(AttackKind(
    "pgd-early", "l_inf PGD on cross-entropy, each image kept at its first adversarial iterate "
    "(the sparse attack's default L_init)",
    _PGD_PARAMS, _pgd_runner("ce", early_stop=True), _pgd_label("PGD", " early-stop"), targetable=True))
_register(AttackKind(
    "cw", "l_inf PGD on the Carlini-Wagner margin loss, M2AT's CW-k (m2at.txt Sec. 5.1, Table 1)",
    (_eps(Fraction(8, 255)), _iterations(20), _STEP, _START), _pgd_runner("cw"), _pgd_label("CW"), targetable=True))
_register(AttackKind(
    "pgd-ll", "targeted l_inf PGD towards the least likely class, PGD_LL (m-tlat.txt Sec. 4.1)",
    (_eps(Fraction(1, 25)), _iterations(10), _STEP, _START), _pgd_runner("ce", least_likely=True),
    _pgd_label("PGD-LL")))
_register(AttackKind(
    "mifgsm", "white-box MI-FGSM (Dong et al. 2018, Alg. 1)",
    (_eps(Fraction(8, 255)), _iterations(10), _MI_STEP, _DECAY), _mifgsm_runner(False), _mifgsm_label(""),
    targetable=True))
_register(AttackKind(
    "mifgsm-transfer", "black-box MI-FGSM crafted on a surrogate checkpoint (Dong et al. 2018; m-tlat.txt Sec. 4.1)",
    (Param("surrogate", _path, REQUIRED, "checkpoint of the surrogate model (required)"), _eps(Fraction(1, 25)),
     _iterations(10), _MI_STEP, _DECAY),
    _mifgsm_runner(True), _mifgsm_label(" transfer"), needs_surrogate=True))

_APGD_STEPS = Param("steps", _steps, 100, "iterations (default 100, as in AutoAttack)")
_RESTARTS = Param("restarts", _count("restarts", 100), 1, "random restarts on the samples not broken yet (default 1)")
_TARGETS = Param("targets", _count("targets", 999), 9, "target classes, the most likely after the top one (default 9)")
_register(AttackKind(
    "apgd-ce", "Auto-PGD on cross-entropy, AutoAttack's first attack (Croce & Hein 2020)",
    (_eps(Fraction(8, 255)), _APGD_STEPS, _RESTARTS), _apgd_runner("ce"), _apgd_label("APGD-CE")))
_register(AttackKind(
    "apgd-dlr", "Auto-PGD on the Difference of Logits Ratio loss (Croce & Hein 2020, Eq. 4)",
    (_eps(Fraction(8, 255)), _APGD_STEPS, _RESTARTS), _apgd_runner("dlr"), _apgd_label("APGD-DLR")))
_register(AttackKind(
    "apgd-t", "targeted Auto-PGD on the targeted DLR loss towards each of the top classes (Croce & Hein 2020, Eq. 5)",
    (_eps(Fraction(8, 255)), _APGD_STEPS, _TARGETS, _RESTARTS), _apgd_runner("targeted"), _apgd_label("APGD-T")))
_register(AttackKind(
    "apgd-suite", "per image the worst case of APGD-CE and APGD-T (AutoAttack's first two attacks, not all four)",
    (_eps(Fraction(8, 255)), _APGD_STEPS, _TARGETS), _apgd_runner("suite"),
    _apgd_label("APGD-CE+T", " worst case")))
