"""AdvProp: adversarial examples through auxiliary BNs as extra training data (advprop.txt, Xie et al. 2020).

Algorithm 1 of the paper, per batch (x, y):

1. ``x_adv = PGD(x, y)`` attacking the network routed through its *auxiliary* BNs;
2. ``L_c = CE(f_main(x), y)`` with the main BNs, ``L_a = CE(f_aux(x_adv), y)`` with the auxiliary BNs;
3. minimise ``L_a + L_c`` (Eq. 3 with the BN split of Sec. 4.2; a sum, not a mean, as written).

Only BNs are split; every other layer is shared. Evaluation uses the main BNs only
(:meth:`AdvProp.export_state` drops the auxiliary ones); resume keeps both.

Attacker (Sec. 5.1 "Adversarial Attackers"): l_inf PGD with random start, ``eps`` in
{1, 2, 3, 4}/255 chosen per *run* (each row of Tab. 2 is one fixed attacker; nothing in the
paper draws eps per step), ``n = eps + 1`` iterations except ``n = 1`` for ``eps = 1``, step
size ``1/255``. The default is the paper's default attacker PGD5 (eps = 4/255, Sec. 5.3), which
is also what A-FAN's Tab. 4 runs for ResNet-18 on CIFAR-10 (a-fan.txt footnote 3). Small
networks preferred weaker attackers in Tab. 2 (EfficientNet-B0: PGD1, eps = 1).

The attack runs with the model in train mode (batch statistics, as the paper's attacker sees the
training network) routed to the auxiliary BNs; the running statistics are restored after it, so
the auxiliary running averages only see the final adversarial batch, as the main ones only see
the clean batch.

Options (``--method-opt KEY=VALUE`` or ``method_options:``): ``eps`` (``"4/255"``), ``steps``
(default from eps as above), ``step_size`` (``"1/255"``), ``random_start`` (true).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.attacks.registry import ATTACKS
from advpipe.data.batch import Batch
from advpipe.errors import AdvpipeError
from advpipe.models.dual_bn import convert_dual_bn, main_bn_state, preserve_bn_stats, use_aux_bn
from advpipe.models.normalize import unwrap
from advpipe.train.methods import METHODS, Method, MethodContext
from advpipe.train.soft_labels import checked_options, flag_option, fraction_option, positive_int, without_ddp


def paper_steps(eps: float) -> int:
    """AdvProp's iteration count for ``eps``: ``eps*255 + 1``, except 1 for eps = 1/255 (Sec. 5.1)."""
    units = Fraction(eps).limit_denominator(10_000) * 255
    if units.denominator != 1:
        raise AdvpipeError(f"AdvProp eps {eps:g} is not a whole number of 1/255 steps; give steps= explicitly")
    return 1 if units == 1 else int(units) + 1


class AdvProp(Method):
    """AdvProp (advprop.txt Alg. 1): clean loss through main BNs + PGD loss through auxiliary BNs."""

    def __init__(self, *, eps: float, steps: int, step_size: float, random_start: bool) -> None:
        """Build AdvProp with an l_inf PGD attacker of radius ``eps`` (pixels in [0,1])."""
        self.eps, self.steps, self.step_size, self.random_start = eps, steps, step_size, random_start

    def prepare(self, model: nn.Module) -> nn.Module:
        """Give every BatchNorm of the model an auxiliary twin (in place) and return the model."""
        convert_dual_bn(unwrap(model))
        return model

    def step(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Attack through the auxiliary BNs, then return ``L_clean + L_adv`` and the clean logits."""
        x, y = batch.images, batch.labels
        with use_aux_bn(model):
            with preserve_bn_stats(model):
                x_adv = ATTACKS.get("pgd")(without_ddp(model), x, y, eps=self.eps, steps=self.steps,
                                           step=self.step_size, start="random" if self.random_start else "clean",
                                           generator=generator)
            logits_adv = model(x_adv)
        logits = model(x)
        loss_clean = F.cross_entropy(logits.float(), y)
        loss_adv = F.cross_entropy(logits_adv.float(), y)
        adv_acc = (logits_adv.detach().argmax(1) == y).float().mean()
        return {"loss": loss_clean + loss_adv, "loss_clean": loss_clean.detach(), "loss_adv": loss_adv.detach(),
                "adv_acc": adv_acc, "logits": logits}

    def export_state(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """The main-BN state only: what the plain architecture loads for evaluation."""
        return main_bn_state(net)

    def passes(self) -> dict[str, float]:
        """Predicted passes per step in full-batch units: PGD steps + clean and adversarial training passes."""
        return {"forward": self.steps + 2, "backward": 2, "input_backward": self.steps}


@checked_options
def _advprop(ctx: MethodContext, *, eps: Any = "4/255", steps: Any = None, step_size: Any = "1/255",
             random_start: Any = True) -> AdvProp:
    eps_f = fraction_option(eps, "eps")
    return AdvProp(eps=eps_f, steps=paper_steps(eps_f) if steps is None else positive_int(steps, "steps"),
                   step_size=fraction_option(step_size, "step_size"),
                   random_start=flag_option(random_start, "random_start"))


METHODS.register("advprop", _advprop)
