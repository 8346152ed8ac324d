"""The sparse attack's families (advmask.txt Sec. III-A, IV-B): alpha schedules, lambda rules, target pickers.

Each is a registry, so an unknown name lists the choices:

* :data:`ALPHA_SCHEDULES`: how ``alpha`` grows from ``alpha_min`` to ``alpha_max`` (Sec. IV-B says
  only "gradually increase"): ``geometric`` (the default), ``linear``, ``cosine``;
* :data:`LAMBDA_RULES`: ``paper`` (Eq. 5 as written) or ``adaptive`` (Eq. 5 times a per-image
  factor that reacts to success; docs/attack.md);
* :data:`TARGETS`: how targets are picked for ``targeted=True``: ``random`` or ``least-likely``.

Example::

    ALPHA_SCHEDULES.get("linear")(0, 200, 0.1, 100.0)   # 0.1
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from advpipe.attacks.dense import least_likely_targets, random_targets
from advpipe.registry import Registry

if TYPE_CHECKING:
    from advpipe.attacks.sparse_config import SparseAttackConfig


AlphaSchedule = Callable[[int, int, float, float], float]
ALPHA_SCHEDULES: Registry[AlphaSchedule] = Registry("alpha schedule")


def _frac(step: int, steps: int) -> float:
    """Fraction of the run done at ``step`` (0 at the first step, 1 at the last)."""
    return step / (steps - 1) if steps > 1 else 1.0


def geometric_alpha(step: int, steps: int, alpha_min: float, alpha_max: float) -> float:
    """alpha_min * (alpha_max/alpha_min)^(t/(T-1)): equal ratios per step (one decade per third at 0.1->100)."""
    return alpha_min * (alpha_max / alpha_min) ** _frac(step, steps)


def linear_alpha(step: int, steps: int, alpha_min: float, alpha_max: float) -> float:
    """alpha_min + (alpha_max - alpha_min) * t/(T-1): equal increments per step."""
    return alpha_min + (alpha_max - alpha_min) * _frac(step, steps)


def cosine_alpha(step: int, steps: int, alpha_min: float, alpha_max: float) -> float:
    """Geometric in log-alpha along a half cosine: slow at both ends, so the soft phase lasts longer."""
    w = 0.5 - 0.5 * math.cos(math.pi * _frac(step, steps))
    return alpha_min * (alpha_max / alpha_min) ** w


ALPHA_SCHEDULES.register("geometric", geometric_alpha)
ALPHA_SCHEDULES.register("linear", linear_alpha)
ALPHA_SCHEDULES.register("cosine", cosine_alpha)


class LambdaRule(Protocol):
    """Per-image multiplier of the paper's lambda (Eq. 5), updated after every step."""

    multiplier: torch.Tensor | None

    def update(self, success: torch.Tensor) -> None: ...


class _PaperLambda:
    """Eq. (5) as written: lambda = C + gamma * mean(m > 0.5), no reaction to success."""

    multiplier = None

    def __init__(self, config: "SparseAttackConfig", batch: int, device: torch.device) -> None:
        pass

    def update(self, success: torch.Tensor) -> None:
        pass


class _AdaptiveLambda:
    """Eq. (5) times a per-image factor: x lambda_up after a successful step, x lambda_down after a failure.

    The factor starts at 1 and is kept in [1e-4, 1e4].
    """

    def __init__(self, config: "SparseAttackConfig", batch: int, device: torch.device) -> None:
        self.multiplier = torch.ones(batch, device=device)
        self.up, self.down = float(config.lambda_up), float(config.lambda_down)

    def update(self, success: torch.Tensor) -> None:
        factor = torch.where(success, self.up, self.down)
        # The bounds only stop a run of failures (or successes) from under/overflowing.
        self.multiplier.mul_(factor).clamp_(1e-4, 1e4)


LAMBDA_RULES: Registry[Callable[..., LambdaRule]] = Registry("lambda rule")
LAMBDA_RULES.register("paper", _PaperLambda)
LAMBDA_RULES.register("adaptive", _AdaptiveLambda)


def _random_target(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                   generator: torch.Generator) -> torch.Tensor:
    """A uniformly random class other than ``y`` per image."""
    return random_targets(y, num_classes, generator=generator)


def _least_likely_target(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                         generator: torch.Generator) -> torch.Tensor:
    """The clean image's least likely class per image."""
    return least_likely_targets(model, x)


#: how targets are picked for ``targeted=True`` when the caller passes none (Table III is targeted)
TARGETS: Registry[Callable[..., torch.Tensor]] = Registry("target picker")
TARGETS.register("random", _random_target)
TARGETS.register("least-likely", _least_likely_target)
