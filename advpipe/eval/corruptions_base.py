"""Shared pieces of the corruption kernels: parameter types, checks and batched linear filters.

Every helper works on (B,C,H,W) float batches on their own device. The 1-D filters are built as
(n_out, n_in) matrices that fold the border rule in (``nearest``, ``reflect`` = half-sample
symmetric, ``mirror`` = reflect-101, the names of :mod:`scipy.ndimage`), then applied to rows and
columns with one ``einsum``: at CIFAR sizes this is exact, small and fast on any device, and it
reproduces SciPy/skimage border handling even when a kernel is wider than the image.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from advpipe.rng import generator_for  # noqa: F401  (the corruption kernels import it from here)

Params = dict[str, torch.Tensor]
Sampler = Callable[[torch.Tensor, Mapping[str, Any], torch.Generator], Params]
Applier = Callable[[torch.Tensor, Mapping[str, Any], Params], torch.Tensor]

#: ITU-R 601 luma weights, the ones of OpenCV's RGB2GRAY
LUMA = (0.299, 0.587, 0.114)


def check_images(x: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` is a float (B,C,H,W) batch."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (B,C,H,W) batch, got {tuple(x.shape)} {x.dtype}")


def uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    """Uniform draws in [low, high) with ``x``'s device and dtype."""
    return torch.rand(shape, generator=g, device=x.device, dtype=x.dtype) * (high - low) + low


