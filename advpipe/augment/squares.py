"""AdvMask's square sampler (Yang et al., AdvMask, Sec. III-B, Eqs. 7-11): parameters only, then a pure apply.

The kernel is :func:`sample_squares` (parameters only) plus :func:`apply_squares` (pure application).
Per image it draws ``p ~ U[p_min, p_max]`` and ``o ~ U[0, o_max]``, visits up to ``max_candidates``
attack points in random order, gives each its own side ``l ~ U{l_min..l_max}`` and greedily accepts a
square when (a) its overlap with every accepted square is at most ``o`` times the smaller of the two
(clipped) areas and (b) the union stays within ``p_max``; it stops once the union reaches ``p``.

All random numbers are drawn here in torch first; the deterministic greedy scan then runs either
compiled per image with numba (:mod:`advpipe.augment.greedy_numba`, the CPU default) or as batched
torch rounds (:mod:`advpipe.augment.greedy_torch`, CUDA), with identical results.

Square centres: a square of side ``l`` on point ``(r, c)`` covers rows ``r - l//2 .. r - l//2 + l - 1``
(and the same for columns), so even sides put the point at the lower-right pixel of the central
2x2 block; the box is then clipped to the image and all areas are the clipped ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from advpipe.augment import greedy_numba
from advpipe.augment.base import box_extent, occlude
from advpipe.augment.greedy_torch import greedy_rounds
from advpipe.augment.occlusion import gridmask_defaults, gridmask_keep, sample_gridmask
from advpipe.errors import AdvpipeError
from advpipe.rng import generator_for

FALLBACKS = ("random", "skip", "gridmask")
BACKENDS = ("auto", "torch", "numba")
#: candidates considered per image; with ~100 attack points on CIFAR this changes the masked-ratio
#: distribution by less than 0.01 versus no cap (see docs/augmentations.md) while bounding the work
DEFAULT_MAX_CANDIDATES = 64
_EPS = 1e-6


@dataclass(frozen=True)
class SquareMasks:
    """Sampled AdvMask parameters for a batch (the output of :func:`sample_squares`).

    ``keep`` (B,H,W) bool is False where occluded; ``squares`` (B,A,3) long holds (centre row,
    centre col, side) of the accepted squares in acceptance order, ``valid`` (B,A) marks real rows;
    ``fallback_used`` (B,) says which images took the fallback; ``p`` and ``o`` (B,) are the drawn
    target ratio and overlap bound; ``grid`` holds the GridMask parameters of the ``"gridmask"``
    fallback (``use`` marks the images that took it), else None. ``keep`` equals
    ``squares_to_keep(squares, valid) & gridmask_keep(grid)``.
    """

    keep: torch.Tensor
    squares: torch.Tensor
    valid: torch.Tensor
    fallback_used: torch.Tensor
    p: torch.Tensor
    o: torch.Tensor
    grid: Mapping[str, torch.Tensor] | None = None

    def masked_fraction(self) -> torch.Tensor:
        """Fraction of occluded pixels per image, (B,) float."""
        return (~self.keep).flatten(1).float().mean(1) if self.keep.numel() else self.p.new_zeros(len(self.p))


def square_boxes(squares: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Return the clipped boxes (..., 4) as (row0, col0, row1, col1), end-exclusive, of (..., 3) squares."""
    r, c, side = squares.unbind(-1)
    r0, c0 = r - side // 2, c - side // 2
    return torch.stack([r0.clamp(0, height), c0.clamp(0, width), (r0 + side).clamp(0, height),
                        (c0 + side).clamp(0, width)], -1)


