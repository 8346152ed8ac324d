"""Blur corruptions of CIFAR-10-C: defocus, gaussian, glass, motion and zoom blur.

Batched on the input's device; the formulas are those of ``make_cifar_c.py`` (Hendrycks &
Dietterich 2019) with its 32x32 constants (``docs/evaluation.md`` lists them and the remaining
differences: motion blur re-implements ImageMagick's kernel, and 8-bit intermediate roundings are
skipped).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from advpipe.eval.corruptions_base import (
    Params,
    correlate2d,
    gaussian_filter,
    motion_blur,
    uniform,
    zoom_matrix,
)


# --------------------------------------------------------------------------- defocus and gaussian


def _gaussian_1d(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-(t**2) / (2 * sigma**2))
    return w / w.sum()


def defocus_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """CIFAR-10-C's defocus kernel: a normalised disk on a 17x17 grid, smoothed by a 3x3 Gaussian."""
    t = torch.arange(-8, 9, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).double()
    disk /= disk.sum()
    g = _gaussian_1d(alias_blur, 1)
    smooth = F.conv2d(disk[None, None], (g[:, None] * g[None, :])[None, None], padding=1)[0, 0]
    # Trim the all-zero border so the image convolution stays small (at most 5x5 here).
    nz = smooth.abs() > 0
    rows, cols = nz.any(1).nonzero(), nz.any(0).nonzero()
    half = int(max(8 - rows.min(), rows.max() - 8, 8 - cols.min(), cols.max() - 8))
    return smooth[8 - half : 9 + half, 8 - half : 9 + half]


def apply_defocus(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """The disk kernel per channel; cv2.filter2D's default border is reflect-101 (torch's reflect)."""
    return correlate2d(x, defocus_kernel(p["radius"], p["alias_blur"]), "reflect")


def apply_gaussian_blur(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """skimage.filters.gaussian: truncate 4 sigma, mode ``nearest``."""
    return gaussian_filter(x, p["sigma"], mode="nearest")


# --------------------------------------------------------------------------- glass blur


def _glass_positions(h: int, w: int, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns the reference visits: ``range(h - delta, delta, -1)`` (and the same for w)."""
    return np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1)


def sample_glass(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """Per visited pixel and iteration, ``(dx, dy) = randint(-delta, delta)`` as in the reference."""
    rows, cols = _glass_positions(x.shape[-2], x.shape[-1], p["delta"])
    shape = (x.shape[0], p["iterations"], len(rows), len(cols), 2)
    return {"shifts": torch.randint(-p["delta"], p["delta"], shape, generator=g, device=x.device)}


def apply_glass(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Gaussian blur, local pixel shuffling, Gaussian blur again (CIFAR-10-C ``glass_blur``).

    The reference "swaps" ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on NumPy views, which copies
    pixel (h + dy, w + dx) into (h, w) and leaves the source as it was. It visits (h, w) in
    descending raster order and with ``delta = 1`` every source (dy, dx in {-1, 0}) comes at or
    after the current pixel in that order, so it has not been written yet in this pass: one pass
    is exactly one gather, done here for the whole batch at once.
    """
    if p["delta"] != 1:
        raise ValueError("glass blur is implemented for CIFAR-10-C's max_delta = 1")
    b, c, h, w = x.shape
    out = gaussian_filter(x, p["sigma"], mode="nearest")
    rows, cols = _glass_positions(h, w, p["delta"])
    if len(rows) and len(cols):
        shifts = r["shifts"].to(x.device)
        hh = torch.as_tensor(rows, device=x.device)[None, :, None]
        ww = torch.as_tensor(cols, device=x.device)[None, None, :]
        dest = (hh * w + ww).reshape(-1)
        for it in range(p["iterations"]):
            src = ((hh + shifts[:, it, :, :, 1]) * w + (ww + shifts[:, it, :, :, 0])).reshape(b, -1)
            index = torch.arange(h * w, device=x.device).repeat(b, 1)
            index[:, dest] = src
            out = out.reshape(b, c, h * w).gather(2, index[:, None, :].expand(b, c, h * w)).reshape(b, c, h, w)
    return gaussian_filter(out, p["sigma"], mode="nearest")


# --------------------------------------------------------------------------- motion and zoom blur


def sample_motion(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """The blur angle per sample, uniform in [-45, 45) degrees."""
    return {"degrees": uniform((x.shape[0],), -45.0, 45.0, g, x).double()}


def apply_motion(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """ImageMagick's motion blur (radius, sigma) along each sample's angle."""
    return motion_blur(x, p["radius"], p["sigma"], r["degrees"])


def zoom_factors(stop: float, step: float = 0.01) -> np.ndarray:
    """The reference's zooms ``np.arange(1, stop, step)`` (float arange: 1.06 gives 7 zooms, 1.00-1.06)."""
    return np.arange(1, stop, step)


@lru_cache(maxsize=64)
def _zoom_stack(n: int, stop: float, step: float) -> np.ndarray:
    return np.stack([zoom_matrix(n, float(z)) for z in zoom_factors(stop, step)])


def apply_zoom(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Mean of the image and its central zooms by each factor (CIFAR-10-C ``zoom_blur``)."""
    h, w = x.shape[-2:]
    rows = torch.as_tensor(_zoom_stack(h, p["zoom_stop"], p["zoom_step"])).to(x.device, x.dtype)
    cols = torch.as_tensor(_zoom_stack(w, p["zoom_stop"], p["zoom_step"])).to(x.device, x.dtype)
    zoomed = torch.einsum("zih,bchw,zjw->bcij", rows, x, cols)
    return (x + zoomed) / (rows.shape[0] + 1)
