"""Adversarial attacks on [0,1] images: dense l_inf attacks and their per-sample losses."""

from advpipe.attacks.dense import fgsm, least_likely_targets, mifgsm, pgd, random_targets
from advpipe.attacks.losses import LOSSES, AttackLoss, cross_entropy_loss, cw_margin_loss

__all__ = [
    "LOSSES",
    "AttackLoss",
    "cross_entropy_loss",
    "cw_margin_loss",
    "fgsm",
    "least_likely_targets",
    "mifgsm",
    "pgd",
    "random_targets",
]
