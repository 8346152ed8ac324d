"""What the sparse AdvMask attack returns: :class:`SparseAttackResult` per batch and :class:`StepInfo` per step.

Example::

    res = sparse_attack(model, x, y, SparseAttackConfig(), generator=g)
    res.summary()["asr"], res.adversarial(x)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from advpipe.attacks.norms import NORM_NAMES, perturbation_norms, summarize_norms


@dataclass
class SparseAttackResult:
    """Per-image output of :func:`sparse_attack` (all tensors on the input's device).

    ``mask`` is the binary attack mask ``m > 0.5`` (B,H,W); ``delta`` (B,C,H,W) is the perturbation
    it selects from, so the attack is ``clamp(x + delta * mask, 0, 1)`` (see :meth:`adversarial`).
    ``soft_mask`` (B,H,W) is the final iterate's ``sigmoid(alpha_max * H(delta))``, for inspection.
    Norms are those of ``delta * mask``: ``l0_elements`` counts non-zero entries over C*H*W,
    ``l0_pixels`` counts pixels with any non-zero channel. ``success`` is checked in float32:
    misclassified (untargeted) or classified as ``targets`` (targeted). ``loss`` is Eq. (4) at the
    last optimisation step. ``best_step`` is the step whose mask was kept (``steps`` = the final
    iterate; with keep_best, failures report the final iterate too).
    """

    mask: torch.Tensor
    delta: torch.Tensor
    soft_mask: torch.Tensor
    success: torch.Tensor
    l0_elements: torch.Tensor
    l0_pixels: torch.Tensor
    l2: torch.Tensor
    linf: torch.Tensor
    loss: torch.Tensor
    l_init: torch.Tensor
    init_success: torch.Tensor
    clean_correct: torch.Tensor
    best_step: torch.Tensor
    targets: torch.Tensor | None
    config: dict[str, Any]

    def perturbation(self) -> torch.Tensor:
        """The applied perturbation ``delta * mask`` (B,C,H,W)."""
        return self.delta * self.mask.unsqueeze(1).to(self.delta.dtype)

    def adversarial(self, x: torch.Tensor) -> torch.Tensor:
        """The attacked images ``clamp(x + delta * mask, 0, 1)``."""
        return (x + self.perturbation().to(x.dtype)).clamp(0, 1)

    def summary(self) -> dict[str, float]:
        """ASR and mean norms over successful images (the convention of advmask.txt Table III).

        Computed by :func:`advpipe.attacks.norms.summarize_norms`, as the mask store and the
        evaluation do (median of an even count: the mean of the two middle values); an empty
        batch, or no success, gives NaN.
        """
        stats = summarize_norms({name: getattr(self, name) for name in NORM_NAMES}, self.success)
        init = summarize_norms({}, self.init_success)

        def value(v: float | None) -> float:
            return float("nan") if v is None else float(v)

        return {
            "n": stats["n"],
            "asr": value(stats["asr"]),
            "l0_elements": value(stats["l0_elements"]["mean"]),
            "l0_elements_median": value(stats["l0_elements"]["median"]),
            "l0_pixels": value(stats["l0_pixels"]["mean"]),
            "l2": value(stats["l2"]["mean"]),
            "linf": value(stats["linf"]["mean"]),
            "init_asr": value(init["asr"]),
        }


@dataclass
class StepInfo:
    """What ``on_step`` sees after optimisation step ``step``: the delta and soft mask (B,H,W) it used.

    ``soft_success`` is the success of that step's forward (soft mask, or binary mask with
    ``straight_through``), in the optimisation precision; ``lambda_multiplier`` is the adaptive
    rule's factor after its update (None for the paper's rule).
    """

    step: int
    alpha: float
    delta: torch.Tensor
    soft_mask: torch.Tensor
    soft_success: torch.Tensor
    loss: torch.Tensor
    lambda_multiplier: torch.Tensor | None


def result_from(mask: torch.Tensor, delta: torch.Tensor, **fields: Any) -> SparseAttackResult:
    """Assemble a result; the norms are measured on the applied perturbation ``delta * mask``."""
    norms = perturbation_norms(delta * mask.unsqueeze(1).to(delta.dtype))
    return SparseAttackResult(mask=mask, delta=delta, l0_elements=norms["l0_elements"].long(),
                              l0_pixels=norms["l0_pixels"].long(), l2=norms["l2"], linf=norms["linf"], **fields)


def empty_result(x: torch.Tensor, targeted: bool, config: dict[str, Any]) -> SparseAttackResult:
    """The result for a batch of zero images."""
    h, w = x.shape[2:]
    zf = torch.zeros(0, device=x.device)
    zb = torch.zeros(0, dtype=torch.bool, device=x.device)
    zl = torch.zeros(0, dtype=torch.long, device=x.device)
    return result_from(
        torch.zeros((0, h, w), dtype=torch.bool, device=x.device), torch.zeros_like(x),
        soft_mask=torch.zeros((0, h, w), device=x.device), success=zb, loss=zf, l_init=zf, init_success=zb,
        clean_correct=zb, best_step=zl, targets=zl if targeted else None, config=config,
    )
