"""The incremental schedule of AdvMask-style augmentations (Yang et al., AdvMask, Sec. IV-B).

"The number of augmented samples grows uniformly with epoch until it reaches a constant upper bound":
:class:`IncrementalOcclusion` chooses which samples of each batch are occluded; its subclasses
(:mod:`advpipe.augment.advmask`) say how.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from advpipe.augment.base import AugmentContext, InputAugment, occlude
from advpipe.augment.occlusion import linear_ramp
from advpipe.data.batch import Batch
from advpipe.errors import AdvpipeError


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
