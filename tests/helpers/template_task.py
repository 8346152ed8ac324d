"""A tiny CNN trained in a second on noisy smooth class templates: the model the attack tests attack."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def tiny_cnn(classes: int, batchnorm: bool = False) -> nn.Sequential:
    """Two conv layers, global pooling and a linear head (optionally with BatchNorm)."""
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )  # fmt: skip


def train_template_cnn(classes: int, size: int, seed: int = 0
                       ) -> tuple[nn.Module, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    """Train a tiny CNN on ``classes`` noisy templates of ``size`` px; return it (eval mode) and a sampler of more data.

    A per-sample amplitude spreads the margins, so accuracy under attack degrades gradually with eps.
    The sampler continues the same generator, so callers get the same held-out images every time.
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes, 3, 4, 4, generator=gen)
    templates = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    templates = templates / templates.abs().amax(dim=(1, 2, 3), keepdim=True)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=gen)
        amp = 0.1 + 0.25 * torch.rand(n, 1, 1, 1, generator=gen)
        x = 0.5 + amp * templates[y] + 0.15 * torch.randn(n, 3, size, size, generator=gen)
        return x.clamp(0, 1), y

    x_train, y_train = sample(4096)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tiny_cnn(classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        idx = torch.randint(0, len(y_train), (64,), generator=gen)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, sample
