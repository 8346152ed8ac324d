"""Per-sample attack objectives: every loss here is a quantity the attacker *ascends*.

Convention (shared by all attacks in :mod:`advpipe.attacks`): a loss takes ``logits`` (B,K) and
labels ``y`` (B,) and returns a float32 (B,) tensor. Untargeted, ``y`` is the true class and a
larger value means "further from y". Targeted, ``y`` is the target class and the sign is flipped
inside the loss, so the attack code never branches on ``targeted``: ascending the targeted loss is
descending the loss to the target. Logits are cast to float32 first because callers may run the
model under ``torch.autocast`` (bf16/fp16 logits would make the margins and log-softmax coarse).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from advpipe.registry import Registry


class AttackLoss(Protocol):
    """Signature of a registered attack loss: per-sample (B,) float32 values to ascend."""

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, *, targeted: bool = False) -> torch.Tensor: ...


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor, *, targeted: bool = False) -> torch.Tensor:
    """Per-sample cross-entropy to ascend: CE(logits, y) untargeted, -CE(logits, target) targeted.

    This is the loss of FGSM (Goodfellow et al., 2015; m2at.txt Eq. 5), PGD (Madry et al., 2018;
    m2at.txt Eq. 6, a-fan.txt Eq. 2) and targeted FGSM (m-tlat.txt Eq. 5, where the minus sign of
    the step is the sign here).
    """
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    return -ce if targeted else ce


def cw_margin_loss(
    logits: torch.Tensor, y: torch.Tensor, *, targeted: bool = False, kappa: float = 0.0
) -> torch.Tensor:
    """Per-sample Carlini-Wagner logit margin to ascend, capped at ``kappa`` (C&W 2017, f6).

    Untargeted: ``min(max_{j!=y} z_j - z_y, kappa)``; targeted (``y`` = target t):
    ``min(z_t - max_{j!=t} z_j, kappa)``. C&W minimise ``max(-margin, -kappa)``; we return its
    negation so that, like every loss here, the attacker ascends it. Once a sample is misclassified
    (or reaches the target) with confidence ``kappa`` its gradient is zero, so it stops moving.
    """
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0, got {kappa}")
    z = logits.float()
    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
    # -inf at the label column so the max runs over the other classes only.
    z_other = z.scatter(1, y.unsqueeze(1), float("-inf")).amax(dim=1)
    margin = z_y - z_other if targeted else z_other - z_y
    return margin.clamp(max=kappa)


LOSSES: Registry[AttackLoss] = Registry("attack loss")
LOSSES.register("ce", cross_entropy_loss)
LOSSES.register("cw", cw_margin_loss)
