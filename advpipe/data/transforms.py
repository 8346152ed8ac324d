"""The device-side geometric transforms, batched: pad-and-crop plus flip, and RandomResizedCrop plus flip.

Parameters are sampled apart from their application (Kornia style), so the exact same crop and
flip can be replayed on per-sample side data such as attack masks.
"""

from __future__ import annotations

import math
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
    """Crop and flip (B,C,H,W) or (B,H,W) tensors of any dtype with zero padding; returns a new tensor.

    A channels_last batch comes back channels_last (gathered in NCHW order, one layout copy of
    uint8 each way, cheaper than a gather over (B, H*W, C) or a layout copy of the float batch).
    """
    if x.dtype == torch.bool:  # padding is not defined for bool; round-trip through uint8
        return apply_crop_flip(x.to(torch.uint8), params).bool()
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(1)
    b, c, h, w = x.shape
    p = params.pad
    if c > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = apply_crop_flip(x.contiguous(), params)
        return out.contiguous(memory_format=torch.channels_last)
    padded = F.pad(x, (p, p, p, p)) if p else x
    index = _gather_index(params, h, w).unsqueeze(1).expand(b, c, h * w)
    out = padded.flatten(2).gather(2, index).view(b, c, h, w)
    return out.squeeze(1) if squeeze else out


@dataclass(frozen=True)
class ResizedCropParams:
    """Per-sample crop boxes (top, left, height, width in pixels) and flip flags, each of shape (B,)."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor


def sample_resized_crop(batch_size: int, height: int, width: int, *, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, generator: torch.Generator,
                        device: torch.device | str, attempts: int = 10) -> ResizedCropParams:
    """Draw RandomResizedCrop boxes for a batch of ``height`` x ``width`` images, as torchvision does, batched.

    Each sample draws an area share in ``scale`` and a log-uniform aspect ratio in ``ratio`` up to
    ``attempts`` times and keeps its first box that fits; one that never fits gets torchvision's
    fallback, the central box with the ratio clamped to ``ratio``. Flip flags have p=0.5 when ``flip``.
    """
    area = height * width
    shape = (batch_size, attempts)
    share = torch.empty(shape, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(shape, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w = (share * area * aspect).sqrt().round().long()
    h = (share * area / aspect).sqrt().round().long()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    u = torch.rand((2, *shape), generator=generator, device=device)
    top = (u[0] * (height - h + 1).clamp(min=1)).floor().long()
    left = (u[1] * (width - w + 1).clamp(min=1)).floor().long()
    first = torch.where(ok.any(1), ok.float().argmax(1), 0)[:, None]  # the first attempt that fits
    pick = lambda t: t.gather(1, first)[:, 0]  # noqa: E731
    found = ok.any(1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    fallback = lambda t, v: torch.where(found, pick(t), torch.full_like(found, v, dtype=torch.long))  # noqa: E731
    flips = torch.rand(batch_size, generator=generator, device=device) < 0.5 if flip else \
        torch.zeros(batch_size, dtype=torch.bool, device=device)
    return ResizedCropParams(fallback(top, (height - fb_h) // 2), fallback(left, (width - fb_w) // 2),
                             fallback(h, fb_h), fallback(w, fb_w), flips)


def apply_resized_crop(x: torch.Tensor, params: ResizedCropParams, *, mode: str = "bilinear") -> torch.Tensor:
    """Cut each sample's box out of (B,C,H,W) or (B,H,W) ``x``, resize it back to (H,W) and flip it.

    Images use ``mode="bilinear"`` (half-pixel centres; every box is at most the image, so this only
    enlarges); side data such as masks use ``"nearest"`` (nearest-exact: the bilinear sampling
    position, rounded), which keeps their values. The dtype and memory format are kept: uint8
    images are resized in uint8 (within one level of float bilinear), channels_last stays so.

    Each box has its own size, so this runs one resize per sample (B small ops, as the boxes are
    plain ints): on the CPU the antialiased uint8 kernel that torchvision's resize uses, on a
    channels_last batch, is about 6x faster than one float ``grid_sample`` over the batch; on a GPU
    the B launches cost a few milliseconds beside a 224x224 training step.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be bilinear or nearest, got {mode!r}")
    if x.dtype == torch.bool:
        return apply_resized_crop(x.to(torch.uint8), params, mode=mode).bool()
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(1)
    b, _, h, w = x.shape
    out = torch.empty_like(x)  # keeps the memory format
    boxes = torch.stack([params.top, params.left, params.height, params.width, params.flip.long()], 1).tolist()
    if len(boxes) != b:
        raise ValueError(f"{len(boxes)} crop boxes for a batch of {b}")
    for i, (top, left, box_h, box_w, flip) in enumerate(boxes):
        crop = x[i : i + 1, :, top : top + box_h, left : left + box_w]
        if mode == "nearest":
            resized = F.interpolate(crop, size=(h, w), mode="nearest-exact")
        elif crop.is_floating_point() or (crop.dtype == torch.uint8 and crop.device.type == "cpu"):
            resized = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        else:  # integer images off the CPU: resize in float, round back
            resized = F.interpolate(crop.float(), size=(h, w), mode="bilinear", align_corners=False,
                                    antialias=True).round_().clamp_(0, 255).to(x.dtype)
        out[i] = resized[0].flip(-1) if flip else resized[0]
    return out.squeeze(1) if squeeze else out
