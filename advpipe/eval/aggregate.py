"""Seed aggregation: mean ± std, a 95% interval, and each row's difference to a baseline row.

Runs that differ only in their seed form one row. The interval of a row is the t interval of its
mean (n - 1 degrees of freedom). A row's difference to the baseline is tested

- *paired by seed* when both rows hold the same seeds (n >= 2): a one-sample t test on the
  per-seed differences, which removes the seed-to-seed variation the two rows share (the same
  initialisation, data order and validation draw);
- with *Welch's* t test otherwise (unequal variances, Welch-Satterthwaite degrees of freedom).

Both are two-sided; ``test`` says which was used. One run gives n = 1 and no interval.

Beside each difference stands the *minimal detectable difference* (``mdd``): the true difference
that the same test, with the same standard error and degrees of freedom, would find at the 5% level
two-sided with 80% power, ``(t(0.975, df) + t(0.80, df)) * se``. A difference inside the noise says
little when the mdd is large: the study could not have seen an effect smaller than it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

CONFIDENCE = 0.95
POWER = 0.80


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation, count and 95% t interval of one row's values."""

    mean: float
    std: float | None
    n: int
    ci_low: float | None
    ci_high: float | None

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """A row's mean minus the baseline's, its 95% interval, the two-sided p-value and the test used."""

    diff: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    test: str  # "paired" | "welch" | "none"
    n_pairs: int = 0
    mdd: float | None = None  # minimal detectable difference (80% power, 5% two-sided)

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        return asdict(self)


def _t_quantile(df: float, level: float = 0.5 + CONFIDENCE / 2) -> float:
    from scipy.stats import t

    return float(t.ppf(level, df))


def _t_p_value(stat: float, df: float) -> float:
    from scipy.stats import t

    return float(2 * t.sf(abs(stat), df))


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(values: Sequence[float]) -> Summary:
    """Mean ± std and the 95% t interval of the mean (no interval for one value)."""
    if not values:
        raise ValueError("summarize needs at least one value")
    mean, std = _mean_std(list(values))
    n = len(values)
    if std is None:
        return Summary(mean, None, n, None, None)
    half = _t_quantile(n - 1) * std / math.sqrt(n)
    return Summary(mean, std, n, mean - half, mean + half)


def _from_t(diff: float, se: float, df: float, test: str, n_pairs: int = 0) -> Comparison:
    if se == 0:  # no spread at all: a t statistic is undefined, so there is no p-value
        return Comparison(diff, diff, diff, None, test, n_pairs, 0.0)
    half = _t_quantile(df) * se
    mdd = (_t_quantile(df) + _t_quantile(df, POWER)) * se
    return Comparison(diff, diff - half, diff + half, _t_p_value(diff / se, df), test, n_pairs, mdd)


def compare(row: Mapping[int, float], baseline: Mapping[int, float]) -> Comparison:
    """``row`` minus ``baseline`` (each seed -> value): paired by seed when the seeds match, else Welch."""
    a, b = list(row.values()), list(baseline.values())
    diff = sum(a) / len(a) - sum(b) / len(b)
    if set(row) == set(baseline) and len(row) >= 2:
        d = [row[s] - baseline[s] for s in sorted(row)]
        mean, std = _mean_std(d)
        return _from_t(mean, std / math.sqrt(len(d)), len(d) - 1, "paired", len(d))  # type: ignore[operator]
    if len(a) < 2 or len(b) < 2:
        return Comparison(diff, None, None, None, "none")
    (_, sa), (_, sb) = _mean_std(a), _mean_std(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)  # type: ignore[operator]
    se = math.sqrt(va + vb)
    if se == 0:
        return _from_t(diff, 0.0, 1.0, "welch")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return _from_t(diff, se, df, "welch")


def within_noise(comparison: Comparison) -> bool | None:
    """True when the 95% interval of the difference contains 0 (None when there is no interval)."""
    if comparison.ci_low is None or comparison.ci_high is None:
        return None
    return comparison.ci_low <= 0 <= comparison.ci_high
