"""Noise corruptions of CIFAR-10-C (Hendrycks & Dietterich 2019): gaussian, shot, impulse, speckle.

Each is a ``sample(x, level, generator) -> params`` / ``apply(x, level, params)`` pair on
(B,C,H,W) [0,1] batches (see :mod:`advpipe.eval.corruptions`); the draws are the parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from advpipe.eval.corruptions_base import Params


def sample_normal(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """One standard normal per element."""
    return {"noise": torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)}


def apply_gaussian_noise(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """``x + N(0, sigma^2)``."""
    return x + r["noise"] * p["sigma"]


def apply_speckle(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Multiplicative noise ``x + x * N(0, sigma^2)``."""
    return x + x * r["noise"] * p["sigma"]


def sample_shot(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """Poisson photon counts with rate ``x * photons``; the draw is the parameter (replayable)."""
    return {"counts": torch.poisson(x.float() * p["photons"], generator=g)}


def apply_shot(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """``Poisson(photons * x) / photons``."""
    return (r["counts"] / p["photons"]).to(x.dtype)


def sample_impulse(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """skimage's ``s&p`` mode: each *element* flips with probability amount, half to 1, half to 0."""
    flip = torch.rand(x.shape, generator=g, device=x.device) < p["amount"]
    salt = torch.rand(x.shape, generator=g, device=x.device) < 0.5
    return {"flip": flip, "salt": salt}


def apply_impulse(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Salt and pepper on the flipped elements."""
    return torch.where(r["flip"], r["salt"].to(x.dtype), x)
