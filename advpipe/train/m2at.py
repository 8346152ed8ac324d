"""M2AT: Masking and Mixing Adversarial Training (m2at.txt, Adachi et al.).

Per sample (Alg. 1), with ``δ = PGD(x, y) - x`` (PGD-10, eps 8/255, step 2/255, Sec. 5.1):

* masking, Eqs. (7)-(11): a CutMix box from ``λ1 ~ U[0, 1]`` gives the binary mask ``M`` (1 inside);
  ``ξ = x + δ ⊙ M`` is perturbed inside the box, ``ξ̄ = x + δ ⊙ (1 - M)`` outside it;
* labels, Eqs. (12)-(13), with ``λ1'`` the box's area ratio, ``s`` the uniform distribution over
  the K-1 wrong classes and ``y`` one-hot:
  ``t = λ1' y + (1 - λ1') s`` (for ξ) and ``t̄ = λ1' s + (1 - λ1') y`` (for ξ̄);
* mixing, Eqs. (14)-(15), ``λ2 ~ Beta(1, 1)``: ``x̃ = λ2 ξ + (1 - λ2) ξ̄``, ``ỹ = λ2 t + (1 - λ2) t̄``;
* loss: soft-label cross-entropy of ``f(x̃)`` against ``ỹ`` (Alg. 1 line 11). Only ``x̃`` is trained
  on; there is no separate clean term.

What is mixed with what: the *same* image's two partially perturbed copies, never two different
images (unlike Mixup/CutMix). Hence ``x̃ = x + δ ⊙ (λ2 M + (1 - λ2)(1 - M))`` stays in the eps ball
and in [0, 1]. Write ``k = λ2 λ1' + (1 - λ2)(1 - λ1')`` for the share of δ that ``x̃`` keeps.

Label reading (option ``label_reading``). Read literally (``"paper"``, the default), Eqs. (12)-(13)
give the true class the mass ``k``: the *perturbed* share gets ``y``, so a fully perturbed image is
labelled ``y`` and a fully clean one ``s`` (true-class mass 0). ``"clean-true"`` swaps the roles,
true-class mass ``1 - k``: the *clean* share gets ``y``, as in AVmixup, to which the paper says
M2AT reduces when λ1 is 0 or 1 (Sec. 3.3). docs/methods.md gives the argument and the measurements.

Choices where the paper is silent, and why:

* ``r_x1, r_y1`` are integers drawn uniformly from ``{0, ..., W-1}`` / ``{0, ..., H-1}`` (the paper
  says integers in U[0, W]; a corner at W would give an empty box), the box side is
  ``floor(W sqrt(1 - λ1))`` as in CutMix's reference code, and the box is half-open
  ``r_x1 <= j < r_x2`` (Eq. 11's strict inequalities would drop a row and a column and break
  ``λ1' = area / (HW)``); ``λ1'`` is then exactly the mask's mean;
* all of ``λ1``, the box and ``λ2`` are drawn per sample (Alg. 1 draws them inside the per-sample loop);
* PGD starts at a random point in the ball (Madry et al.; the paper cites Madry for Eq. 6) and runs
  with the model in train mode, with the BN running statistics restored afterwards so only the
  training forward of ``x̃`` enters them.

Options: ``eps`` ("8/255"), ``steps`` (10), ``step_size`` ("2/255"), ``alpha`` (1.0: λ2 ~ Beta(α, α)),
``random_start`` (true), ``label_reading`` ("paper" or "clean-true").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advpipe.attacks.registry import ATTACKS
from advpipe.augment.base import box_extent
from advpipe.data.batch import Batch
from advpipe.errors import AdvpipeError
from advpipe.models.dual_bn import preserve_bn_stats
from advpipe.train.methods import METHODS, Method, MethodContext
from advpipe.train.soft_labels import (
    checked_options,
    flag_option,
    fraction_option,
    one_hot,
    positive_int,
    sample_beta,
    soft_cross_entropy,
    without_ddp,
)


def sample_boxes(n: int, height: int, width: int, *, generator: torch.Generator,
                 device: torch.device | str) -> dict[str, torch.Tensor]:
    """Per-sample λ1 ~ U[0,1] and the box of Eqs. (9)-(10): (n,) tensors lam1, x1, y1, x2, y2."""
    lam1 = torch.rand(n, generator=generator, device=device)
    x1 = torch.randint(0, width, (n,), generator=generator, device=device)
    y1 = torch.randint(0, height, (n,), generator=generator, device=device)
    side = (1 - lam1).sqrt()
    x2 = torch.minimum(x1 + (width * side).floor().long(), torch.full_like(x1, width))
    y2 = torch.minimum(y1 + (height * side).floor().long(), torch.full_like(y1, height))
    return {"lam1": lam1, "x1": x1, "y1": y1, "x2": x2, "y2": y2}


def box_masks(boxes: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Eq. (11): (n,H,W) float masks, 1 where ``y1 <= i < y2`` and ``x1 <= j < x2``."""
    corners = torch.stack([boxes["y1"], boxes["x1"], boxes["y2"], boxes["x2"]], -1)
    in_r, in_c = box_extent(corners, height, width)
    return (in_r[:, :, None] & in_c[:, None, :]).float()


