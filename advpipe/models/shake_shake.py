"""Shake-Shake regularized ResNet (Gastaldi 2017, "Shake-Shake regularization"), e.g. 26 2x32d.

Each residual block has two branches (ReLU-conv3x3-BN-ReLU-conv3x3-BN) mixed as
``x + alpha * b1(x) + (1 - alpha) * b2(x)`` (Gastaldi Eq. 2). In training ``alpha`` is drawn
U(0,1) per image on the forward pass and an independent ``beta`` ~ U(0,1) replaces it on the
backward pass ("Shake-Shake-Image", the paper's best CIFAR-10 setting); in eval mode both are 0.5.

Depth 26 = 2 + 3 stages x 4 blocks x 2 convs; "2x32d" = two branches, 32 channels in the first
stage (doubling per stage, after a 16-channel stem). Shape-changing shortcuts are the paper's:
two 1x1 convs on stride-subsampled inputs, the second shifted by one pixel, concatenated, BN.
Input normalized (B,3,H,W); output (B,num_classes) logits. A-FAN perturbs ``layer3``'s output.

Randomness: unlike the rest of advpipe, the mixing coefficients are drawn inside ``forward`` from
torch's default RNG unless a generator is attached with :meth:`ShakeShakeNet.set_generator`
(which must live on the input's device). This is acceptable for a model's stochastic
regularizer, but it means a training step consumes global RNG state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.models.archs import conv3x3, init_weights


class _Shake(torch.autograd.Function):
    """Mix two tensors with ``alpha`` forward and route gradients with ``beta`` backward."""

    @staticmethod
    def forward(ctx: Any, x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor,
                beta: torch.Tensor) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(beta)
        return alpha * x1 + (1 - alpha) * x2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (beta,) = ctx.saved_tensors
        return beta * grad, (1 - beta) * grad, None, None


def shake(x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor,
          beta: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Return ``alpha*x1 + (1-alpha)*x2`` whose gradients are ``beta*g`` and ``(1-beta)*g``.

    ``alpha`` and ``beta`` broadcast against the (B,C,H,W) inputs, e.g. shape (B,1,1,1).
    """
    return _Shake.apply(x1, x2, alpha, beta)


class _Branch(nn.Sequential):
    """One residual branch: ReLU-conv3x3(stride)-BN-ReLU-conv3x3-BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            nn.ReLU(inplace=False),  # the block input is also the shortcut input: no in-place
            conv3x3(in_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )


class ShiftedProjection(nn.Module):
    """Gastaldi's shortcut: ReLU, two subsampled 1x1 convs (one shifted a pixel), concat, BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        """Project ``in_channels`` to ``out_channels`` (even) with spatial stride ``stride``."""
        super().__init__()
        if out_channels % 2:
            raise ValueError("shake-shake shortcut needs an even output width")
        self.stride = stride
        self.conv_a = nn.Conv2d(in_channels, out_channels // 2, 1, bias=False)
        self.conv_b = nn.Conv2d(in_channels, out_channels // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project a (B,C,H,W) feature map."""
        x = F.relu(x)
        s = self.stride
        # the shift makes the two halves see the complementary pixels the subsampling drops
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        out = torch.cat([self.conv_a(x[:, :, ::s, ::s]), self.conv_b(shifted[:, :, ::s, ::s])], 1)
        return self.bn(out)


class ShakeBlock(nn.Module):
    """Two-branch residual block mixed by :func:`shake` (Gastaldi Eq. 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        """Build a block from ``in_channels`` to ``out_channels`` with stride ``stride``."""
        super().__init__()
        self.branch1 = _Branch(in_channels, out_channels, stride)
        self.branch2 = _Branch(in_channels, out_channels, stride)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ShiftedProjection(in_channels, out_channels, stride)
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block; random per-image coefficients in training, 0.5 in eval."""
        b1, b2 = self.branch1(x), self.branch2(x)
        if self.training:
            shape = (x.shape[0], 1, 1, 1)
            opts = dict(device=x.device, dtype=x.dtype, generator=self.generator)
            alpha, beta = torch.rand(shape, **opts), torch.rand(shape, **opts)
            mixed = shake(b1, b2, alpha, beta)
        else:
            mixed = 0.5 * (b1 + b2)
        return self.shortcut(x) + mixed


class ShakeShakeNet(nn.Module):
    """Shake-Shake-``depth`` 2x``width``d: ``conv1``/``bn1`` stem, stages ``layer1``..``layer3``."""

    def __init__(self, depth: int, width: int, num_classes: int) -> None:
        """Build the net; ``depth - 2`` must be a positive multiple of 6 (blocks of 2 convs)."""
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"shake-shake depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        widths = (width, 2 * width, 4 * width)
        self.layer1 = self._stage(16, widths[0], n, 1)
        self.layer2 = self._stage(widths[0], widths[1], n, 2)
        self.layer3 = self._stage(widths[1], widths[2], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, n: int, stride: int) -> nn.Sequential:
        """Stack ``n`` shake blocks, the first one strided."""
        return nn.Sequential(
            *(ShakeBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
              for i in range(n))
        )  # fmt: skip

    def set_generator(self, generator: torch.Generator | None) -> None:
        """Draw the mixing coefficients from ``generator`` (None: torch's default RNG)."""
        for module in self.modules():
            if isinstance(module, ShakeBlock):
                module.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalized (B,3,H,W) images to (B,num_classes) logits."""
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(F.relu(x)), 1))
