"""Augmentation objects for any training loop: AdvMask and the occlusion baselines on plain tensors.

Each object wraps the registered kernel that ``advpipe train --aug NAME`` uses
(:mod:`advpipe.augment`), built once, so the output is the same for the same generator state. It
takes a (B,C,H,W) float batch in [0,1] and, for AdvMask, the samples' dataset indices (their
attack masks come from a mask store) or their masks themselves; nothing of advpipe's ``Batch`` or
``AugmentContext`` is needed::

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

import os
from typing import Any, Callable, Mapping, Sequence

import torch

from advpipe.api.masks import AttackMasks, open_masks
from advpipe.augment import AUGMENTS, AugmentContext, build_augment
from advpipe.augment.advmask import DEFAULT_MAX_CANDIDATES
from advpipe.data.batch import Batch
from advpipe.data.datasets import CIFAR10_MEAN, CIFAR100_MEAN, IMAGENET_MEAN, dataset_family
from advpipe.data.transforms import CropFlipParams, apply_crop_flip, sample_crop_flip
from advpipe.errors import AdvpipeError

__all__ = ["AdvMask", "Augmentation", "Cutout", "GridMask", "HideAndSeek", "RandomCropFlip", "RandomErasing",
           "create_augmentation", "list_augmentations"]

#: datasets whose mean fills occluded pixels when no ``mean`` is given
DATASET_MEANS = {"cifar10": CIFAR10_MEAN, "cifar100": CIFAR100_MEAN, "imagenet": IMAGENET_MEAN}
_POINTS = {"attack": "advmask", "random": "advmask-rp", "corner": "advmask-cp"}

MaskSource = Callable[[torch.Tensor], torch.Tensor]


def list_augmentations() -> list[str]:
    """Names :func:`create_augmentation` accepts (the ``--aug`` input augmentations)."""
    return AUGMENTS.names()


def _mean(mean: float | Sequence[float] | None, dataset: str) -> tuple[float, ...]:
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


def _mask_source(masks: Any) -> MaskSource | None:
    """An index -> (B,H,W) masks callable from a store, a location, a (N,H,W) tensor or a callable."""
    if masks is None or isinstance(masks, AttackMasks):
        return masks
    if isinstance(masks, (str, os.PathLike)):
        return open_masks(masks)
    if isinstance(masks, torch.Tensor):
        if masks.dim() != 3:
            raise AdvpipeError(f"masks as a tensor must be (N,H,W), got shape {tuple(masks.shape)}")
        table = masks.bool()
        return lambda index: table[index.to(table.device)]
    if callable(masks):
        return masks
    raise AdvpipeError(f"masks must be a mask store (advpipe.open_masks), its location, an (N,H,W) tensor or a "
                       f"callable index -> masks, got {type(masks).__name__}")


class Augmentation:
    """A registered input augmentation (``list_augmentations()``) as an object for plain tensors.

    ``options`` are the augmentation's own (``--aug-opt`` in the CLI); unknown ones raise
    TypeError, bad values AdvpipeError. ``dataset`` and ``image_size`` only choose the defaults the
    papers give per dataset or in pixels (e.g. Cutout's 16 px on 32x32 CIFAR-10, 8 on CIFAR-100);
    the objects work on any image size. ``masks``: where AdvMask/AAPM take attack masks from.
    """

    def __init__(self, name: str, *, masks: Any = None, mean: float | Sequence[float] | None = None,
                 dataset: str = "cifar10", image_size: int | tuple[int, int] = 32, seed: int = 0,
                 **options: Any) -> None:
        """Build augmentation ``name`` with ``options`` (see the class docstring)."""
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            raise AdvpipeError(f"image_size must be a positive int or (H, W), got {image_size!r}")
        self.name, self.seed, self.options = name, int(seed), options
        ctx = AugmentContext(dataset, size, 0, _mean(mean, dataset), epochs=1)
        self.augmentation = build_augment(name, ctx, **options)
        self.needs_masks = "attack_mask" in self.augmentation.needs_side
        self._masks = _mask_source(masks)
        self._generators: dict[str, torch.Generator] = {}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
        return f"{type(self).__name__}({options})" if type(self) is not Augmentation else \
            f"Augmentation({self.name!r}{', ' if options else ''}{options})"

    def _generator(self, device: torch.device, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _batch(self, images: torch.Tensor, indices: Any, attack_masks: torch.Tensor | None) -> Batch:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise AdvpipeError(f"images must be a (B,C,H,W) float tensor in [0,1], got "
                               f"{getattr(images, 'dtype', type(images).__name__)} of shape "
                               f"{tuple(getattr(images, 'shape', ()))}")
        b, dev = images.shape[0], images.device
        given = None if indices is None else torch.as_tensor(indices)
        if given is not None and given.shape != (b,):
            raise AdvpipeError(f"indices must have shape ({b},) for these images, got {tuple(given.shape)}")
        index = torch.arange(b, device=dev) if given is None else given.long().to(dev)
        side: dict[str, torch.Tensor] = {}
        if self.needs_masks:
            if attack_masks is None:
                if self._masks is None or given is None:
                    raise AdvpipeError(f"{self.name} needs attack masks: build it with masks=STORE and pass the "
                                       "images' dataset indices, or pass attack_masks=(B,H,W) per call")
                # a store checks and looks up the indices where they are (a loader's, on the CPU: no
                # device sync) and returns the masks on the images' device
                attack_masks = self._masks.masks(given, dev) if isinstance(self._masks, AttackMasks) \
                    else self._masks(index)
            side["attack_mask"] = attack_masks.to(dev).bool()
        return Batch(images, torch.zeros(b, dtype=torch.long, device=dev), index, side)

    def sample(self, images: torch.Tensor, indices: Any = None, *, attack_masks: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw the per-image parameters for ``images`` (tensors on their device) without applying them."""
        batch = self._batch(images, indices, attack_masks)
        return self.augmentation.sample(batch, self._generator(images.device, generator))

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Apply parameters from :meth:`sample` to ``images``; returns a new tensor (the input is untouched)."""
        return self.augmentation.apply(images, params)

    def __call__(self, images: torch.Tensor, indices: Any = None, *, attack_masks: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a (B,C,H,W) batch in [0,1]; ``indices`` are the samples' dataset indices (for the masks)."""
        return self.apply(images, self.sample(images, indices, attack_masks=attack_masks, generator=generator))

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Set the schedule for 0-based ``epoch`` of ``epochs`` (AdvMask's and GridMask's ramps; else no-op)."""
        self.augmentation.set_epoch(epoch, epochs)

    def epoch_metrics(self) -> dict[str, float]:
        """Statistics since the last call, then reset (AdvMask: fraction augmented, masked ratio, fallback rate)."""
        return self.augmentation.epoch_metrics()


def create_augmentation(name: str, **kwargs: Any) -> Augmentation:
    """Build any registered augmentation by name (timm's ``create_model`` habit); see :class:`Augmentation`."""
    return Augmentation(name, **kwargs)


class AdvMask(Augmentation):
    """AdvMask (Yang et al., "AdvMask: A Sparse Adversarial Attack Based Data Augmentation Method", Sec. III-B).

    Per image, squares of side ``l ~ U{l}`` are centred on the attack points until they hide a
    ratio ``p ~ U[p]`` of the image, pairwise overlaps bounded by ``o`` (Eqs. 7-11); the
    incremental schedule (Sec. IV-B) occludes a fraction ``prob_max * min(1, (e+1)/warmup)`` of
    every batch in epoch ``e`` (call :meth:`set_epoch`; without it the fraction is ``prob_max``).
    ``l``, ``p``, ``o`` default to the paper's settings for ``dataset`` (CIFAR-10: (2, 15),
    (0.2, 0.4), 0.1; CIFAR-100: (5, 20), (0.06, 0.5), 0.2; sides scaled to ``image_size``).
    ``points="random"`` / ``"corner"`` are the RP / CP ablations of Table V (no masks needed).

    Example::

        aug = AdvMask(open_masks("masks/c10.zarr"), prob_max=0.8)
        aug.set_epoch(epoch, epochs)
        images = aug(images, index, generator=g)     # (B,C,H,W) in [0,1], dataset indices (B,)
    """

    def __init__(self, masks: Any = None, *, l: Sequence[int] | None = None, p: Sequence[float] | None = None,
                 o: float | None = None, prob_max: float = 0.8, warmup_epochs: int | None = None,
                 fallback: str = "random", max_candidates: int = DEFAULT_MAX_CANDIDATES, points: str = "attack",
                 num_points: int | None = None, mean: float | Sequence[float] | None = None, dataset: str = "cifar10",
                 image_size: int | tuple[int, int] = 32, seed: int = 0) -> None:
        """Build AdvMask; ``masks``: a store (:func:`advpipe.open_masks`), its location, (N,H,W) masks or a callable."""
        if points not in _POINTS:
            raise AdvpipeError(f"points must be one of {', '.join(_POINTS)}, got {points!r}")
        if points == "attack" and num_points is not None:
            raise AdvpipeError("num_points is for points='random' or 'corner'; AdvMask's points are the attack's")
        extra = {} if num_points is None else {"num_points": num_points}  # RP and CP default to 100
        super().__init__(_POINTS[points], masks=masks, mean=mean, dataset=dataset, image_size=image_size, seed=seed,
                         l=l, p=p, o=o, prob_max=prob_max, warmup_epochs=warmup_epochs, fallback=fallback,
                         max_candidates=max_candidates, **extra)

    @property
    def fraction(self) -> float:
        """The fraction of each batch occluded in the current epoch."""
        return self.augmentation.fraction


class Cutout(Augmentation):
    """Cutout (DeVries & Taylor 2017): one ``size`` x ``size`` square per image at a uniform centre, clipped.

    ``size`` defaults to 16 on CIFAR-10, 8 on CIFAR-100 (scaled to ``image_size``).
    """

    def __init__(self, size: int | None = None, *, mean: float | Sequence[float] | None = None,
                 dataset: str = "cifar10", image_size: int | tuple[int, int] = 32, seed: int = 0) -> None:
        """Build Cutout."""
        super().__init__("cutout", mean=mean, dataset=dataset, image_size=image_size, seed=seed, size=size)


class RandomErasing(Augmentation):
    """Random Erasing (Zhong et al., AAAI 2020, Alg. 1): with probability ``prob`` one random rectangle per image.

    Target area ``U[area]`` of the image, aspect ``U[aspect]``; ``fill="random"`` (per-pixel noise,
    the paper) or ``"mean"``. Unlike torchvision's (one rectangle per batch), every image draws its own.
    """

    def __init__(self, prob: float = 0.5, *, area: Sequence[float] = (0.02, 0.4),
                 aspect: Sequence[float] = (0.3, 1 / 0.3), attempts: int = 10, fill: str = "random",
                 mean: float | Sequence[float] | None = None, dataset: str = "cifar10",
                 image_size: int | tuple[int, int] = 32, seed: int = 0) -> None:
        """Build Random Erasing."""
        super().__init__("random-erasing", mean=mean, dataset=dataset, image_size=image_size, seed=seed, prob=prob,
                         area=area, aspect=aspect, attempts=attempts, fill=fill)


class HideAndSeek(Augmentation):
    """Hide-and-Seek (Singh & Lee, ICCV 2017): a grid of patches per image, each hidden with ``hide_prob``.

    The patch size is drawn per image from ``grid_sizes`` (default {0, 4, 8, 16} on 32x32; 0 hides nothing).
    """

    def __init__(self, grid_sizes: Sequence[int] | None = None, *, hide_prob: float = 0.5,
                 mean: float | Sequence[float] | None = None, dataset: str = "cifar10",
                 image_size: int | tuple[int, int] = 32, seed: int = 0) -> None:
        """Build Hide-and-Seek."""
        super().__init__("hide-and-seek", mean=mean, dataset=dataset, image_size=image_size, seed=seed,
                         grid_sizes=grid_sizes, hide_prob=hide_prob)


class GridMask(Augmentation):
    """GridMask (Chen et al. 2020) with its CIFAR settings and probability ramp (call :meth:`set_epoch`).

    Unit ``d ~ U{d}`` (default 24-32 on 32x32), kept ``ratio`` 0.4, applied with probability
    ``prob * min(1, (e+1)/warmup)`` in epoch ``e``.
    """

    def __init__(self, d: Sequence[int] | None = None, *, ratio: float = 0.4, rotate: int = 1, prob: float = 0.8,
                 warmup_epochs: int | None = None, mean: float | Sequence[float] | None = None,
                 dataset: str = "cifar10", image_size: int | tuple[int, int] = 32, seed: int = 0) -> None:
        """Build GridMask."""
        super().__init__("gridmask", mean=mean, dataset=dataset, image_size=image_size, seed=seed, d=d, ratio=ratio,
                         rotate=rotate, prob=prob, warmup_epochs=warmup_epochs)


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
