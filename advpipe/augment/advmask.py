"""AdvMask: structured occlusion squares centred on sparse-attack points (Yang et al., AdvMask, Sec. III-B).

Paper: S. Yang, J. Li, J. Zhao, F. Shen, "AdvMask: A Sparse Adversarial Attack Based Data Augmentation
Method for Image Classification". The augmentation mask M of Eq. (7) is a union of squares centred on
attack points; each square's side follows Eq. (8), the masked ratio of Eqs. (9)-(10) is kept in
``[p_min, p_max]`` and pairwise overlaps are bounded through Eq. (11).

The kernel is :func:`sample_squares` (parameters only) plus :func:`apply_squares` (pure application).
Per image it draws ``p ~ U[p_min, p_max]`` and ``o ~ U[0, o_max]``, visits up to ``max_candidates``
attack points in random order, gives each its own side ``l ~ U{l_min..l_max}`` and greedily accepts a
square when (a) its overlap with every accepted square is at most ``o`` times the smaller of the two
(clipped) areas and (b) the union stays within ``p_max``; it stops once the union reaches ``p``.

Implementation: all random numbers are drawn in torch first (the visiting order is a partial
Fisher-Yates shuffle); the deterministic greedy scan then runs either compiled per image with numba
(:mod:`advpipe.augment.greedy_cpu`, the CPU default) or as batched torch rounds (CUDA), with
identical results. The torch rounds: a rejected candidate can never become acceptable later, because
both the overlap test and the union ``|cover ∪ square|`` only grow as squares are accepted. So the
sequential scan equals "repeatedly accept the first still-acceptable candidate in visiting order",
and the batched loop runs once per *accepted* square (about 7 per image on CIFAR, about 20 for the
slowest image of a batch of 256) instead of once per candidate. Each round updates, for all
candidates of all images at once, the exact pairwise-overlap test against the newly accepted box and
a lower bound on the pixels each candidate would add (its area minus the sum of its overlaps); the
exact new pixels of the one chosen candidate per image are counted on a coverage bitmap (16 columns
per int32 word, a 16-bit popcount table). Finished images leave the working set, so late rounds
touch only the few images still growing.

Square centres: a square of side ``l`` on point ``(r, c)`` covers rows ``r - l//2 .. r - l//2 + l - 1``
(and the same for columns), so even sides put the point at the lower-right pixel of the central
2x2 block; the box is then clipped to the image and all areas are the clipped ones.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from advpipe.augment import greedy_cpu
from advpipe.augment.base import AUGMENTS, AugmentContext, InputAugment, occlude
from advpipe.augment.occlusion import (gridmask_defaults, gridmask_keep, linear_ramp, resolve_generator,
                                      sample_gridmask)
from advpipe.augment.points import attack_points, corner_source, harris_points, random_points
from advpipe.data.batch import Batch
from advpipe.errors import AdvpipeError

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
    target ratio and overlap bound.
    """

    keep: torch.Tensor
    squares: torch.Tensor
    valid: torch.Tensor
    fallback_used: torch.Tensor
    p: torch.Tensor
    o: torch.Tensor

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
    boxes = square_boxes(squares, height, width)
    rows = torch.arange(height, device=squares.device)
    cols = torch.arange(width, device=squares.device)
    in_r = (rows >= boxes[..., 0, None]) & (rows < boxes[..., 2, None]) & valid[..., None]  # (B,A,H)
    in_c = (cols >= boxes[..., 1, None]) & (cols < boxes[..., 3, None])  # (B,A,W)
    covered = torch.einsum("bah,baw->bhw", in_r.float(), in_c.float()) > 0
    return ~covered


def check_square_params(l_range: Sequence[int], p_range: Sequence[float], o_max: float,
                        fallback: str = "random") -> tuple[int, int, float, float, float]:
    """Validate AdvMask parameters; return (l_min, l_max, p_min, p_max, o_max) or raise AdvpipeError."""
    try:
        l_min, l_max = (int(v) for v in l_range)
        p_min, p_max = (float(v) for v in p_range)
    except (TypeError, ValueError):
        raise AdvpipeError(f"AdvMask: l and p must be pairs (min, max), got l={l_range!r}, p={p_range!r}") from None
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
    generator = resolve_generator(generator, dev)
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
            params = sample_gridmask(b, h, w, **gridmask_defaults(h, w), generator=generator, device=dev)
            keep = torch.where(fallback_used[:, None, None], gridmask_keep(params, h, w), keep)
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
        return "numba" if device.type == "cpu" and greedy_cpu.AVAILABLE else "torch"
    if backend == "numba" and (device.type != "cpu" or not greedy_cpu.AVAILABLE):
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


