"""AdvMask: structured occlusion squares centred on sparse-attack points (Yang et al., AdvMask, Sec. III-B).

Paper: S. Yang, J. Li, J. Zhao, F. Shen, "AdvMask: A Sparse Adversarial Attack Based Data Augmentation
Method for Image Classification". The augmentation mask M of Eq. (7) is a union of squares centred on
attack points; each square's side follows Eq. (8), the masked ratio of Eqs. (9)-(10) is kept in
``[p_min, p_max]`` and pairwise overlaps are bounded through Eq. (11).

This module holds the registered augmentations (``advmask``, ``advmask-rp``, ``advmask-cp``, ``aapm``)
and their factories. The pieces live beside it, one job each, and are re-exported here:

- :mod:`advpipe.augment.squares`: the square sampler :func:`sample_squares` and :func:`apply_squares`;
- :mod:`advpipe.augment.greedy_numba` and :mod:`advpipe.augment.greedy_torch`: the two backends of its
  deterministic greedy scan;
- :mod:`advpipe.augment.incremental`: :class:`IncrementalOcclusion`, the incremental schedule (Sec. IV-B).

The classes are both the ``--aug`` augmentations and the public objects (``advpipe.AdvMask``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

import torch

from advpipe.augment.base import AUGMENTS, mask_source
from advpipe.augment.incremental import IncrementalOcclusion
from advpipe.augment.occlusion import gridmask_keep, gridmask_off
from advpipe.augment.points import attack_points, corner_source, harris_points, random_points
from advpipe.augment.squares import (BACKENDS, DEFAULT_MAX_CANDIDATES, FALLBACKS, SquareMasks, apply_squares,
                                     check_square_params, sample_squares, square_boxes, squares_to_keep)
from advpipe.errors import AdvpipeError

__all__ = ["BACKENDS", "DEFAULT_MAX_CANDIDATES", "FALLBACKS", "AdvMask", "AttackPointMask", "IncrementalOcclusion",
           "SquareMasks", "advmask_defaults", "apply_squares", "check_square_params", "sample_squares",
           "square_boxes", "squares_to_keep"]

#: the paper's per-dataset settings (Sec. IV-C); other datasets scale the CIFAR-10 side range
_PAPER_SETTINGS = {"cifar100": ((5, 20), (0.06, 0.5), 0.2)}
_CIFAR10_SETTINGS = ((2, 15), (0.2, 0.4), 0.1)
POINTS = ("attack", "random", "corner")


def advmask_defaults(dataset: str, image_size: Sequence[int]) -> tuple[tuple[int, int], tuple[float, float], float]:
    """Paper defaults (l, p, o) for ``dataset`` at (H, W) ``image_size``: CIFAR-10's, CIFAR-100's, or scaled sides.

    Ratios p and o do not depend on the image size; the sides scale with the shorter image side / 32.
    """
    (l_lo, l_hi), p, o = _PAPER_SETTINGS.get(dataset, _CIFAR10_SETTINGS)
    scale = min(image_size) / 32.0
    return (max(1, round(l_lo * scale)), max(1, round(l_hi * scale))), p, o


class AdvMask(IncrementalOcclusion):
    """AdvMask (Yang et al., "AdvMask: A Sparse Adversarial Attack Based Data Augmentation Method", Sec. III-B).

    Per image, squares of side ``l ~ U{l}`` are centred on the attack points until they hide a
    ratio ``p ~ U[p]`` of the image, pairwise overlaps bounded by ``o`` (Eqs. 7-11); the
    incremental schedule (Sec. IV-B) occludes a fraction ``prob_max * min(1, (e+1)/warmup)`` of
    every batch in epoch ``e`` (call :meth:`set_epoch`; without it the fraction is ``prob_max``).
    ``l``, ``p``, ``o`` default to the paper's settings for ``dataset`` (CIFAR-10: (2, 15),
    (0.2, 0.4), 0.1; CIFAR-100: (5, 20), (0.06, 0.5), 0.2; sides scaled to ``image_size``).
    ``points="random"`` / ``"corner"`` are the RP / CP ablations of Table V (no masks needed,
    ``num_points`` default 100). ``masks``: a store (:func:`advpipe.open_masks`), its location,
    (N,H,W) masks or a callable index -> masks, looked up by the dataset indices of each call.

    CP brings its own side source, ``own_side["corner_mask"]``: the loader finds the corners on the
    stored images and crops and flips them with the images (see :mod:`advpipe.augment.points`).
    Images without that side entry (never padded or cropped, e.g. a preview) have their corners
    found as they are. The parameters are the accepted squares, not a mask: ``squares`` (B,A,3)
    (centre row, centre col, side) with ``valid`` (B,A), plus ``selected``, ``fallback_used`` (B,)
    and, with the ``"gridmask"`` fallback, that fallback's GridMask parameters.

    Example::

        aug = AdvMask(open_masks("masks/c10.zarr"), prob_max=0.8)
        aug.set_epoch(epoch, epochs)
        images = aug(images, index, generator=g)     # (B,C,H,W) in [0,1], dataset indices (B,)
    """

    def __init__(self, masks: Any = None, *, l: Sequence[int] | None = None, p: Sequence[float] | None = None,
                 o: float | None = None, prob_max: float = 0.8, warmup_epochs: int | None = None,
                 fallback: str = "random", max_candidates: int = DEFAULT_MAX_CANDIDATES, points: str = "attack",
                 num_points: int | None = None, **common: Any) -> None:
        super().__init__(prob_max, warmup_epochs, **common)
        if points not in POINTS:
            raise AdvpipeError(f"points must be one of {', '.join(POINTS)}, got {points!r}")
        if points == "attack" and num_points is not None:
            raise AdvpipeError("num_points is for points='random' or 'corner'; AdvMask's points are the attack's")
        l_def, p_def, o_def = advmask_defaults(self.dataset, self.image_size)
        l_min, l_max, p_min, p_max, self.o_max = check_square_params(l_def if l is None else l,
                                                                     p_def if p is None else p,
                                                                     o_def if o is None else o, fallback)
        self.l_range, self.p_range = (l_min, l_max), (p_min, p_max)
        num_points = 100 if num_points is None else num_points
        if int(max_candidates) < 1 or int(num_points) < 1:
            raise AdvpipeError(f"max_candidates and num_points must be >= 1, got {max_candidates!r}, {num_points!r}")
        self.fallback, self.max_candidates = fallback, int(max_candidates)
        self.points, self.num_points = points, int(num_points)
        self.needs_side = ("attack_mask",) if points == "attack" else ()
        self.own_side = {"corner_mask": corner_source(self.num_points)} if points == "corner" else {}
        self.masks = mask_source(masks)

    def point_masks(self, images: torch.Tensor, side: Mapping[str, torch.Tensor], index: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
        """The (n,H,W) point masks the squares are centred on, for the rows in ``index``."""
        _, _, h, w = images.shape
        if self.points == "attack":
            return attack_points(images, side)[index]
        if self.points == "random":
            return random_points(len(index), h, w, self.num_points, generator=generator, device=images.device)
        if "corner_mask" in side:
            return side["corner_mask"][index].bool()
        return harris_points(images[index], self.num_points)

    def occlusion(self, images: torch.Tensor, side: Mapping[str, torch.Tensor], index: torch.Tensor,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Sample squares on the chosen rows' points; the other rows get none."""
        dev = images.device
        grid = self.fallback == "gridmask"
        if len(index):
            out = sample_squares(self.point_masks(images, side, index, generator), self.l_range, self.p_range,
                                 self.o_max, generator, self.fallback, max_candidates=self.max_candidates)
            rows = {"squares": out.squares, "valid": out.valid, "fallback_used": out.fallback_used, **(out.grid or {})}
        else:
            rows = {"squares": torch.zeros(0, 0, 3, dtype=torch.long, device=dev),
                    "valid": torch.zeros(0, 0, dtype=torch.bool, device=dev),
                    "fallback_used": torch.zeros(0, dtype=torch.bool, device=dev),
                    **(gridmask_off(0, dev) if grid else {})}
        blank = {key: value.new_zeros((len(images), *value.shape[1:])) for key, value in rows.items()}
        blank.update(gridmask_off(len(images), dev) if grid else {})
        return {key: blank[key].index_copy(0, index, value) for key, value in rows.items()}

    def keep(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """False on the union of each image's squares (and of its fallback grid)."""
        keep = squares_to_keep(params["squares"], params["valid"], height, width)
        return keep & gridmask_keep(params, height, width) if self.fallback == "gridmask" else keep


class AttackPointMask(IncrementalOcclusion):
    """AAPM (Table VI): occlude exactly the attack points, i.e. 1x1 squares, with AdvMask's schedule.

    The parameters are the chosen rows' attack points, ``points`` (B,H,W) bool.
    """

    needs_side = ("attack_mask",)

    def __init__(self, masks: Any = None, *, prob_max: float = 0.8, warmup_epochs: int | None = None,
                 **common: Any) -> None:
        super().__init__(prob_max, warmup_epochs, **common)
        self.masks = mask_source(masks)

    def occlusion(self, images: torch.Tensor, side: Mapping[str, torch.Tensor], index: torch.Tensor,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The attack points of the chosen rows; there is no fallback."""
        points = attack_points(images, side)
        return {"points": torch.zeros_like(points).index_copy(0, index, points[index]),
                "fallback_used": torch.zeros(len(points), dtype=torch.bool, device=points.device)}

    def keep(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Everything but the chosen rows' attack points."""
        return ~params["points"]


AUGMENTS.register("advmask", partial(AdvMask, points="attack"))
AUGMENTS.register("advmask-rp", partial(AdvMask, points="random"))
AUGMENTS.register("advmask-cp", partial(AdvMask, points="corner"))
AUGMENTS.register("aapm", AttackPointMask)
