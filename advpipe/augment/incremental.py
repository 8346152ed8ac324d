"""The incremental schedule of AdvMask-style augmentations (Yang et al., AdvMask, Sec. IV-B).

"The number of augmented samples grows uniformly with epoch until it reaches a constant upper bound":
:class:`IncrementalOcclusion` chooses which samples of each batch are occluded; its subclasses
(:mod:`advpipe.augment.advmask`) say how.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from advpipe.augment.base import Occlusion, occlude
from advpipe.augment.occlusion import linear_ramp
from advpipe.augment.points import attack_points
from advpipe.errors import AdvpipeError


class IncrementalOcclusion(Occlusion):
    """Base of AdvMask-style augmentations with the paper's incremental schedule (Sec. IV-B).

    In 0-based epoch ``e`` of a ``warmup``-epoch ramp, a fraction ``f = prob_max * min(1, (e+1)/warmup)``
    of every batch is occluded: ``floor(f * B + u)`` samples with ``u ~ U[0,1)`` (unbiased for any
    batch size), chosen uniformly without replacement with the generator. Subclasses implement
    :meth:`occlusion` (the chosen samples' parameters) and :meth:`keep`. Calls (``aug(images, ...)``)
    gather the statistics :meth:`epoch_metrics` reports; :meth:`sample` and :meth:`apply` alone do not.
    """

    def __init__(self, prob_max: float, warmup_epochs: int | None, **common: Any) -> None:
        super().__init__(**common)
        if not 0.0 <= prob_max <= 1.0:
            raise AdvpipeError(f"prob_max must be in [0, 1], got {prob_max!r}")
        if warmup_epochs is not None and int(warmup_epochs) < 1:
            raise AdvpipeError(f"warmup_epochs must be >= 1, got {warmup_epochs!r}")
        self.prob_max = float(prob_max)
        self.warmup_epochs = None if warmup_epochs is None else int(warmup_epochs)
        self.fraction = 0.0
        self.set_epoch(0, 1)
        self._stats: dict[str, Any] = {}

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Set the fraction of each batch to occlude for 0-based ``epoch`` of ``epochs``."""
        self.fraction = linear_ramp(self.prob_max, epoch, self.warmup_epochs or epochs)

    def occlusion(self, images: torch.Tensor, side: Mapping[str, torch.Tensor], index: torch.Tensor,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        """(B, ...) parameters that occlude the rows in ``index`` and nothing else, with ``fallback_used`` (B,)."""
        raise NotImplementedError

    def select(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Choose which samples of a batch get occluded this step: (B,) bool."""
        u = torch.rand(batch_size + 1, generator=generator, device=device)
        rank = u[:batch_size].argsort().argsort()
        return rank < (self.fraction * batch_size + u[batch_size]).floor()

    def make_params(self, images: torch.Tensor, side: Mapping[str, torch.Tensor],
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Pick the samples to occlude (``selected`` (B,)) and draw their parameters; others keep every pixel."""
        if "attack_mask" in self.needs_side:
            attack_points(images, side)  # checked on every step, even one that occludes nothing
        selected = self.select(len(images), generator, images.device)
        return {"selected": selected, **self.occlusion(images, side, selected.nonzero().squeeze(1), generator)}

    def __call__(self, images: torch.Tensor, indices: Any = None, *, side: Mapping[str, torch.Tensor] | None = None,
                 attack_masks: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample, record this batch's statistics, and occlude (the dataset mean fills occluded pixels, Eq. 7)."""
        params = self.sample(images, indices, side=side, attack_masks=attack_masks, generator=generator)
        keep = self.keep(params, images.shape[-2], images.shape[-1])
        self._record(params["selected"], keep, params["fallback_used"])
        return occlude(images, keep, self.mean)

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
