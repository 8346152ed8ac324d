"""The AdvMask greedy square scan compiled for the CPU with numba (the CPU backend of ``sample_squares``).

The batched torch scan in :mod:`advpipe.augment.greedy_torch` runs one round of about 30 small
tensor ops per accepted square; on a CPU each op costs microseconds whatever its size, which caps it
near 20,000 masks/s on two cores. The scan itself is tiny per image (at most K candidates, each
tested against the few squares already accepted and counted on a HxW coverage map), so compiled, it
takes a few microseconds per image (about 7 µs per CIFAR mask all told, benchmarks/README.md). All
randomness is drawn in torch before the scan and the scan is deterministic, so both backends return
identical squares for the same generator state (the tests check this).

numba compiles the scan on first use (about a second; cached on disk afterwards). Without numba the
torch scan is used.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

#: numba is a dependency; without it the torch scan is used. Imported on first use only, so the
#: CLI starts without paying for it.
AVAILABLE = importlib.util.find_spec("numba") is not None


def _greedy(masks: np.ndarray, u: np.ndarray, side: np.ndarray, o: np.ndarray, target: np.ndarray,
            t_max: int, squares: np.ndarray, n_acc: np.ndarray, covered: np.ndarray, keep: np.ndarray) -> None:
    """Per image: visit the points in shuffled order, accept squares greedily, write the outputs (see greedy_scan)."""
    n_img, h, w = masks.shape
    flat = masks.reshape(n_img, h * w)
    k = side.shape[1]
    points = np.empty(h * w + 1, np.int64)
    boxes = np.empty((k, 4), np.int64)
    limit = np.empty(k, np.float32)
    for b in range(n_img):
        cover = keep[b]  # True = still visible
        cover[:, :] = True
        n = 0
        for pix in range(h * w):  # branch-free: write every pixel, advance on points
            points[n] = pix
            n += flat[b, pix]
        accepted = 0
        total = 0
        goal = target[b]
        if goal > 0 and n > 0:
            for j in range(min(k, n)):
                # partial Fisher-Yates, drawn lazily: swap slot j with a uniform slot in [j, n)
                pick = j + int(np.floor(np.float32(u[b, j]) * np.float32(n - j)))
                pick = min(pick, n - 1)
                pix = points[pick]
                points[pick] = points[j]
                points[j] = pix
                size = side[b, j]
                r0 = pix // w - size // 2
                c0 = pix % w - size // 2
                y0, x0, y1, x1 = max(r0, 0), max(c0, 0), min(r0 + size, h), min(c0 + size, w)
                # float32 like the torch scan, so floor(o * area) is bit-identical
                lim = np.floor(np.float32(o[b]) * np.float32((y1 - y0) * (x1 - x0)))
                ok = True
                for i in range(accepted):
                    dy = min(y1, boxes[i, 2]) - max(y0, boxes[i, 0])
                    dx = min(x1, boxes[i, 3]) - max(x0, boxes[i, 1])
                    if dy > 0 and dx > 0 and dy * dx > min(lim, limit[i]):
                        ok = False
                        break
                if not ok:
                    continue
                new = 0
                for r in range(y0, y1):
                    for c in range(x0, x1):
                        new += cover[r, c]
                if total + new > t_max:
                    continue
                for r in range(y0, y1):
                    for c in range(x0, x1):
                        cover[r, c] = False
                boxes[accepted, 0], boxes[accepted, 1], boxes[accepted, 2], boxes[accepted, 3] = y0, x0, y1, x1
                limit[accepted] = lim
                squares[b, accepted, 0], squares[b, accepted, 1], squares[b, accepted, 2] = pix // w, pix % w, size
                accepted += 1
                total += new
                if total >= goal:
                    break
        n_acc[b] = accepted
        covered[b] = total


_compiled: dict = {}


def _kernel(func):
    """``func`` compiled, built on first use (and cached on disk by numba)."""
    if func not in _compiled:
        import numba

        _compiled[func] = numba.njit(cache=True, nogil=True)(func)
    return _compiled[func]


def greedy_scan(points: torch.Tensor, u: torch.Tensor, side: torch.Tensor, o: torch.Tensor, target: torch.Tensor,
               t_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy AdvMask squares on CPU tensors; return squares (B,k,3), accepted counts (B,), covered pixels (B,), keep.

    ``points`` (B,H,W) bool; an image's n points (raster order) are visited in the order of a partial
    Fisher-Yates shuffle driven by the uniforms ``u`` (B,k), at most ``k = side.shape[1]`` of them,
    the j-th visited getting side ``side[:, j]``;
    ``o`` (B,) overlap bounds; ``target`` (B,) the pixel count at which an image stops; ``t_max`` the
    pixel budget. ``squares`` rows past an image's accepted count are zero.
    """
    b, h, w = points.shape
    k = side.shape[1]
    squares = np.zeros((b, k, 3), np.int64)
    n_acc = np.zeros(b, np.int64)
    covered = np.zeros(b, np.int64)
    keep = np.empty((b, h, w), np.bool_)
    _kernel(_greedy)(points.contiguous().numpy(), u.to(torch.float32).contiguous().numpy(),
              side.to(torch.int64).contiguous().numpy(), o.to(torch.float32).contiguous().numpy(),
              target.to(torch.int64).contiguous().numpy(), int(t_max), squares, n_acc, covered, keep)
    return torch.from_numpy(squares), torch.from_numpy(n_acc), torch.from_numpy(covered), torch.from_numpy(keep)