def normal(shape: tuple[int, ...], loc: float, scale: float, g: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    """Normal draws N(loc, scale^2) with ``x``'s device and dtype."""
    return torch.randn(shape, generator=g, device=x.device, dtype=x.dtype) * scale + loc


def grey(x: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) luminance: OpenCV's RGB2GRAY weights on 3 channels, the channel mean otherwise."""
    if x.shape[1] == 3:
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def value_saturation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV value V = max channel and saturation S = (V - min) / V (0 where V = 0), shape (B,1,H,W)."""
    v = x.amax(dim=1, keepdim=True)
    m = x.amin(dim=1, keepdim=True)
    s = torch.where(v > 0, (v - m) / v.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(v))
    return v, s


# --------------------------------------------------------------------------- linear filters


def border_index(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map (possibly out-of-range) indices into ``range(n)`` with SciPy's border rule ``mode``."""
    i = np.asarray(i, dtype=np.int64)
    if mode == "nearest":
        return np.clip(i, 0, n - 1)
    if n == 1:
        return np.zeros_like(i)
    if mode == "reflect":  # d c b a | a b c d | d c b a
        j = np.mod(i, 2 * n)
        return np.where(j >= n, 2 * n - 1 - j, j)
    if mode == "mirror":  # d c b | a b c d | c b a
        j = np.mod(i, 2 * n - 2)
        return np.where(j >= n, 2 * n - 2 - j, j)
    raise ValueError(f"unknown border mode {mode!r}")


def filter_matrix(weights: np.ndarray, n: int, mode: str) -> np.ndarray:
    """(n, n) float64 matrix of the 1-D correlation ``out[o] = sum_k w[k] in[o + k - r]`` with borders."""
    weights = np.asarray(weights, dtype=np.float64)
    r = len(weights) // 2
    out = np.zeros((n, n))
    rows = np.arange(n)
    for k, w in enumerate(weights):
        np.add.at(out, (rows, border_index(rows + k - r, n, mode)), w)
    return out


def gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """SciPy's 1-D Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * t**2 / float(sigma) ** 2)
    return w / w.sum()


def separable(x: torch.Tensor, rows: np.ndarray | torch.Tensor, cols: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``rows @ x @ cols.T`` on every (H,W) plane: rows is (H_out, H), cols (W_out, W)."""
    r = torch.as_tensor(rows).to(x.device, x.dtype)
    c = torch.as_tensor(cols).to(x.device, x.dtype)
    return torch.einsum("ih,bchw,jw->bcij", r, x, c)


def gaussian_filter(x: torch.Tensor, sigma: float, *, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter`` over H and W of every channel (skimage's ``gaussian``).

    ``sigma <= 0`` is the identity, as in SciPy.
    """
    if sigma <= 0:
        return x.clone()
    w = gaussian_weights(sigma, truncate)
    h, wd = x.shape[-2:]
    return separable(x, filter_matrix(w, h, mode), filter_matrix(w, wd, mode))


def correlate2d(x: torch.Tensor, kernel: torch.Tensor | np.ndarray, mode: str) -> torch.Tensor:
    """Correlate every channel with one odd-sized 2-D kernel, padding with torch's ``mode``.

    torch's ``reflect`` is reflect-101 (OpenCV's default border, SciPy's ``mirror``);
    ``replicate`` is SciPy's ``nearest``.
    """
    kernel = torch.as_tensor(kernel)
    kh, kw = kernel.shape
    c = x.shape[1]
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode=mode)
    weight = kernel.to(x.device, x.dtype).expand(c, 1, kh, kw)
    return F.conv2d(padded, weight, groups=c)


def zoom_matrix(n: int, factor: float) -> np.ndarray:
    """(n, n) matrix of CIFAR-10-C's ``clipped_zoom`` along one axis.

    The central ``ceil(n / factor)`` pixels are zoomed by ``scipy.ndimage.zoom(order=1)`` (output
    length ``round(crop * factor)``, input coordinate ``o * (crop - 1) / (out - 1)``) and the
    central ``n`` outputs are kept.
    """
    crop = int(math.ceil(n / factor))
    top = (n - crop) // 2
    size = int(round(crop * factor))
    trim = (size - n) // 2
    out = np.zeros((n, n))
    for i in range(n):
        o = i + trim
        t = o * (crop - 1) / (size - 1) if size > 1 else 0.0
        lo = min(int(math.floor(t)), crop - 1)
        f = t - lo
        out[i, top + lo] += 1.0 - f
        if f > 0:
            out[i, top + lo + 1] += f
    return out


def motion_kernel(radius: float, sigma: float) -> np.ndarray:
    """ImageMagick's one-sided motion-blur weights: ``exp(-i^2 / 2 sigma^2)``, i < 2 ceil(radius) + 1."""
    width = 2 * int(math.ceil(radius)) + 1
    i = np.arange(width, dtype=np.float64)
    w = np.exp(-(i**2) / (2.0 * sigma**2))
    return w / w.sum()


def motion_blur(x: torch.Tensor, radius: float, sigma: float, degrees: torch.Tensor) -> torch.Tensor:
    """ImageMagick's ``MotionBlurImage(radius, sigma, angle)`` with a per-sample angle (B,) in degrees.

    Output pixel (r, c) is ``sum_i w_i x[r + dy_i, c + dx_i]`` with ``dx_i = ceil(i cos a - 0.5)``,
    ``dy_i = ceil(i sin a - 0.5)`` (a one-sided trail along the angle) and ImageMagick's default
    edge virtual pixels (indices clamped).
    """
    b, c, h, w = x.shape
    weights = torch.as_tensor(motion_kernel(radius, sigma), dtype=x.dtype, device=x.device)
    a = torch.deg2rad(degrees.to(device=x.device, dtype=torch.float64))
    steps = torch.arange(len(weights), device=x.device, dtype=torch.float64)
    dx = torch.ceil(steps[None] * torch.cos(a)[:, None] - 0.5).long()  # (B, width)
    dy = torch.ceil(steps[None] * torch.sin(a)[:, None] - 0.5).long()
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    flat = x.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    for i in range(len(weights)):
        r = (rows[None, :] + dy[:, i : i + 1]).clamp(0, h - 1)  # (B, H)
        q = (cols[None, :] + dx[:, i : i + 1]).clamp(0, w - 1)  # (B, W)
        index = (r[:, :, None] * w + q[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        out += weights[i] * flat.gather(2, index)
    return out.reshape(b, c, h, w)


def sample_grid(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str) -> torch.Tensor:
    """Bilinear samples of ``x`` at per-sample pixel coordinates (B,H',W') with a SciPy border rule.

    ``mirror`` (reflect-101, OpenCV's BORDER_REFLECT_101) maps to grid_sample's reflection with
    ``align_corners=True``; ``reflect`` (half-sample symmetric) to reflection with
    ``align_corners=False``; the results equal ``scipy.ndimage.map_coordinates(order=1)``.
    """
    h, w = x.shape[-2:]
    if mode == "mirror":
        gx, gy, align = 2 * cols / max(w - 1, 1) - 1, 2 * rows / max(h - 1, 1) - 1, True
    elif mode == "reflect":
        gx, gy, align = (2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1, False
    else:
        raise ValueError(f"unknown border mode {mode!r}")
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=align)
