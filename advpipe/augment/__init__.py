"""Input-level augmentations (the ``--aug`` family); importing this package registers them all."""

from advpipe.augment import advmask, occlusion, points  # noqa: F401  (registration side effects)
from advpipe.augment.base import AUGMENTS, AugmentContext, InputAugment, build_augment, occlude

__all__ = ["AUGMENTS", "AugmentContext", "InputAugment", "build_augment", "occlude", "advmask", "occlusion", "points"]
