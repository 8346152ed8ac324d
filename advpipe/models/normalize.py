"""The input-normalization wrapper: every model takes [0,1] images, so attacks work in pixel space."""

from __future__ import annotations

import torch
from torch import nn


class Normalized(nn.Module):
    """Wraps a classifier so it takes [0,1] images and normalizes them with the dataset mean/std."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Wrap ``model``; ``mean`` and ``std`` are per-channel values in [0,1] pixel units."""
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x`` (B,C,H,W in [0,1]) and return the wrapped model's logits."""
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def unwrap(model: nn.Module) -> nn.Module:
    """Return the classifier inside DDP and normalization wrappers."""
    while isinstance(model, (Normalized, nn.parallel.DistributedDataParallel)):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model.model
    return model


def normalization_of(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) of the :class:`Normalized` wrapper around ``model`` (inside DDP), or None without one."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if not isinstance(model, Normalized):
        return None
    return tuple(model.mean.flatten().tolist()), tuple(model.std.flatten().tolist())
