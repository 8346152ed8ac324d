"""CIFAR-style VGG with BatchNorm (Simonyan & Zisserman 2015, configs A/B/D/E).

Input (B,3,H,W) normalized images with H,W >= 32; output (B,num_classes) raw logits. Five
2x2 max-pools take a 32x32 input to a 1x1x512 map, so the classifier is a single
Linear(512, num_classes) as in the usual CIFAR variants; an adaptive average pool to 1x1 makes
larger inputs (e.g. 64x64 Tiny-ImageNet) work unchanged and is the identity at 32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from advpipe.models.archs import conv3x3, init_weights

#: conv widths per block; "M" is a 2x2 max-pool
VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
}  # fmt: skip


class VGG(nn.Module):
    """VGG-``depth`` with BN: ``features`` (conv-BN-ReLU stacks, max-pools), then ``classifier``."""

    def __init__(self, depth: int, num_classes: int) -> None:
        """Build VGG-``depth`` (11, 13, 16 or 19) ending in Linear(512, ``num_classes``)."""
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG_CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                width = int(item)
                layers += [conv3x3(channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalized (B,3,H,W) images to (B,num_classes) logits."""
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
