"""The input-level augmentation interface and its registry (the ``--aug`` family).

Every augmentation keeps parameter sampling apart from application (as Kornia does): ``sample``
draws per-sample parameters with an explicit generator, ``apply`` is a pure function of the
images and those parameters. Images are in [0,1] pixel space because normalization lives inside
the model; "occlude after normalization" (value 0 in normalized space) therefore means "fill with
the dataset mean" here, see :func:`occlude`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from advpipe.data.batch import Batch
from advpipe.registry import Registry


@dataclass(frozen=True)
class AugmentContext:
    """What an augmentation may need to know about the run it is built for."""

    dataset: str
    image_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    epochs: int = 1


class InputAugment:
    """Base class: subclasses implement ``sample`` and ``apply``; ``__call__`` runs both."""

    #: names of ``Batch.side`` entries this augmentation needs (e.g. ``("attack_mask",)``)
    needs_side: tuple[str, ...] = ()

    def sample(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw this batch's random parameters as tensors on the batch's device."""
        raise NotImplementedError

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Apply sampled parameters to (B,C,H,W) images without modifying them in place."""
        raise NotImplementedError

    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Sample parameters for ``batch`` and return the augmented batch."""
        params = self.sample(batch, generator)
        return batch.replace(images=self.apply(batch.images, params))

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Hook for schedules that depend on training progress (default: none)."""

    def epoch_metrics(self) -> dict[str, float]:
        """Statistics gathered since the last call (e.g. fraction augmented), then reset."""
        return {}


class Identity(InputAugment):
    """The ``none`` augmentation: returns the batch unchanged."""

    def sample(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Nothing to sample."""
        return {}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the images unchanged."""
        return images


def box_extent(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (..., H) and columns (..., W) inside (..., 4) end-exclusive (row0, col0, row1, col1) boxes, as bool.

    The one box rasterizer: a box covers pixel (i, j) where ``rows[..., i] & cols[..., j]``.
    """
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_r = (rows >= boxes[..., 0, None]) & (rows < boxes[..., 2, None])
    in_c = (cols >= boxes[..., 1, None]) & (cols < boxes[..., 3, None])
    return in_r, in_c


def occlude(images: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor | tuple[float, ...]) -> torch.Tensor:
    """Return ``images`` with pixels where ``keep`` is 0 set to ``mean`` (zero after normalization).

    ``images`` is (B,C,H,W); ``keep`` is (B,H,W) or (B,1,H,W) bool or float.
    """
    if keep.dim() == 3:
        keep = keep.unsqueeze(1)
    keep = keep.to(images.dtype)
    fill = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * keep + fill * (1 - keep)


AugmentFactory = Callable[..., InputAugment]
AUGMENTS: Registry[AugmentFactory] = Registry("augmentation")
AUGMENTS.register("none", lambda ctx, **options: _no_options(Identity(), options))


def _no_options(aug: InputAugment, options: Mapping[str, Any]) -> InputAugment:
    if options:
        raise TypeError(f"unexpected options {sorted(options)}")
    return aug


def build_augment(name: str, ctx: AugmentContext, **options: Any) -> InputAugment:
    """Create the registered augmentation ``name`` for ``ctx``; unknown options raise."""
    return AUGMENTS.get(name)(ctx, **options)
