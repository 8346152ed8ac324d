"""The batch structure that flows from the loader through augmentations into training methods."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """Images, labels and dataset indices of one batch, plus per-sample side data.

    ``images`` are (B,C,H,W) floats in [0,1] once the device transform has run. ``side`` holds
    per-sample tensors of shape (B,H,W) (for example ``"attack_mask"``) that went through the same
    crop and flip as their image, so they stay pixel-aligned with it.
    """

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    side: dict[str, torch.Tensor] = field(default_factory=dict)

    def replace(self, **changes: object) -> "Batch":
        """Return a copy with the given fields replaced (the side dict is copied, not shared)."""
        changes.setdefault("side", dict(self.side))
        return dataclasses.replace(self, **changes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])
