"""advpipe: adversarial attacks as data augmentation, from precomputed AdvMask stores to online methods.

The public API, for your own training loop (docs/library.md)::

    import advpipe

    masks = advpipe.open_masks("masks/cifar10-train-resnet20-eps8_255.zarr")   # path, .zip or URL
    aug = advpipe.AdvMask(masks, l=(2, 15), p=(0.2, 0.4), o=0.1, prob_max=0.8)
    aug.set_epoch(epoch, epochs)
    images = aug(images, index, generator=g)     # (B,C,H,W) in [0,1] and their dataset indices

Every name is imported on first use (PEP 562), so ``import advpipe`` loads neither torch nor zarr.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "AdvpipeError": "advpipe.errors",
    # mask stores
    "AttackMasks": "advpipe.api.masks",
    "open_masks": "advpipe.api.masks",
    # augmentations
    "AdvMask": "advpipe.api.augment",
    "Augmentation": "advpipe.api.augment",
    "Cutout": "advpipe.api.augment",
    "GridMask": "advpipe.api.augment",
    "HideAndSeek": "advpipe.api.augment",
    "RandomCropFlip": "advpipe.api.augment",
    "RandomErasing": "advpipe.api.augment",
    "create_augmentation": "advpipe.api.augment",
    "list_augmentations": "advpipe.api.augment",
    # attacks
    "SparseAttackConfig": "advpipe.attacks.sparse",
    "SparseAttackResult": "advpipe.attacks.sparse",
    "sparse_attack": "advpipe.attacks.sparse",
    "fgsm": "advpipe.attacks.dense",
    "mifgsm": "advpipe.attacks.dense",
    "pgd": "advpipe.attacks.dense",
    "apgd": "advpipe.attacks.apgd",
    "apgd_targeted": "advpipe.attacks.apgd",
    "ATTACKS": "advpipe.attacks.registry",
    # precompute from tensors
    "PrecomputeResult": "advpipe.pipeline.precompute_runner",
    "precompute_masks": "advpipe.pipeline.precompute_tensors",
    # models and data
    "Normalized": "advpipe.models.normalize",
    "create_model": "advpipe.api.models",
    "list_models": "advpipe.models.registry",
    "register_model": "advpipe.models.registry",
    "load_model": "advpipe.api.models",
    "IndexedDataset": "advpipe.data.user",
    "load_dataset": "advpipe.data.datasets",
}

#: subpackages reachable as attributes (``advpipe.augment``) without an explicit import
_SUBMODULES = ("api", "attacks", "augment", "data", "eval", "models", "pipeline", "study", "train")

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import a public name, or a subpackage, on first access (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later accesses skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names and subpackages, for completion."""
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
