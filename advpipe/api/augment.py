"""Augmentation objects for any training loop: AdvMask and the occlusion baselines on plain tensors.

The objects are the very classes ``advpipe train --aug NAME`` runs (:mod:`advpipe.augment`), so the
output is the same for the same generator state. Each takes a (B,C,H,W) float batch in [0,1] and,
for AdvMask, the samples' dataset indices (their attack masks come from a mask store) or their
masks themselves; nothing of advpipe's ``Batch`` or ``AugmentContext`` is needed::

    aug = advpipe.AdvMask(advpipe.open_masks("masks/c10.zarr"))
    for epoch in range(epochs):
        aug.set_epoch(epoch, epochs)        # the incremental schedule (AdvMask Sec. IV-B)
        for images, labels, index in loader:
            images = aug(images.to(device), index, generator=g)

Like Kornia and torchvision v2, ``sample`` draws the per-image parameters and ``apply`` is a pure
function of the images and those parameters; ``aug(...)`` is both. Randomness comes from
``generator=`` when given, else from the object's own generator (seeded by ``seed``, one per
device), never from the global RNG. Occluded pixels take the dataset mean (zero after the model's
normalization, as the papers occlude): ``mean=`` or the mean of ``dataset``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from advpipe.api.masks import open_masks
from advpipe.augment import AUGMENTS, InputAugment, base
from advpipe.augment.advmask import AdvMask
from advpipe.augment.occlusion import Cutout, GridMask, HideAndSeek, RandomErasing
from advpipe.data.transforms import CropFlipParams, apply_crop_flip, sample_crop_flip
from advpipe.errors import AdvpipeError

__all__ = ["AdvMask", "Augmentation", "Cutout", "GridMask", "HideAndSeek", "InputAugment", "RandomCropFlip",
           "RandomErasing", "create_augmentation", "list_augmentations"]

base.store_opener = open_masks  # masks= may name a store; the augment layer cannot import the stores


def list_augmentations() -> list[str]:
    """Names :func:`create_augmentation` accepts (the ``--aug`` input augmentations)."""
    return AUGMENTS.names()


def create_augmentation(name: str, **options: Any) -> InputAugment:
    """Build any registered augmentation by name (timm's ``create_model`` habit) with its options.

    ``options`` are the augmentation's own (``--aug-opt`` in the CLI) plus ``mean``, ``dataset``,
    ``image_size``, ``seed`` and, for AdvMask and AAPM, ``masks``; unknown ones raise TypeError,
    bad values AdvpipeError.
    """
    return AUGMENTS.get(name)(**options)


def Augmentation(name: str, **options: Any) -> InputAugment:  # noqa: N802  (the old class name)
    """Deprecated alias of :func:`create_augmentation` (the old wrapper class); removed in the next release."""
    warnings.warn("advpipe.Augmentation(name, ...) is deprecated; use advpipe.create_augmentation(name, ...), "
                  "whose objects are the augmentations themselves (advpipe.InputAugment)", DeprecationWarning,
                  stacklevel=2)
    return create_augmentation(name, **options)


class RandomCropFlip:
    """Pad-and-crop plus horizontal flip per image, applied alike to the images and to aligned masks.

    The training loader's transform (:mod:`advpipe.data.transforms`): attack masks must go through
    the same crop and flip as their image to stay on the pixels they mark, so pass them along::

        images, masks = crop(images, store.masks(index, device), generator=g)
        images = aug(images, attack_masks=masks, generator=g)
    """

    def __init__(self, pad: int = 4, flip: bool = True, *, seed: int = 0) -> None:
        """Crop offsets in [0, 2*pad] into the zero-padded image; flip with probability 0.5 if ``flip``."""
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise AdvpipeError(f"pad must be an integer >= 0, got {pad!r}")
        self.pad, self.flip, self.seed = pad, bool(flip), int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def __repr__(self) -> str:
        return f"RandomCropFlip(pad={self.pad}, flip={self.flip})"

    def sample(self, batch_size: int, device: torch.device | str,
               generator: torch.Generator | None = None) -> CropFlipParams:
        """Draw every image's crop offsets and flip flag."""
        if generator is None:
            key = str(torch.device(device))
            generator = self._generators.setdefault(key, torch.Generator(device=device).manual_seed(self.seed))
        return sample_crop_flip(batch_size, pad=self.pad, flip=self.flip, generator=generator, device=device)

    def apply(self, x: torch.Tensor, params: CropFlipParams) -> torch.Tensor:
        """Crop and flip (B,C,H,W) images or (B,H,W) masks of any dtype with these parameters."""
        return apply_crop_flip(x, params)

    def __call__(self, images: torch.Tensor, *aligned: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Crop and flip ``images`` and every tensor in ``aligned`` the same way; one tensor in, one out."""
        params = self.sample(images.shape[0], images.device, generator)
        out = tuple(self.apply(t, params) for t in (images, *aligned))
        return out if aligned else out[0]
