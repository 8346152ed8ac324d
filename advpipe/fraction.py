"""Parse user fractions such as an eps of ``8/255`` without eval, within bounds."""

from __future__ import annotations

import re
from fractions import Fraction

from advpipe.errors import AdvpipeError

__all__ = ["MAX_FRACTION_TERM", "parse_fraction"]

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