def squares_to_keep(squares: torch.Tensor, valid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Return the (B,H,W) keep mask that is False on the union of the valid (B,A,3) squares."""
    in_r, in_c = box_extent(square_boxes(squares, height, width), height, width)  # (B,A,H), (B,A,W)
    in_r = in_r & valid[..., None]
    covered = torch.einsum("bah,baw->bhw", in_r.float(), in_c.float()) > 0
    return ~covered


def check_square_params(l_range: Sequence[int], p_range: Sequence[float], o_max: float,
                        fallback: str = "random") -> tuple[int, int, float, float, float]:
    """Validate AdvMask parameters; return (l_min, l_max, p_min, p_max, o_max) or raise AdvpipeError."""
    try:
        l_min, l_max = (int(v) for v in l_range)
        p_min, p_max = (float(v) for v in p_range)
    except (TypeError, ValueError) as exc:
        raise AdvpipeError(f"AdvMask: l and p must be pairs (min, max), got l={l_range!r}, p={p_range!r}") from exc
    if any(float(v) != int(float(v)) for v in l_range):
        raise AdvpipeError(f"AdvMask: square sides l must be integers, got {l_range!r}")
    if not 1 <= l_min <= l_max:
        raise AdvpipeError(f"AdvMask: need 1 <= l_min <= l_max, got l={l_range!r}")
    if not 0.0 <= p_min <= p_max <= 1.0:
        raise AdvpipeError(f"AdvMask: need 0 <= p_min <= p_max <= 1, got p={p_range!r}")
    if not 0.0 <= float(o_max) <= 1.0:
        raise AdvpipeError(f"AdvMask: need 0 <= o <= 1, got o={o_max!r}")
    if fallback not in FALLBACKS:
        raise AdvpipeError(f"AdvMask: unknown fallback {fallback!r}; choose one of: {', '.join(FALLBACKS)}")
    return l_min, l_max, p_min, p_max, float(o_max)


def sample_squares(attack_masks: torch.Tensor, l_range: Sequence[int], p_range: Sequence[float], o_max: float,
                   generator: torch.Generator | None = None, fallback: str = "random", *,
                   max_candidates: int = DEFAULT_MAX_CANDIDATES, backend: str = "auto") -> SquareMasks:
    """Sample AdvMask occlusion squares (paper Sec. III-B, Eqs. 8-11) for a batch of (B,H,W) point masks.

    ``attack_masks`` is (B,H,W) bool (True = attack point). At most ``max_candidates`` points per
    image, a uniformly random subset visited in random order, are tried. An image *falls back* when
    it has no point at all or when its accepted squares cover less than ``p_min``; the fallback is
    ``"random"`` (redo the same procedure, same ``p`` and ``o``, with points drawn uniformly over the
    image, not retried if it falls short again), ``"skip"`` (no occlusion) or ``"gridmask"``
    (a GridMask keep-mask with the defaults for the image size). Runs on the masks' device; the
    same ``generator`` state gives the same result (``None``: a fresh generator with PyTorch's
    default seed, so repeated calls repeat themselves; pass your own during training).

    ``backend``: ``"torch"`` runs the greedy scan as batched tensor rounds on any device; ``"numba"``
    runs the same scan compiled, one image at a time, on CPU tensors (several times faster there);
    ``"auto"`` takes numba for CPU tensors when it is installed. All random draws happen in torch
    before the scan, so both backends give identical results for the same generator state.

    Example::

        masks = torch.rand(8, 32, 32) < 0.1
        out = sample_squares(masks, (2, 15), (0.2, 0.4), 0.1, torch.Generator().manual_seed(0))
        images = apply_squares(images, out, mean=(0.49, 0.48, 0.45))
    """
    l_min, l_max, p_min, p_max, o_max = check_square_params(l_range, p_range, o_max, fallback)
    if attack_masks.dim() != 3:
        raise AdvpipeError(f"AdvMask: attack masks must be (B,H,W), got shape {tuple(attack_masks.shape)}")
    if max_candidates < 1:
        raise AdvpipeError(f"AdvMask: max_candidates must be >= 1, got {max_candidates}")
    masks = attack_masks.bool()
    b, h, w = masks.shape
    dev = masks.device
    backend = _resolve_backend(backend, dev)
    hw = h * w
    generator = generator_for(dev, generator)
    u = torch.rand(b, 2, generator=generator, device=dev)
    p = p_min + (p_max - p_min) * u[:, 0]
    o = o_max * u[:, 1]
    # integer pixel budgets so the checks are exact: union <= t_max and stop once union >= target
    t_max = math.floor(p_max * hw + _EPS)
    short_of = math.ceil(p_min * hw - _EPS)
    target = torch.ceil(p * hw - _EPS)

    squares, valid, covered, keep, counts = _greedy_squares(masks, h, w, l_min, l_max, target, o, t_max,
                                                            max_candidates, generator, backend)
    fallback_used = (counts == 0) | (covered < short_of)
    if fallback == "random":
        if bool(fallback_used.any()):
            idx = fallback_used.nonzero().squeeze(1)
            everywhere = torch.ones(len(idx), h, w, dtype=torch.bool, device=dev)
            sq2, va2, _, keep2, _ = _greedy_squares(everywhere, h, w, l_min, l_max, target[idx], o[idx], t_max,
                                                    max_candidates, generator, backend)
            squares, valid = _merge_rows(squares, valid, idx, sq2, va2)
            keep = keep.index_copy(0, idx, keep2)
    else:
        valid = valid & ~fallback_used[:, None]
        if fallback == "skip":
            keep = keep | fallback_used[:, None, None]
        else:
            grid = sample_gridmask(b, h, w, **gridmask_defaults(h, w), generator=generator, device=dev)
            grid["use"] = grid["use"] & fallback_used  # drawn with probability 1: exactly the fallen-back images
            keep = torch.where(fallback_used[:, None, None], gridmask_keep(grid, h, w), keep)
            return SquareMasks(keep, squares, valid, fallback_used, p, o, grid)
    return SquareMasks(keep, squares, valid, fallback_used, p, o)


def apply_squares(images: torch.Tensor, masks: SquareMasks | torch.Tensor,
                  mean: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Occlude (B,C,H,W) images with sampled squares (Eq. 7): occluded pixels take the dataset mean."""
    keep = masks.keep if isinstance(masks, SquareMasks) else masks
    return occlude(images, keep, tuple(mean) if not isinstance(mean, torch.Tensor) else mean)


def _resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the scan backend: numba for CPU tensors when it is installed, else torch."""
    if backend not in BACKENDS:
        raise AdvpipeError(f"AdvMask: unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "numba" if device.type == "cpu" and greedy_numba.AVAILABLE else "torch"
    if backend == "numba" and (device.type != "cpu" or not greedy_numba.AVAILABLE):
        raise AdvpipeError("AdvMask: the numba backend needs numba installed and CPU tensors")
    return backend


def _merge_rows(squares: torch.Tensor, valid: torch.Tensor, idx: torch.Tensor, sub_squares: torch.Tensor,
                sub_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace rows ``idx`` of (B,A,3)/(B,A) by (n,A',3)/(n,A'), padding both to the wider one."""
    width = max(squares.shape[1], sub_squares.shape[1])
    pad = torch.nn.functional.pad
    squares = pad(squares, (0, 0, 0, width - squares.shape[1]))
    valid = pad(valid, (0, width - valid.shape[1]))
    squares = squares.index_copy(0, idx, pad(sub_squares, (0, 0, 0, width - sub_squares.shape[1])))
    valid = valid.index_copy(0, idx, pad(sub_valid, (0, width - sub_valid.shape[1])))
    return squares, valid


def _greedy_squares(points: torch.Tensor, h: int, w: int, l_min: int, l_max: int, target: torch.Tensor,
                    o: torch.Tensor, t_max: int, k: int, generator: torch.Generator | None, backend: str = "torch"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the visiting order and sides, then run the greedy acceptance on (B,H,W) point masks.

    Returns squares (B,A,3), valid (B,A), covered pixel counts (B,), the keep mask (B,H,W) and the
    number of points per image (B,). ``backend`` is ``"numba"`` (:mod:`advpipe.augment.greedy_numba`)
    or ``"torch"`` (:func:`advpipe.augment.greedy_torch.greedy_rounds`); both consume the same draws.
    """
    b = points.shape[0]
    dev = points.device
    # points per image, summed as bytes into int32 (about 3x faster on a CPU than a sum of bools)
    counts = points.flatten(1).view(torch.uint8).sum(1, dtype=torch.int32).long()
    k = min(k, int(counts.max()) if b else 0)
    # one draw for both: uniforms of the visiting order's shuffle, and the sides (the j-th visited
    # candidate of an image gets side[:, j])
    draws = torch.rand(2, b, k, generator=generator, device=dev)
    u = draws[0]
    side = (draws[1] * (l_max - l_min + 1)).long().clamp_(max=l_max - l_min).add_(l_min)
    if k == 0:
        return (torch.zeros(b, 0, 3, dtype=torch.long, device=dev), torch.zeros(b, 0, dtype=torch.bool, device=dev),
                torch.zeros(b, dtype=torch.long, device=dev), torch.ones(b, h, w, dtype=torch.bool, device=dev), counts)
    if backend == "numba":
        squares, n_acc, covered, keep = greedy_numba.greedy_scan(points, u, side, o, target, t_max)
        width = int(n_acc.max())
        return squares[:, :width], torch.arange(width) < n_acc[:, None], covered, keep, counts
    return greedy_rounds(points, counts, u, side, target, o, t_max, l_max)
