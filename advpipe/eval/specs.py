"""Attack specs for ``advpipe evaluate --attack``: ``KIND[:KEY=VALUE,...]`` parsed into AttackSpec.

Grammar (no ``eval`` anywhere; fractions go through :func:`advpipe.fraction.parse_fraction`)::

    SPEC   := "default" | KIND | KIND ":" PARAM ("," PARAM)*
    PARAM  := KEY "=" VALUE

Kinds live in the one attack registry, :data:`advpipe.attacks.registry.ATTACKS` (see
``docs/evaluation.md`` for the table), which also serves the sparse attack's ``L_init`` and the
training methods; this module only parses spec text. Each kind declares its parameters with
parsers and defaults; unknown kinds or keys, duplicates, missing required keys and malformed
values raise :class:`AdvpipeError` naming the accepted forms.

Example::

    spec = parse_attack_spec("pgd:eps=8/255,steps=20")
    spec.key    # 'pgd:eps=8/255,steps=20,step=2/255,start=random'
    spec.label  # 'PGD-20 8/255'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable

import torch
from torch import nn

from advpipe.attacks.registry import (  # noqa: F401  (AttackKind, Param, MAX_STEPS: re-exported for callers)
    ATTACKS,
    MAX_STEPS,
    REQUIRED,
    AttackContext,
    AttackKind,
    Param,
    eps_text,
    value_text,
)
from advpipe.errors import AdvpipeError

#: the M2AT evaluation suite (m2at.txt Sec. 5.1, Table 1): FGSM, PGD-10, PGD-20 and CW-20 at 8/255
DEFAULT_SUITE = ("fgsm:eps=8/255", "pgd:eps=8/255,steps=10", "pgd:eps=8/255,steps=20", "cw:eps=8/255,steps=20")
DEFAULT_NAME = "default"


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
        return f"{self.kind}:" + ",".join(f"{k}={value_text(v)}" for k, v in self.params)

    @property
    def label(self) -> str:
        """Short human label for tables, e.g. ``PGD-20 8/255``."""
        return ATTACKS.get(self.kind).label(self.values)

    def to_json(self) -> dict[str, Any]:
        """JSON-able parameters (fractions as ``8/255`` text plus their float value)."""
        out: dict[str, Any] = {}
        for k, v in self.params:
            if isinstance(v, Fraction):
                out[k] = value_text(v)
                out[f"{k}_float"] = float(v)
            else:
                out[k] = v
        return out

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """Attack ``model`` on ``(x, y)`` and return the adversarial images."""
        return ATTACKS.get(self.kind).run(model, x, y, self.values, ctx)


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
    parsed: dict[str, Any] = {}
    for param in kind.params:
        if param.name in given:
            try:
                parsed[param.name] = param.parse(given[param.name])
            except AdvpipeError as exc:
                raise AdvpipeError(f"attack spec {text!r}: {exc}") from exc
        elif param.default is REQUIRED:
            raise AdvpipeError(f"attack spec {text!r}: {kind_name} needs {param.name}= ({param.help})")
    return AttackSpec(kind_name, tuple(kind.resolve(parsed).items()))


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
