"""Wide ResNet (Zagoruyko & Komodakis 2016, "Wide Residual Networks"), e.g. WRN-28-10.

Depth 6n+4 with three stages ``block1``..``block3`` of n pre-activation blocks
(BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, the paper's B(3,3) with dropout between the convs,
Sec. 2.3), widths 16k/32k/64k after a 16-channel 3x3 stem, then BN-ReLU, global average pool
and a linear head. Input: normalized (B,3,H,W); output: (B,num_classes) logits. A-FAN perturbs
the output of ``block3`` (before the final BN-ReLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.models.archs import conv3x3, init_weights


class WideBlock(nn.Module):
    """Pre-activation basic block; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        """Build a block from ``in_channels`` to ``out_channels`` with dropout rate ``dropout``."""
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to a (B,C,H,W) feature map."""
        act = F.relu(self.bn1(x))
        # a projecting shortcut reads the pre-activated input (as in the authors' code), so the
        # un-normalized stem/stage output never bypasses a BN on its way to the next stage
        skip = x if self.shortcut is None else self.shortcut(act)
        out = self.conv1(act)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: stem ``conv1``, stages ``block1``..``block3``, ``bn``, ``fc``."""

    def __init__(self, depth: int, widen: int, num_classes: int, dropout: float = 0.0) -> None:
        """Build WRN-``depth``-``widen``; ``depth - 4`` must be a positive multiple of 6."""
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = conv3x3(3, 16)
        self.block1 = self._stage(16, widths[0], n, 1, dropout)
        self.block2 = self._stage(widths[0], widths[1], n, 2, dropout)
        self.block3 = self._stage(widths[1], widths[2], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        """Stack ``n`` wide blocks, the first one strided."""
        return nn.Sequential(
            *(WideBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dropout)
              for i in range(n))
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalized (B,3,H,W) images to (B,num_classes) logits."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))
