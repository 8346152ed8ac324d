"""M-TLAT's additional corruptions (m-tlat.txt Sec. 4.1): occlusion, rotation, translation, colour shift.

The paper gives a severity range at 224 px; the registered levels split it into five and scale
pixel sizes from 32 px to the image side. The direction, position or channel of each corruption
is drawn per sample, on the input's device.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from advpipe.eval.corruptions_base import Params


def scaled(pixels_at_32: float, size: int) -> int:
    """A size given at 32 px scaled to an image side ``size`` (at least 1)."""
    return max(1, round(pixels_at_32 * size / 32))


def sample_occlusion(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """A square position per sample, uniform over the positions fully inside the image."""
    b, device = x.shape[0], x.device
    h, w = x.shape[-2:]
    side = min(scaled(p["side"], min(h, w)), h, w)
    top = torch.randint(0, h - side + 1, (b,), generator=g, device=device)
    left = torch.randint(0, w - side + 1, (b,), generator=g, device=device)
    return {"top": top, "left": left, "side": torch.full((b,), side, device=device)}


def apply_occlusion(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Fill each sample's square with the level's grey value."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    top, left, side = (r[k][:, None, None] for k in ("top", "left", "side"))
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return torch.where(inside[:, None], torch.full_like(x, p["fill"]), x)


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample x with per-sample affine ``theta`` (B,2,3) in normalised coordinates, zeros outside."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def sample_rotation(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """The level's angle with a random sign per sample."""
    b, device = x.shape[0], x.device
    sign = torch.randint(0, 2, (b,), generator=g, device=device) * 2 - 1
    return {"degrees": sign.to(torch.float32) * p["degrees"]}


def apply_rotation(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Bilinear rotation about the centre, zeros outside."""
    h, w = x.shape[-2:]
    a = torch.deg2rad(r["degrees"].to(torch.float32))
    cos, sin = torch.cos(a), torch.sin(a)
    # affine_grid maps output to input coordinates; normalised x and y have different pixel
    # scales on non-square images, hence the h/w factors.
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros_like(a)], 1),
                         torch.stack([sin * w / h, cos, torch.zeros_like(a)], 1)], 1)
    return _warp(x, theta, "bilinear")


def sample_translation(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """A random direction per sample, the shift rounded to whole pixels."""
    b, device = x.shape[0], x.device
    distance = scaled(p["pixels"], min(x.shape[-2:]))
    angle = torch.rand(b, generator=g, device=device) * (2 * math.pi)
    return {"dx": torch.round(distance * torch.cos(angle)).long(),
            "dy": torch.round(distance * torch.sin(angle)).long()}


def apply_translation(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Shift by whole pixels (exact), zeros outside."""
    h, w = x.shape[-2:]
    zeros = torch.zeros(x.shape[0], device=x.device)
    ones = torch.ones_like(zeros)
    # Whole-pixel shifts land exactly on source pixel centres, so nearest sampling is exact.
    tx = -2.0 * r["dx"].to(zeros.dtype) / w
    ty = -2.0 * r["dy"].to(zeros.dtype) / h
    theta = torch.stack([torch.stack([ones, zeros, tx], 1), torch.stack([zeros, ones, ty], 1)], 1)
    return _warp(x, theta, "nearest")


def sample_color_shift(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """One random channel per sample."""
    b, device = x.shape[0], x.device
    return {"channel": torch.randint(0, x.shape[1], (b,), generator=g, device=device)}


def apply_color_shift(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Add the level's constant to each sample's channel."""
    chosen = torch.arange(x.shape[1], device=x.device)[None, :] == r["channel"][:, None]
    return x + chosen[:, :, None, None].to(x.dtype) * p["shift"]
