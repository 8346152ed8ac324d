"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition").

Two families, both taking normalized (B,3,H,W) input and returning (B,num_classes) logits:

* :class:`ResNet` -- the ImageNet widths 64-128-256-512 (ResNet-18/34 with :class:`BasicBlock`,
  ResNet-50 with :class:`Bottleneck`) adapted to CIFAR the usual way: a 3x3 stride-1 stem and no
  max-pool, so a 32x32 input reaches ``layer4`` at 4x4. Shortcuts that change shape are
  1x1 conv + BN (the paper's option B), as in the ImageNet models.
* :class:`HeResNet` -- the paper's own CIFAR networks of Sec. 4.2: depth 6n+2 (20/32/44/56/110),
  three stages of n basic blocks with 16/32/64 channels. Their shape-changing shortcuts are
  option A: parameter-free, stride-2 subsampling plus zero-padding of the new channels. The paper
  uses option A for all its CIFAR nets, and only option A reproduces its parameter counts
  (0.27M for ResNet-20, 1.7M for ResNet-110), which are what A-FAN and AdvMask report against.

The last residual stage is ``layer4`` (:class:`ResNet`) or ``layer3`` (:class:`HeResNet`);
A-FAN perturbs its output.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.models.archs import conv3x3, init_weights


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        """Build a parameter-free shortcut from ``in_channels`` to ``out_channels`` channels."""
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("option-A shortcut cannot reduce the channel count")
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x[:, :, ::s, ::s] with ``extra`` zero channels appended."""
        x = x[:, :, :: self.stride, :: self.stride]
        # pad spec runs from the last dim backwards: (W_l, W_r, H_l, H_r, C_l, C_r)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Option-B shortcut: 1x1 strided conv + BN."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the sum (post-activation)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, shortcut: str = "B") -> None:
        """Build a block; ``shortcut`` is "A" (zero-pad) or "B" (1x1 conv) when shapes change."""
        super().__init__()
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(in_channels, width, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to a (B,C,H,W) feature map."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BN; ReLU after the sum."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, shortcut: str = "B") -> None:
        """Build a bottleneck block producing ``4 * width`` channels."""
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to a (B,C,H,W) feature map."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int, kind: str) -> nn.Module:
    """Identity when shapes match, otherwise the option-A or option-B shortcut."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    if kind == "B":
        return _projection(in_channels, out_channels, stride)
    raise ValueError(f"unknown shortcut kind {kind!r}; choose 'A' or 'B'")


def _stage(
    block: type[BasicBlock] | type[Bottleneck],
    in_channels: int,
    width: int,
    blocks: int,
    stride: int,
    shortcut: str,
) -> tuple[nn.Sequential, int]:
    """Stack ``blocks`` blocks (the first one strided); return the stage and its output width."""
    layers = []
    for i in range(blocks):
        layers.append(block(in_channels, width, stride if i == 0 else 1, shortcut))
        in_channels = width * block.expansion
    return nn.Sequential(*layers), in_channels


class ResNet(nn.Module):
    """CIFAR ResNet-18/34/50: 3x3 stem, ``layer1``..``layer4`` (64-512 wide), avg-pool, ``fc``."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: Sequence[int],
        num_classes: int,
    ) -> None:
        """Build the network with ``blocks[i]`` blocks in stage i+1 (4 stages)."""
        super().__init__()
        if len(blocks) != 4:
            raise ValueError("ResNet needs four stage depths")
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        channels = 64
        self.layer1, channels = _stage(block, channels, 64, blocks[0], 1, "B")
        self.layer2, channels = _stage(block, channels, 128, blocks[1], 2, "B")
        self.layer3, channels = _stage(block, channels, 256, blocks[2], 2, "B")
        self.layer4, channels = _stage(block, channels, 512, blocks[3], 2, "B")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalized (B,3,H,W) images to (B,num_classes) logits."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class HeResNet(nn.Module):
    """He et al. CIFAR ResNet-(6n+2): 16-channel stem, ``layer1``..``layer3`` (16/32/64), ``fc``."""

    def __init__(self, depth: int, num_classes: int) -> None:
        """Build ResNet-``depth``; ``depth - 2`` must be a positive multiple of 6."""
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"He et al. CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1, channels = _stage(BasicBlock, 16, 16, n, 1, "A")
        self.layer2, channels = _stage(BasicBlock, channels, 32, n, 2, "A")
        self.layer3, channels = _stage(BasicBlock, channels, 64, n, 2, "A")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalized (B,3,H,W) images to (B,num_classes) logits."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