def _candidates(points: torch.Tensor, counts: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k points of each image in visiting order: (2,B,k) float (row, col) and (B,k) real-slot flags.

    ``points`` is (B,H,W) bool with ``counts`` points per image. The order is a partial Fisher-Yates
    shuffle of the points in raster order: slot j swaps with slot ``j + floor(u[:, j] * (n - j))``,
    a uniformly random subset in uniformly random order, computed exactly as the numba backend does.
    """
    b, k = u.shape
    dev = points.device
    img, rr, cc = points.nonzero().unbind(1)
    width = max(int(counts.max()), k)
    perm = torch.zeros(b, width, dtype=torch.long, device=dev)
    rank = torch.arange(len(img), device=dev) - (counts.cumsum(0) - counts)[img]
    perm[img, rank] = rr * points.shape[2] + cc
    left = counts.float()
    for j in range(k):
        pick = (j + (u[:, j] * (left - j).clamp(min=0)).floor().long()).clamp(max=(counts - 1).clamp(min=j))
        here = perm[:, j].clone()
        perm[:, j] = perm.gather(1, pick[:, None]).squeeze(1)
        perm.scatter_(1, pick[:, None], here[:, None])
    chosen = perm[:, :k]
    centre = torch.stack([chosen // points.shape[2], chosen % points.shape[2]]).float()
    return centre, torch.arange(k, device=dev) < counts[:, None]


@functools.lru_cache(maxsize=None)
def _bit_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device tables over all 16-bit patterns: popcount (float32, exact) and which of the 16 bits are clear."""
    count = torch.zeros(1, device=device)
    for _ in range(16):
        count = torch.cat([count, count + 1])
    bits = (torch.arange(1 << 16, device=device)[:, None] >> torch.arange(16, device=device)) & 1
    return count, bits == 0


def _greedy_squares(points: torch.Tensor, h: int, w: int, l_min: int, l_max: int, target: torch.Tensor,
                    o: torch.Tensor, t_max: int, k: int, generator: torch.Generator | None, backend: str = "torch"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the greedy square acceptance on (B,H,W) point masks (``backend`` torch or numba).

    Returns squares (B,A,3), valid (B,A), covered pixel counts (B,), the keep mask (B,H,W) and the
    number of points per image (B,).

    State per image, kept free of bool tensors in the wide updates because those are the slow
    kernels on CPU: ``need`` (B,K) is a lower bound on the pixels each candidate would add (its area
    minus the sum of its overlaps with accepted squares) plus ``big`` once it is accepted or rejected
    for good; ``slack`` (B,) is the pixel budget left, or -1 once the image reached its target.
    Coverage is a bitmap with 16 columns per int32 word. Each round takes every image's candidate
    with ``need <= slack`` and the lowest slot (slots are in visiting order), counts its exact new pixels on the bitmap
    (a 16-bit popcount table), accepts it if they fit, and updates ``need`` of all candidates against
    the accepted box. Images with nothing left to try leave the working set once at most half of it
    is live, so late rounds are cheap.
    """
    b = points.shape[0]
    dev = points.device
    counts = greedy_cpu.count_points(points) if backend == "numba" else points.flatten(1).sum(1)
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
        squares, n_acc, covered, keep = greedy_cpu.greedy_cpu(points, u, side, o, target, t_max)
        width = int(n_acc.max())
        return squares[:, :width], torch.arange(width) < n_acc[:, None], covered, keep, counts
    centre, real = _candidates(points, counts, u)
    # (6,B,K) float planes, integers held exactly: y0, x0, y1, x1, floor(o * area), height. Built
    # plane by plane because CPU kernels on 32k+ elements go multi-threaded, which stalls on busy cores
    feats = torch.empty(6, b, k, device=dev)
    fside, half = side.float(), (side // 2).float()
    for axis, limit in ((0, h), (1, w)):
        start = centre[axis] - half
        torch.clamp(start, min=0, out=feats[axis])
        torch.clamp(start + fside, max=limit, out=feats[2 + axis])
    torch.sub(feats[2], feats[0], out=feats[5])
    area = feats[5] * (feats[3] - feats[1])
    # overlaps are integers, so "inter <= o * area" is exactly "inter <= floor(o * area)"
    torch.floor(o[:, None] * area, out=feats[4])
    y0, x0, y1, x1, o_plane = feats[:5]
    # candidates sit in visiting order, so the slot is the priority: one cheap amin over
    # "slot + k * (does not fit)" finds the next pick (argmin is several times slower on CPU)
    prio = torch.arange(k, device=dev, dtype=torch.float)
    closed = float(k)  # any score at or above this is not a pick
    # the columns of each candidate as bits, 16 per int32 word so a word indexes the popcount table
    n_words = (w + 15) // 16
    col_bits = torch.empty(n_words, b, k, dtype=torch.int32, device=dev)
    x0_int, x1_int = x0.long(), x1.long()
    for j in range(n_words):
        lo_bit, hi_bit = (x0_int - 16 * j).clamp_(0, 16), (x1_int - 16 * j).clamp_(0, 16)
        col_bits[j] = (1 << hi_bit) - (1 << lo_bit)
    big = 4.0 * h * w + 4
    need = area + (~real) * big

    win = min(l_max, h)
    win_rows = torch.arange(win, device=dev)
    # row masks of a window whose first ``height`` rows belong to the square: 0 or -1 (all bits)
    win_mask = -(win_rows[None, :] < torch.arange(win + 1, device=dev)[:, None]).to(torch.int32)
    lut, clear_bits = _bit_tables(dev)
    # ``win`` spare zero rows at the bottom so a window never needs clamping
    cover = torch.zeros(b, h + win, n_words, dtype=torch.int32, device=dev)
    covered = torch.zeros(b, device=dev)
    target = target.float()
    budget = torch.full((b,), float(t_max), device=dev)  # pixels still allowed: t_max - covered
    done = torch.full((b,), -1.0, device=dev)
    slack = torch.where(target > 0, budget, done)  # the budget, or -1 once an image is finished
    rows_of = torch.arange(b, device=dev)  # original row of each working row
    covered_out, cover_out = torch.zeros_like(covered), torch.zeros_like(cover)
    picks_out = torch.full((b, k), -1, dtype=torch.long, device=dev)
    picks = picks_out.clone()
    no_pick = torch.full((b,), -1, dtype=torch.long, device=dev)
    rounds = 0
    for rounds in range(k):
        # open candidates that may still fit score their priority (< closed), all others >= closed;
        # amin rather than min(dim), which starts threads even on tiny inputs (a stall on busy cores)
        best = torch.add(prio, (need - slack[:, None]).clamp_(min=0), alpha=closed).amin(1)
        has = best < closed
        pick = torch.remainder(best, k).long()
        n_live = int(has.sum())
        if n_live == 0:
            break
        if n_live <= len(rows_of) // 2:
            covered_out.index_copy_(0, rows_of, covered)
            cover_out.index_copy_(0, rows_of, cover)
            picks_out.index_copy_(0, rows_of, picks)
            live = has.nonzero().squeeze(1)
            feats, need, col_bits, cover = feats[:, live], need[live], col_bits[:, live], cover[live]
            y0, x0, y1, x1, o_plane = feats[:5]
            covered, target, budget, slack, done = covered[live], target[live], budget[live], slack[live], done[live]
            rows_of, picks, no_pick, pick, has = rows_of[live], picks[live], no_pick[live], pick[live], has[live]
        nb = len(rows_of)
        fy0, fx0, fy1, fx1, fo, fh = feats.gather(2, pick.view(1, nb, 1).expand(6, nb, 1)).unbind(0)  # (B,1) each
        rows_idx = (fy0.long() + win_rows)[:, :, None].expand(nb, win, n_words)
        window = cover.gather(1, rows_idx)
        cols = col_bits.gather(2, pick.view(1, nb, 1).expand(n_words, nb, 1)).permute(1, 2, 0)  # (B,1,words)
        fresh = (cols & win_mask.index_select(0, fh.view(nb).long())[:, :, None]) & ~window
        new = lut.index_select(0, fresh.view(-1)).view(nb, -1).sum(1)
        accept = has & (new <= slack)
        gain = new.mul_(accept)
        need.scatter_(1, pick[:, None], big)
        # overlap of every candidate with the accepted box; an image that accepted nothing gets an
        # empty box (zero height) so its overlaps vanish without a full-width multiply
        fy1 = torch.where(accept[:, None], fy1, fy0)
        inter = (torch.minimum(y1, fy1) - torch.maximum(y0, fy0)).clamp_(min=0)
        inter.mul_((torch.minimum(x1, fx1) - torch.maximum(x0, fx0)).clamp_(min=0))
        conflict = (inter - torch.minimum(o_plane, fo)).clamp_(0, 1)
        need.sub_(inter).add_(conflict, alpha=big)
        cover.scatter_add_(1, rows_idx, fresh.mul_(accept[:, None, None]))
        covered += gain
        budget -= gain
        slack = torch.where(covered >= target, done, budget)
        torch.where(accept, pick, no_pick, out=picks[:, rounds])
    covered_out.index_copy_(0, rows_of, covered)
    cover_out.index_copy_(0, rows_of, cover)
    picks_out.index_copy_(0, rows_of, picks)
    keep = clear_bits.index_select(0, cover_out[:, :h].reshape(-1)).view(b, h, n_words * 16)[:, :, :w]
    return _pack_squares(picks_out[:, : rounds + 1], centre, side, covered_out.long(), keep, counts)


def _pack_squares(picks: torch.Tensor, centre: torch.Tensor, side: torch.Tensor, covered: torch.Tensor,
                  keep: torch.Tensor, counts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn accepted slots (B,R), -1 where a round accepted nothing, into (squares, valid, covered, keep, counts)."""
    b, dev = picks.shape[0], picks.device
    # rounds where an image accepted nothing leave holes; pack accepted slots to the front, in order
    taken = picks >= 0
    n_taken = taken.sum(1)
    width = int(n_taken.max()) if b else 0
    dest = torch.where(taken, taken.cumsum(1) - 1, width)
    slots = torch.zeros(b, width + 1, dtype=torch.long, device=dev).scatter_(1, dest, picks)
    slots = slots[:, :width]
    valid = torch.arange(width, device=dev) < n_taken[:, None]
    squares = torch.stack([centre[0].long().gather(1, slots), centre[1].long().gather(1, slots),
                           side.gather(1, slots)], -1)
    return squares * valid[..., None], valid, covered, keep, counts


# ------------------------------------------------------------------------------ registered augmentations

#: the paper's per-dataset settings (Sec. IV-C); other datasets scale the CIFAR-10 side range
_PAPER_SETTINGS = {"cifar100": ((5, 20), (0.06, 0.5), 0.2)}
_CIFAR10_SETTINGS = ((2, 15), (0.2, 0.4), 0.1)


def advmask_defaults(ctx: AugmentContext) -> tuple[tuple[int, int], tuple[float, float], float]:
    """Paper defaults (l, p, o) for ``ctx``: CIFAR-10's, CIFAR-100's, or CIFAR-10's sides scaled to the image size.

    Ratios p and o do not depend on the image size; the sides scale with the shorter image side / 32.
    """
    (l_lo, l_hi), p, o = _PAPER_SETTINGS.get(ctx.dataset, _CIFAR10_SETTINGS)
    scale = min(ctx.image_size) / 32.0
    return (max(1, round(l_lo * scale)), max(1, round(l_hi * scale))), p, o


class IncrementalOcclusion(InputAugment):
    """Base of AdvMask-style augmentations with the paper's incremental schedule (Sec. IV-B).

    In 0-based epoch ``e`` of a ``warmup``-epoch ramp, a fraction ``f = prob_max * min(1, (e+1)/warmup)``
    of every batch is occluded: ``floor(f * B + u)`` samples with ``u ~ U[0,1)`` (unbiased for any
    batch size), chosen uniformly without replacement with the generator. Subclasses implement
    :meth:`occlusion` for the chosen samples.
    """

    def __init__(self, ctx: AugmentContext, prob_max: float, warmup_epochs: int | None) -> None:
        if not 0.0 <= prob_max <= 1.0:
            raise AdvpipeError(f"prob_max must be in [0, 1], got {prob_max!r}")
        if warmup_epochs is not None and int(warmup_epochs) < 1:
            raise AdvpipeError(f"warmup_epochs must be >= 1, got {warmup_epochs!r}")
        self.mean = tuple(ctx.mean)
        self.prob_max = float(prob_max)
        self.warmup_epochs = None if warmup_epochs is None else int(warmup_epochs)
        self.fraction = 0.0
        self.set_epoch(0, ctx.epochs)
        self._stats: dict[str, Any] = {}

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Set the fraction of each batch to occlude for 0-based ``epoch`` of ``epochs``."""
        self.fraction = linear_ramp(self.prob_max, epoch, self.warmup_epochs or epochs)

    def occlusion(self, batch: Batch, index: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (keep (n,H,W) bool, fallback_used (n,) bool) for the batch rows in ``index``."""
        raise NotImplementedError

    def select(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Choose which samples of a batch get occluded this step: (B,) bool."""
        u = torch.rand(batch_size + 1, generator=generator, device=device)
        rank = u[:batch_size].argsort().argsort()
        return rank < (self.fraction * batch_size + u[batch_size]).floor()

    def sample(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Pick the samples to occlude and draw their keep masks; others keep every pixel."""
        b, _, h, w = batch.images.shape
        dev = batch.images.device
        selected = self.select(b, generator, dev)
        keep = torch.ones(b, h, w, dtype=torch.bool, device=dev)
        fallback = torch.zeros(b, dtype=torch.bool, device=dev)
        index = selected.nonzero().squeeze(1)
        if len(index):
            sub_keep, sub_fallback = self.occlusion(batch, index, generator)
            keep = keep.index_copy(0, index, sub_keep)
            fallback = fallback.index_copy(0, index, sub_fallback)
        self._record(selected, keep, fallback)
        return {"keep": keep, "selected": selected, "fallback_used": fallback}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Occlude with the sampled keep masks (the dataset mean fills occluded pixels, Eq. 7)."""
        return occlude(images, params["keep"], self.mean)

    def _record(self, selected: torch.Tensor, keep: torch.Tensor, fallback: torch.Tensor) -> None:
        # summed on the device so training never waits for a host sync per batch
        masked = (~keep).flatten(1).float().mean(1) if keep.numel() else keep.new_zeros(len(keep), dtype=torch.float)
        sums = torch.stack([selected.sum().float(), (masked * selected).sum(), (fallback & selected).sum().float()])
        self._stats["sums"] = self._stats["sums"] + sums if "sums" in self._stats else sums
        self._stats["seen"] = self._stats.get("seen", 0) + len(selected)

    def epoch_metrics(self) -> dict[str, float]:
        """Fraction of samples occluded, their mean masked ratio and fallback rate since the last call; then reset."""
        stats, self._stats = self._stats, {}
        if not stats.get("seen"):
            return {"fraction_augmented": 0.0, "mean_masked_ratio": 0.0, "fallback_rate": 0.0}
        n_aug, masked, n_fallback = (float(v) for v in stats["sums"].tolist())
        return {"fraction_augmented": n_aug / stats["seen"],
                "mean_masked_ratio": masked / n_aug if n_aug else 0.0,
                "fallback_rate": n_fallback / n_aug if n_aug else 0.0}


class AdvMask(IncrementalOcclusion):
    """AdvMask (Sec. III-B) with points from the attack masks, or the RP / CP ablations of Table V.

    CP (``points="corner"``) brings its own side source, ``own_side["corner_mask"]``: the loader
    finds the corners on the stored images and crops and flips them with the images (see
    :mod:`advpipe.augment.points`). A batch without that entry (one that was never padded or
    cropped, e.g. a preview) has its corners found on the batch's images as they are.
    """

    def __init__(self, ctx: AugmentContext, l: Sequence[int], p: Sequence[float], o: float, fallback: str,
                 prob_max: float, warmup_epochs: int | None, max_candidates: int, points: str,
                 num_points: int) -> None:
        super().__init__(ctx, prob_max, warmup_epochs)
        l_min, l_max, p_min, p_max, self.o_max = check_square_params(l, p, o, fallback)
        self.l_range, self.p_range = (l_min, l_max), (p_min, p_max)
        if int(max_candidates) < 1 or int(num_points) < 1:
            raise AdvpipeError(f"max_candidates and num_points must be >= 1, got {max_candidates!r}, {num_points!r}")
        self.fallback, self.max_candidates = fallback, int(max_candidates)
        self.points, self.num_points = points, int(num_points)
        self.needs_side = ("attack_mask",) if points == "attack" else ()
        #: side sources this augmentation computes itself (the training loop hands them to the loader)
        self.own_side = {"corner_mask": corner_source(self.num_points)} if points == "corner" else {}

    def sample(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Check the attack masks are there (even on steps that occlude nothing), then sample."""
        if self.points == "attack":
            attack_points(batch)
        return super().sample(batch, generator)

    def point_masks(self, batch: Batch, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The (n,H,W) point masks the squares are centred on, for the batch rows in ``index``."""
        _, _, h, w = batch.images.shape
        if self.points == "attack":
            return attack_points(batch)[index]
        if self.points == "random":
            return random_points(len(index), h, w, self.num_points, generator=generator, device=batch.images.device)
        if "corner_mask" in batch.side:
            return batch.side["corner_mask"][index].bool()
        return harris_points(batch.images[index], self.num_points)

    def occlusion(self, batch: Batch, index: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample squares on the chosen rows' points."""
        out = sample_squares(self.point_masks(batch, index, generator), self.l_range, self.p_range, self.o_max,
                             generator, self.fallback, max_candidates=self.max_candidates)
        return out.keep, out.fallback_used


class AttackPointMask(IncrementalOcclusion):
    """AAPM (Table VI): occlude exactly the attack points, i.e. 1x1 squares, with the same schedule."""

    needs_side = ("attack_mask",)

    def sample(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Check the attack masks are there, then sample."""
        attack_points(batch)
        return super().sample(batch, generator)

    def occlusion(self, batch: Batch, index: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep everything but the attack points; there is no fallback."""
        keep = ~attack_points(batch)[index]
        return keep, torch.zeros(len(index), dtype=torch.bool, device=keep.device)


def _advmask_factory(points: str) -> Callable[..., InputAugment]:
    def build(ctx: AugmentContext, *, l: Sequence[int] | None = None, p: Sequence[float] | None = None,
              o: float | None = None, fallback: str = "random", prob_max: float = 0.8,
              warmup_epochs: int | None = None, max_candidates: int = DEFAULT_MAX_CANDIDATES,
              num_points: int = 100) -> InputAugment:
        l_def, p_def, o_def = advmask_defaults(ctx)
        return AdvMask(ctx, l_def if l is None else l, p_def if p is None else p, o_def if o is None else o,
                       fallback, prob_max, warmup_epochs, max_candidates, points, num_points)

    build.__doc__ = f"Build AdvMask with {points} points; l, p, o default by dataset (see advmask_defaults)."
    return build


def _advmask(ctx: AugmentContext, *, l: Sequence[int] | None = None, p: Sequence[float] | None = None,
             o: float | None = None, fallback: str = "random", prob_max: float = 0.8,
             warmup_epochs: int | None = None, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> InputAugment:
    """Build AdvMask on the attack masks; l, p, o default by dataset (see :func:`advmask_defaults`)."""
    return _advmask_factory("attack")(ctx, l=l, p=p, o=o, fallback=fallback, prob_max=prob_max,
                                      warmup_epochs=warmup_epochs, max_candidates=max_candidates)


def _aapm(ctx: AugmentContext, *, prob_max: float = 0.8, warmup_epochs: int | None = None) -> InputAugment:
    """Build AAPM (attack points occluded as 1x1 squares) with AdvMask's schedule."""
    return AttackPointMask(ctx, prob_max, warmup_epochs)


AUGMENTS.register("advmask", _advmask)
AUGMENTS.register("advmask-rp", _advmask_factory("random"))
AUGMENTS.register("advmask-cp", _advmask_factory("corner"))
AUGMENTS.register("aapm", _aapm)
