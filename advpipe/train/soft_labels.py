"""Helpers shared by the online methods: soft labels and their cross-entropy, generator-driven Beta
sampling, per-sample mixing, and readers for method options.

Beta sampling: ``torch.distributions.Beta`` (and ``torch._standard_gamma`` under it) draws from
the *global* RNG and takes no generator, so a run would not be reproducible from its seed without
reseeding global state. :func:`sample_beta` instead builds Beta(a, b) = Ga / (Ga + Gb) from two
Gamma draws made with the Marsaglia-Tsang method (Marsaglia & Tsang, 2000, "A simple method for
generating gamma variables"), whose normals and uniforms come from the caller's generator. The
rejection loop is vectorized: each round redraws only the rejected entries, so the number of
rounds is itself a deterministic function of the generator's state. Shapes below 1 use the
standard boost Gamma(a) = Gamma(a + 1) * U^(1/a); the ratio is formed in log space (a sigmoid of
the log-Gamma difference), which stays finite even for Beta(0.4, 0.4) draws very close to 0 or 1.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.errors import AdvpipeError
from advpipe.fraction import parse_fraction

_MAX_ROUNDS = 200  # acceptance is >= 95% per round; reaching this would mean a bug, not bad luck


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) integer labels as (B, num_classes) one-hot rows of ``dtype``."""
    return F.one_hot(labels.long(), num_classes).to(dtype)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k targets_k * log_softmax(logits)_k`` (computed in float32).

    ``targets`` are (B,K) probability rows. An empty batch gives 0 so half-batch methods stay finite.
    """
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    return -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def _log_gamma_at_least_one(n: int, shape: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """log of n Gamma(shape, 1) draws for shape >= 1 (Marsaglia-Tsang rejection)."""
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=device)
    pending = torch.arange(n, device=device)
    for _ in range(_MAX_ROUNDS):
        if pending.numel() == 0:
            return out
        m = pending.numel()
        x = torch.randn(m, generator=generator, device=device, dtype=torch.float64)
        u = torch.rand(m, generator=generator, device=device, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        safe_v = v.clamp_min(1e-300)
        accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * safe_v + d * torch.log(safe_v))
        out[pending[accept]] = math.log(d) + torch.log(safe_v[accept])
        pending = pending[~accept]
    raise RuntimeError("gamma sampling did not converge")  # pragma: no cover


def sample_log_gamma(n: int, shape: float, *, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """log of ``n`` Gamma(shape, 1) draws (float64), using only ``generator``."""
    if not shape > 0:
        raise ValueError(f"gamma shape must be > 0, got {shape}")
    device = torch.device(device)
    if shape >= 1:
        return _log_gamma_at_least_one(n, shape, generator, device)
    boosted = _log_gamma_at_least_one(n, shape + 1.0, generator, device)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64).clamp_min(1e-300)
    return boosted + torch.log(u) / shape


def sample_beta(n: int, a: float, b: float, *, generator: torch.Generator,
                device: torch.device | str) -> torch.Tensor:
    """``n`` float32 draws from Beta(a, b) on ``device``, reproducible from ``generator`` alone."""
    if not (a > 0 and b > 0):
        raise ValueError(f"beta parameters must be > 0, got ({a}, {b})")
    log_a = sample_log_gamma(n, a, generator=generator, device=device)
    log_b = sample_log_gamma(n, b, generator=generator, device=device)
    return torch.sigmoid(log_a - log_b).float()


def mix(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Per-sample convex combination ``lam * a + (1 - lam) * b`` with (B,) weights ``lam``."""
    w = lam.to(a.dtype).view(-1, *([1] * (a.dim() - 1)))
    return w * a + (1 - w) * b


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int >= 1 or raise AdvpipeError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdvpipeError(f"method option {name} must be a positive integer, got {value!r}")
    return value


def fraction_option(value: Any, name: str, *, high: float = 1.0) -> float:
    """Read an option such as ``4/255`` or ``0.0157`` as a float in (0, high]."""
    if isinstance(value, bool):
        raise AdvpipeError(f"method option {name} must be a number like 4/255, got {value!r}")
    return float(parse_fraction(str(value), name=f"method option {name}", high=high))


def flag_option(value: Any, name: str) -> bool:
    """Return ``value`` if it is a bool, else raise AdvpipeError naming the option."""
    if not isinstance(value, bool):
        raise AdvpipeError(f"method option {name} must be true or false, got {value!r}")
    return value


F_ = TypeVar("F_", bound=Callable[..., Any])


def checked_options(factory: F_) -> F_:
    """Make a method factory's unknown option names raise a TypeError that lists the known ones."""
    known = [name for name, p in inspect.signature(factory).parameters.items() if p.kind is p.KEYWORD_ONLY]

    @functools.wraps(factory)
    def wrapper(ctx: Any, **options: Any) -> Any:
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; known: {', '.join(known)}")
        return factory(ctx, **options)

    return wrapper  # type: ignore[return-value]


def without_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (``model`` itself otherwise).

    Attack passes go through it: they need no gradient synchronization, and skipping DDP's forward
    saves a buffer broadcast per attack step.
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
