"""Previews of an input augmentation: original, attack mask, keep-mask and augmented image per sample.

It sits beside the study and the demo, above training: it parses ``--aug`` (training's
augmentation/method split) and reads mask stores (the pipeline's streaming), which the kernels in
:mod:`advpipe.augment` must not depend on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from advpipe.augment.base import AugmentContext, build_augment
from advpipe.data.datasets import DatasetSplit
from advpipe.errors import AdvpipeError
from advpipe.pipeline.streaming import attack_mask_source
from advpipe.train.compose import parse_aug
from advpipe.eval.images import save_image_grid


@dataclass
class Preview:
    """The rows of a preview grid, each (n,C,H,W) or (n,H,W)."""

    original: torch.Tensor
    attack_mask: torch.Tensor | None
    keep: torch.Tensor
    augmented: torch.Tensor


def preview_augment(name: str, ds: DatasetSplit, *, n: int = 16, masks: str | None = None, seed: int = 0,
                    options: Mapping[str, Any] | None = None) -> Preview:
    """Apply augmentation ``name`` at full strength to the first ``n`` samples of ``ds`` (no crop/flip)."""
    aug_name, method = parse_aug(name)
    if method != "standard":
        raise AdvpipeError(f"aug {name!r}: preview draws input augmentations; {method!r} is a training method "
                           f"whose adversarial inputs depend on a model", fields=("aug",))
    options = dict(options or {})
    ctx = AugmentContext(ds.name, ds.image_shape[1:], ds.num_classes, ds.mean, epochs=1)
    try:
        augment = build_augment(aug_name, ctx, **options)
    except TypeError as exc:
        raise AdvpipeError(f"bad options for {aug_name!r}: {exc}") from exc
    if hasattr(augment, "prob_max"):  # schedules ramp up over training: preview the full strength
        augment.prob_max = 1.0
        augment.set_epoch(0, 1)
    n = min(n, len(ds))
    index = torch.arange(n)
    images = ds.load_images(index).float() / 255
    side: dict[str, torch.Tensor] = {}
    attack_mask = None
    if "attack_mask" in augment.needs_side or masks:
        attack_mask = attack_mask_source(masks, ds, torch.device("cpu"))(index)
        side["attack_mask"] = attack_mask
    out = augment(images, side=side, generator=torch.Generator().manual_seed(seed))
    keep = ~(out != images).any(1)
    return Preview(images, attack_mask, keep, out)


def save_preview(preview: Preview, path: str | Path, title: str) -> Path:
    """Draw a preview as a grid with one column per sample."""
    rows = [preview.original]
    names = ["original"]
    if preview.attack_mask is not None:
        rows.append(preview.attack_mask)
        names.append("attack mask")
    rows += [preview.keep, preview.augmented]
    names += ["keep-mask", "augmented"]
    return save_image_grid(rows, path, row_titles=names, title=title)
