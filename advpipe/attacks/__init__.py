"""Adversarial attacks on [0,1] images: dense l_inf attacks, their per-sample losses and the attack registry."""

from advpipe.attacks.dense import (
    fgsm,
    least_likely_targets,
    mifgsm,
    pgd,
    random_targets,
)
from advpipe.attacks.losses import (
    LOSSES,
    AttackLoss,
    cross_entropy_loss,
    cw_margin_loss,
)
from advpipe.attacks.registry import ATTACKS, AttackKind

__all__ = [
    "ATTACKS",
    "LOSSES",
    "AttackKind",
    "AttackLoss",
    "cross_entropy_loss",
    "cw_margin_loss",
    "fgsm",
    "least_likely_targets",
    "mifgsm",
    "pgd",
    "random_targets",
]