#: how Eqs. (12)-(13) are read: which share of the image gets the true class (see the module docstring)
LABEL_READINGS = ("paper", "clean-true")


def m2at_labels(labels: torch.Tensor, area: torch.Tensor, lam2: torch.Tensor, num_classes: int,
                reading: str = "paper") -> torch.Tensor:
    """Eqs. (12)-(13) mixed by Eq. (15): (B,K) soft labels ``λ2 t + (1 - λ2) t̄``.

    ``area`` is λ1', the share of the image inside the box (where ξ carries δ). ``reading="paper"``
    is the equations as printed (``t = λ1' y + (1 - λ1') s``: the perturbed share gets ``y``);
    ``"clean-true"`` gives ``y`` to the clean share instead (``t = λ1' s + (1 - λ1') y``, and
    ``t̄`` alike).
    """
    if reading not in LABEL_READINGS:
        raise AdvpipeError(f"M2AT label_reading must be one of {', '.join(LABEL_READINGS)}, got {reading!r}")
    y = one_hot(labels, num_classes)
    s = (1 - y) / (num_classes - 1)  # the paper's ȳ s: uniform over the wrong classes
    a = area.view(-1, 1).float()
    if reading == "clean-true":
        a = 1 - a  # the share of ξ without δ
    t = a * y + (1 - a) * s
    t_bar = a * s + (1 - a) * y
    w = lam2.view(-1, 1).float()
    return w * t + (1 - w) * t_bar


def m2at_images(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, lam2: torch.Tensor) -> torch.Tensor:
    """Eqs. (7), (8), (14): ``λ2 (x + δ⊙M) + (1 - λ2)(x + δ⊙(1-M))`` for (B,H,W) masks and (B,) λ2."""
    m = mask.unsqueeze(1).to(x.dtype)
    w = lam2.to(x.dtype).view(-1, 1, 1, 1)
    xi = x + delta * m
    xi_bar = x + delta * (1 - m)
    return w * xi + (1 - w) * xi_bar


class M2AT(Method):
    """M2AT (m2at.txt Alg. 1): PGD, CutMix-masked perturbation, self-mixing, smoothed labels."""

    def __init__(self, *, num_classes: int, eps: float, steps: int, step_size: float, alpha: float,
                 random_start: bool, label_reading: str = "paper") -> None:
        """Build M2AT for ``num_classes`` classes with an l_inf PGD attacker."""
        if num_classes < 2:
            raise AdvpipeError("M2AT needs at least 2 classes (its labels spread mass over the wrong ones)")
        if label_reading not in LABEL_READINGS:
            raise AdvpipeError(f"method option label_reading must be one of {', '.join(LABEL_READINGS)}, "
                               f"got {label_reading!r}")
        self.num_classes, self.eps, self.steps, self.step_size = num_classes, eps, steps, step_size
        self.alpha, self.random_start, self.label_reading = alpha, random_start, label_reading

    def step(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Return the soft-label CE of the model on the masked-and-mixed adversarial batch."""
        x, y = batch.images, batch.labels
        with preserve_bn_stats(model):
            x_adv = ATTACKS.get("pgd")(without_ddp(model), x, y, eps=self.eps, steps=self.steps, step=self.step_size,
                                       start="random" if self.random_start else "clean", generator=generator)
        n, _, h, w = x.shape
        boxes = sample_boxes(n, h, w, generator=generator, device=x.device)
        mask = box_masks(boxes, h, w)
        lam2 = sample_beta(n, self.alpha, self.alpha, generator=generator, device=x.device)
        x_mix = m2at_images(x, x_adv - x, mask, lam2)
        targets = m2at_labels(y, mask.mean(dim=(1, 2)), lam2, self.num_classes, self.label_reading)
        logits = model(x_mix)
        loss = soft_cross_entropy(logits, targets)
        return {"loss": loss, "true_mass": targets.gather(1, y.view(-1, 1)).mean(), "logits": logits}

    def passes(self) -> dict[str, float]:
        """Predicted passes per step: PGD steps plus one training pass."""
        return {"forward": self.steps + 1, "backward": 1, "input_backward": self.steps}


@checked_options
def _m2at(ctx: MethodContext, *, eps: Any = "8/255", steps: Any = 10, step_size: Any = "2/255", alpha: Any = 1.0,
          random_start: Any = True, label_reading: Any = "paper") -> M2AT:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise AdvpipeError(f"method option alpha must be a number > 0, got {alpha!r}")
    return M2AT(num_classes=ctx.num_classes, eps=fraction_option(eps, "eps"), steps=positive_int(steps, "steps"),
                step_size=fraction_option(step_size, "step_size"), alpha=float(alpha),
                random_start=flag_option(random_start, "random_start"), label_reading=label_reading)


METHODS.register("m2at", _m2at)
