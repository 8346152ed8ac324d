"""The device-side geometric transform: per-sample pad-and-crop plus horizontal flip, batched.

Parameters are sampled apart from their application (Kornia style), so the exact same crop and
flip can be replayed on per-sample side data such as attack masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropFlipParams:
    """Per-sample crop offsets into the padded image and flip flags, each of shape (B,)."""

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor
    pad: int


def sample_crop_flip(batch_size: int, *, pad: int, flip: bool, generator: torch.Generator,
                     device: torch.device | str) -> CropFlipParams:
    """Draw crop offsets in [0, 2*pad] and flip flags (p=0.5) for every sample."""
    top = torch.randint(0, 2 * pad + 1, (batch_size,), generator=generator, device=device)
    left = torch.randint(0, 2 * pad + 1, (batch_size,), generator=generator, device=device)
    flips = torch.rand(batch_size, generator=generator, device=device) < 0.5 if flip else \
        torch.zeros(batch_size, dtype=torch.bool, device=device)
    return CropFlipParams(top, left, flips, pad)


def _gather_index(params: CropFlipParams, height: int, width: int) -> torch.Tensor:
    """Flat indices (B, H*W) into the zero-padded image for every output pixel."""
    device = params.top.device
    rows = params.top[:, None] + torch.arange(height, device=device)  # (B,H)
    cols = torch.arange(width, device=device).expand(params.left.shape[0], width)
    cols = torch.where(params.flip[:, None], width - 1 - cols, cols) + params.left[:, None]  # (B,W)
    padded_width = width + 2 * params.pad
    return (rows[:, :, None] * padded_width + cols[:, None, :]).flatten(1)


def apply_crop_flip(x: torch.Tensor, params: CropFlipParams) -> torch.Tensor:
    """Crop and flip (B,C,H,W) or (B,H,W) tensors of any dtype with zero padding; returns a new tensor."""
    if x.dtype == torch.bool:  # padding is not defined for bool; round-trip through uint8
        return apply_crop_flip(x.to(torch.uint8), params).bool()
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(1)
    b, c, h, w = x.shape
    p = params.pad
    padded = F.pad(x, (p, p, p, p)) if p else x
    index = _gather_index(params, h, w).unsqueeze(1).expand(b, c, h * w)
    out = padded.flatten(2).gather(2, index).view(b, c, h, w)
    return out.squeeze(1) if squeeze else out
