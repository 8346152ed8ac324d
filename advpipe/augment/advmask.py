"""AdvMask: structured occlusion squares centred on sparse-attack points (Yang et al., AdvMask, Sec. III-B).

Paper: S. Yang, J. Li, J. Zhao, F. Shen, "AdvMask: A Sparse Adversarial Attack Based Data Augmentation
Method for Image Classification". The augmentation mask M of Eq. (7) is a union of squares centred on
attack points; each square's side follows Eq. (8), the masked ratio of Eqs. (9)-(10) is kept in
``[p_min, p_max]`` and pairwise overlaps are bounded through Eq. (11).

This module holds the registered augmentations (``advmask``, ``advmask-rp``, ``advmask-cp``, ``aapm``)
and their factories. The pieces live beside it, one job each, and are re-exported here:

- :mod:`advpipe.augment.squares`: the square sampler :func:`sample_squares` and :func:`apply_squares`;
- :mod:`advpipe.augment.greedy_torch` and :mod:`advpipe.augment.greedy_cpu`: the two backends of its
  deterministic greedy scan;
- :mod:`advpipe.augment.schedule`: :class:`IncrementalOcclusion`, the incremental schedule (Sec. IV-B).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from advpipe.augment.base import AUGMENTS, AugmentContext, InputAugment
from advpipe.augment.points import attack_points, corner_source, harris_points, random_points
from advpipe.augment.schedule import IncrementalOcclusion
from advpipe.augment.squares import (BACKENDS, DEFAULT_MAX_CANDIDATES, FALLBACKS, SquareMasks, apply_squares,
                                     check_square_params, sample_squares, square_boxes, squares_to_keep)
from advpipe.data.batch import Batch
from advpipe.errors import AdvpipeError

__all__ = ["BACKENDS", "DEFAULT_MAX_CANDIDATES", "FALLBACKS", "AdvMask", "AttackPointMask", "IncrementalOcclusion",
           "SquareMasks", "advmask_defaults", "apply_squares", "check_square_params", "sample_squares",
           "square_boxes", "squares_to_keep"]

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
