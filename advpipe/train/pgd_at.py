"""PGD adversarial training (Madry et al., ICLR 2018): the baseline M2AT compares with (m2at.txt Table 1).

Every step trains on the l_inf PGD adversarial examples of the batch only, with hard labels:
``min E[max_{||δ||∞ <= ε} CE(f(x + δ), y)]``. The attacker runs with the BN statistics frozen
(as M2AT's does), so only the training pass updates them.

Example: ``advpipe train --aug pgd-at --method-opt steps=10 --method-opt eps=8/255``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.attacks.registry import ATTACKS
from advpipe.data.batch import Batch
from advpipe.models.dual_bn import preserve_bn_stats
from advpipe.train.methods import METHODS, Method, MethodContext
from advpipe.train.soft_labels import checked_options, flag_option, fraction_option, positive_int, without_ddp


class PGDTraining(Method):
    """Cross-entropy on PGD adversarial examples (Madry et al. 2018)."""

    def __init__(self, *, eps: float, steps: int, step_size: float, random_start: bool) -> None:
        """An l_inf PGD attacker of ``steps`` steps of ``step_size`` within ``eps``."""
        self.eps, self.steps, self.step_size, self.random_start = eps, steps, step_size, random_start

    def step(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Return the cross-entropy of the model on the batch's PGD adversarial examples."""
        with preserve_bn_stats(model):
            x_adv = ATTACKS.get("pgd")(without_ddp(model), batch.images, batch.labels, eps=self.eps,
                                       steps=self.steps, step=self.step_size,
                                       start="random" if self.random_start else "clean", generator=generator)
        logits = model(x_adv)
        return {"loss": F.cross_entropy(logits, batch.labels), "logits": logits}

    def passes(self) -> dict[str, float]:
        """Predicted passes per step: PGD steps plus one training pass."""
        return {"forward": self.steps + 1, "backward": 1, "input_backward": self.steps}


@checked_options
def _pgd_at(ctx: MethodContext, *, eps: Any = "8/255", steps: Any = 10, step_size: Any = "2/255",
            random_start: Any = True) -> PGDTraining:
    return PGDTraining(eps=fraction_option(eps, "eps"), steps=positive_int(steps, "steps"),
                       step_size=fraction_option(step_size, "step_size"),
                       random_start=flag_option(random_start, "random_start"))


METHODS.register("pgd-at", _pgd_at)
