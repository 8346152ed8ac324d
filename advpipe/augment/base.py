"""The input-level augmentation interface and its registry (the ``--aug`` family).

Every augmentation keeps parameter sampling apart from application, as Kornia and torchvision v2 do:
``sample(images, *, side, generator)`` draws every image's own small parameters (boxes, centres,
square lists) with an explicit generator, and ``apply(images, params)`` is a pure function of the
images and those parameters; ``aug(images, ...)`` runs both. The same objects serve the training
loop (``aug(batch.images, side=batch.side, generator=g)``) and the Python API
(``advpipe.AdvMask(masks)(images, index, generator=g)``). Images are (B,C,H,W) floats in [0,1]
because normalization lives inside the model; "occlude after normalization" (value 0 in normalized
space) therefore means "fill with the dataset mean" here, see :func:`occlude`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import torch

from advpipe.data.datasets import CIFAR10_MEAN, CIFAR100_MEAN, IMAGENET_MEAN, dataset_family
from advpipe.data.loader import SideSource
from advpipe.errors import AdvpipeError
from advpipe.registry import Registry

#: datasets whose mean fills occluded pixels when no ``mean`` is given
DATASET_MEANS = {"cifar10": CIFAR10_MEAN, "cifar100": CIFAR100_MEAN, "imagenet": IMAGENET_MEAN}
#: turns a mask store location (str or PathLike) into a mask source; the Python API sets it to
#: ``advpipe.open_masks`` (this layer may not import the stores), see :mod:`advpipe.api.augment`
store_opener: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class AugmentContext:
    """What the training loop knows about the run an augmentation is built for (see :func:`build_augment`)."""

    dataset: str
    image_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    epochs: int = 1


def resolve_mean(mean: float | Sequence[float] | None, dataset: str) -> tuple[float, ...]:
    """The fill value per channel: ``mean`` checked to lie in [0,1], or the known mean of ``dataset``."""
    if mean is None:
        family = dataset_family(dataset)
        if family not in DATASET_MEANS:
            raise AdvpipeError(f"no known mean for dataset {dataset!r}; pass mean=(r, g, b) in [0,1] "
                               f"(known: {', '.join(DATASET_MEANS)})")
        return DATASET_MEANS[family]
    values = (float(mean),) if isinstance(mean, (int, float)) else tuple(float(v) for v in mean)
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise AdvpipeError(f"mean must be one value or one per channel, each in [0,1], got {mean!r}")
    return values


def mask_source(masks: Any) -> Callable[[torch.Tensor, torch.device], torch.Tensor] | None:
    """An (indices, device) -> (B,H,W) masks lookup from a store, its location, an (N,H,W) tensor or a callable."""
    if isinstance(masks, (str, os.PathLike)) and store_opener is not None:
        masks = store_opener(masks)
    if masks is None:
        return None
    if callable(getattr(masks, "masks", None)):  # a store (advpipe.open_masks): looks up the indices where they are
        return lambda index, device: masks.masks(index, device)
    if isinstance(masks, torch.Tensor):
        if masks.dim() != 3:
            raise AdvpipeError(f"masks as a tensor must be (N,H,W), got shape {tuple(masks.shape)}")
        table = masks.bool()
        return lambda index, device: table[index.long().to(table.device)].to(device)
    if callable(masks):
        return lambda index, device: masks(index.long().to(device))
    raise AdvpipeError(f"masks must be a mask store (advpipe.open_masks), its location, an (N,H,W) tensor or a "
                       f"callable index -> masks, got {type(masks).__name__}")


class InputAugment:
    """Base class: subclasses implement ``make_params`` (the draws) and ``apply`` (pure); ``__call__`` runs both.

    Every augmentation also takes ``mean`` (the fill, default: the known mean of ``dataset``),
    ``dataset`` and ``image_size`` (which only choose the defaults the papers give per dataset or in
    pixels) and ``seed`` (of the object's own generator, one per device, used when a call passes
    none; the global RNG is never touched).
    """

    #: names of ``side`` entries this augmentation needs (e.g. ``("attack_mask",)``)
    needs_side: tuple[str, ...] = ()
    #: side sources this augmentation computes itself (CP's corners); the training loop hands them to the loader
    own_side: Mapping[str, SideSource] = MappingProxyType({})

    def __init__(self, *, mean: float | Sequence[float] | None = None, dataset: str = "cifar10",
                 image_size: int | Sequence[int] = 32, seed: int = 0) -> None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            raise AdvpipeError(f"image_size must be a positive int or (H, W), got {image_size!r}")
        self.mean, self.dataset, self.image_size, self.seed = resolve_mean(mean, dataset), dataset, size, int(seed)
        self.masks: Callable[[torch.Tensor, torch.device], torch.Tensor] | None = None
        self._generators: dict[str, torch.Generator] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dataset={self.dataset!r}, image_size={self.image_size})"

    def make_params(self, images: torch.Tensor, side: Mapping[str, torch.Tensor],
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw every image's parameters as (B, ...) tensors on the images' device (the subclass's part)."""
        raise NotImplementedError

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Apply sampled parameters to (B,C,H,W) images; returns a new tensor (the input is untouched)."""
        raise NotImplementedError

    def sample(self, images: torch.Tensor, indices: Any = None, *, side: Mapping[str, torch.Tensor] | None = None,
               attack_masks: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw the parameters for (B,C,H,W) ``images`` in [0,1] without applying them.

        ``side`` holds per-image side data (``attack_mask`` (B,H,W), CP's ``corner_mask``);
        ``attack_masks`` is short for ``side={"attack_mask": ...}``; ``indices`` (B,) are the images'
        dataset indices, which look the attack masks up in ``masks=`` when ``side`` has none.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise AdvpipeError(f"images must be a (B,C,H,W) float tensor in [0,1], got "
                               f"{getattr(images, 'dtype', type(images).__name__)} of shape "
                               f"{tuple(getattr(images, 'shape', ()))}")
        side = dict(side or {})
        if attack_masks is not None:
            side["attack_mask"] = attack_masks.to(images.device)
        if indices is not None:
            given = torch.as_tensor(indices)
            if given.shape != (len(images),):
                raise AdvpipeError(f"indices must have shape ({len(images)},) for these images, "
                                   f"got {tuple(given.shape)}")
            if "attack_mask" in self.needs_side and "attack_mask" not in side and self.masks is not None:
                side["attack_mask"] = self.masks(given, images.device)
        if generator is None:
            key = str(images.device)
            if key not in self._generators:
                self._generators[key] = torch.Generator(device=images.device).manual_seed(self.seed)
            generator = self._generators[key]
        return self.make_params(images, side, generator)

    def __call__(self, images: torch.Tensor, indices: Any = None, *, side: Mapping[str, torch.Tensor] | None = None,
                 attack_masks: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment (B,C,H,W) ``images`` in [0,1]: :meth:`sample`, then :meth:`apply`."""
        return self.apply(images, self.sample(images, indices, side=side, attack_masks=attack_masks,
                                              generator=generator))

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Set the schedule for 0-based ``epoch`` of ``epochs`` (AdvMask's and GridMask's ramps; default: none)."""

    def epoch_metrics(self) -> dict[str, float]:
        """Statistics gathered by calls since the last one (e.g. fraction augmented), then reset."""
        return {}


class Identity(InputAugment):
    """The ``none`` augmentation: returns the images unchanged."""

    def make_params(self, images: torch.Tensor, side: Mapping[str, torch.Tensor],
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Nothing to draw."""
        return {}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the images unchanged."""
        return images


class Occlusion(InputAugment):
    """An augmentation whose parameters describe a keep mask; occluded pixels take the dataset mean."""

    def keep(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Turn sampled parameters into a (B,H,W) bool keep mask (False = occluded)."""
        raise NotImplementedError

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fill the pixels the parameters occlude with the dataset mean."""
        return occlude(images, self.keep(params, images.shape[-2], images.shape[-1]), self.mean)


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


#: name -> augmentation class (or factory) taking its own options plus ``mean``, ``dataset``, ``image_size``
AUGMENTS: Registry[Callable[..., InputAugment]] = Registry("augmentation")
AUGMENTS.register("none", Identity)


def build_augment(name: str, ctx: AugmentContext, **options: Any) -> InputAugment:
    """Create the registered augmentation ``name`` for the run ``ctx`` describes; unknown options raise TypeError."""
    aug = AUGMENTS.get(name)(mean=ctx.mean, dataset=ctx.dataset, image_size=tuple(int(v) for v in ctx.image_size),
                             **options)
    aug.set_epoch(0, ctx.epochs)
    return aug
