"""Random textures for the weather corruptions: CIFAR-10-C's plasma fractal and procedural frost.

* :func:`plasma_fractal` is the diamond-square height map of ``make_cifar_c.py`` (used by fog),
  batched on the device. Its random draws come in as arguments (:func:`plasma_uniforms`), so a map
  can be replayed and checked against a NumPy re-implementation.
* :func:`frost_textures` replaces CIFAR-10-C's six frost *photographs* (which we cannot ship and
  never download) by five procedural ice textures: thin bright ridges of fractal noise plus
  needle-like crystals on a dark blue-grey ground. They are made with NumPy's PCG64 generator
  from fixed seeds, so they are the same on every machine, and cached after the first use.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from advpipe.eval.corruptions_base import filter_matrix, gaussian_weights

#: number of frost textures; the reference draws ``randint(5)``, i.e. one of its first five images
FROST_TEXTURES = 5
FROST_SEED = 20190101


def plasma_uniforms(batch: int, mapsize: int, g: torch.Generator, like: torch.Tensor) -> list[torch.Tensor]:
    """The U(-1, 1) draws of one batch of plasma maps: three (B, n, n) arrays per level, n = 1, 2, 4, ..."""
    draws = []
    step = mapsize
    while step >= 2:
        n = mapsize // step
        for _ in range(3):
            draws.append(torch.rand((batch, n, n), generator=g, device=like.device, dtype=like.dtype) * 2 - 1)
        step //= 2
    return draws


def plasma_fractal(uniforms: list[torch.Tensor], mapsize: int, decay: float) -> torch.Tensor:
    """Diamond-square height maps (B, mapsize, mapsize) in [0, 1] from :func:`plasma_uniforms` draws.

    CIFAR-10-C's ``plasma_fractal``: corners start at 0 with ``wibble = 100``; each level sets the
    square centres to the mean of their corners plus ``wibble^2 * U(-1, 1)``, then the diamond
    points likewise (wrapping around, as ``np.roll`` does), divides ``wibble`` by ``decay`` and
    halves the step. The map is finally scaled to [0, 1].
    """
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two >= 2, got {mapsize}")
    b = uniforms[0].shape[0]
    m = torch.zeros((b, mapsize, mapsize), dtype=uniforms[0].dtype, device=uniforms[0].device)
    step, wibble, k = mapsize, 100.0, 0
    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        square = corners + torch.roll(corners, -1, dims=1)
        square = square + torch.roll(square, -1, dims=2)
        m[:, half::step, half::step] = square / 4 + wibble * wibble * uniforms[k]
        centres = m[:, half::step, half::step]
        corners = m[:, 0::step, 0::step]
        left = centres + torch.roll(centres, 1, dims=1) + corners + torch.roll(corners, -1, dims=2)
        m[:, 0::step, half::step] = left / 4 + wibble * wibble * uniforms[k + 1]
        top = centres + torch.roll(centres, 1, dims=2) + corners + torch.roll(corners, -1, dims=1)
        m[:, half::step, 0::step] = top / 4 + wibble * wibble * uniforms[k + 2]
        step, wibble, k = half, wibble / decay, k + 3
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def plasma_size(h: int, w: int) -> int:
    """The map side: CIFAR-10-C's 32, or the next power of two for larger images (cropped after)."""
    return max(32, 1 << (max(h, w) - 1).bit_length())


# --------------------------------------------------------------------------- frost


def _np_plasma(rng: np.random.Generator, size: int, decay: float) -> np.ndarray:
    uniforms = [torch.from_numpy(rng.uniform(-1, 1, (1, size // s, size // s))) for s in _steps(size) for _ in range(3)]
    return plasma_fractal(uniforms, size, decay)[0].numpy()


def _steps(size: int) -> list[int]:
    out, step = [], size
    while step >= 2:
        out.append(step)
        step //= 2
    return out


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    m = filter_matrix(gaussian_weights(sigma), a.shape[0], "reflect")
    return m @ a @ m.T


def _needles(rng: np.random.Generator, size: int) -> np.ndarray:
    """Crystal needles: straight strokes radiating from random seeds, summed and softened."""
    canvas = np.zeros((size, size))
    for _ in range(size // 2):
        cy, cx = rng.uniform(0, size, 2)
        base = rng.uniform(0, np.pi)
        for arm in range(int(rng.integers(4, 9))):
            angle = base + arm * np.pi / 3 + rng.normal(0, 0.15)
            length = rng.uniform(0.04, 0.2) * size
            t = np.linspace(0, length, max(int(length * 3), 2))
            ys = np.mod(np.round(cy + t * np.sin(angle)).astype(int), size)
            xs = np.mod(np.round(cx + t * np.cos(angle)).astype(int), size)
            np.add.at(canvas, (ys, xs), rng.uniform(0.3, 1.0) * np.linspace(1, 0.2, len(t)))
    return np.clip(_blur(canvas, 0.6), 0, None)


def _frost_texture(index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(FROST_SEED + index)
    ridges = sum(w * (1 - np.abs(2 * _np_plasma(rng, size, d) - 1)) ** 8 for w, d in ((0.6, 1.6), (0.4, 1.9), (0.3, 2.4)))
    needles = _needles(rng, size)
    needles = needles / max(np.quantile(needles, 0.995), 1e-6)
    t = np.clip(ridges + needles + 0.15 * _np_plasma(rng, size, 1.4), 0, None)
    t = np.clip(t / max(np.quantile(t, 0.99), 1e-6), 0, 1) ** 0.8
    ground = np.array([0.16, 0.21, 0.28])[:, None, None]
    ice = np.array([0.88, 0.94, 1.0])[:, None, None]
    return (ground * (1 - t) + ice * t).astype(np.float32)


@lru_cache(maxsize=4)
def _frost_cpu(size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([_frost_texture(i, size) for i in range(FROST_TEXTURES)]))


def frost_size(h: int, w: int) -> int:
    """Texture side for ``h x w`` images: 128 at CIFAR size (4x the image side, at least 128)."""
    return max(128, 1 << (4 * max(h, w) - 1).bit_length())


def frost_textures(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The (5, 3, S, S) procedural frost textures in [0, 1] for ``h x w`` images (deterministic)."""
    return _frost_cpu(frost_size(h, w)).to(device=device, dtype=dtype)
