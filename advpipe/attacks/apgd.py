"""Auto-PGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): APGD-CE, APGD-DLR and the targeted APGD-T, l_inf.

APGD is PGD with momentum and a step size that halves at checkpoints when progress stalls:

* step ``eta = 2 eps`` at first; ``z = P(x_k + eta sign(grad))``,
  ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))`` with alpha = 0.75 (1 for
  the first step), P the projection onto the eps ball and [0, 1] (Croce & Hein Alg. 1);
* checkpoints after 22% of the steps, then periods shrinking by 3% of the steps down to 6%; at
  each, a sample halves its step and restarts from its best point when the loss rose in at most
  rho = 75% of the period's steps, or when its step was not halved at the last checkpoint and its
  best loss has not improved since (condition 2 is skipped at the first checkpoint, as in the
  authors' implementation);
* the start is ``x + eps * t / max|t|``, t uniform in [-1, 1] (the authors' Linf start).

A sample counts as broken if *any* iterate is misclassified; the attack returns that iterate for
broken samples and the highest-loss iterate otherwise (clean-misclassified samples come back
unchanged). Restarts attack only the samples not broken yet. APGD-T runs the targeted DLR loss
towards each of the ``targets`` classes with the highest clean logits after the top one, on the
samples still unbroken. The loss, projection, sign step and gradient come from the shared attack
primitives (:mod:`advpipe.attacks.primitives`, :mod:`advpipe.attacks.losses`); the same contract holds:
[0,1] outputs in the eps ball, model mode untouched, randomness only from ``generator``.

Example::

    g = torch.Generator(device=x.device).manual_seed(0)
    x_adv = apgd(model, x, y, eps=8 / 255, steps=100, loss="ce", generator=g)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from advpipe.attacks.losses import LOSSES
from advpipe.attacks.primitives import (
    check_inputs,
    input_grad_and_logits,
    linf_bounds,
    per_sample,
    project,
    sign_step,
)
from advpipe.rng import generator_for
from advpipe.errors import AdvpipeError

RHO = 0.75
MOMENTUM = 0.75
Loss = Callable[..., torch.Tensor]


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, *, targeted: bool = False) -> torch.Tensor:
    """Difference of Logits Ratio to ascend: ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` (Croce & Hein Eq. 4)."""
    if targeted:
        raise ValueError("use dlr_targeted_loss for the targeted DLR")
    z = logits.float()
    if z.shape[1] < 3:
        raise AdvpipeError(f"the DLR loss needs at least 3 classes, got {z.shape[1]}")
    ranked = z.sort(dim=1, descending=True).values
    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
    z_other = z.scatter(1, y.unsqueeze(1), float("-inf")).amax(dim=1)
    return -(z_y - z_other) / (ranked[:, 0] - ranked[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR to ascend: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (Croce & Hein Eq. 5)."""
    z = logits.float()
    if z.shape[1] < 4:
        raise AdvpipeError(f"the targeted DLR loss needs at least 4 classes, got {z.shape[1]}")
    ranked = z.sort(dim=1, descending=True).values
    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
    z_t = z.gather(1, target.unsqueeze(1)).squeeze(1)
    return -(z_y - z_t) / (ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + 1e-12)


def _apgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Loss, *, eps: float, steps: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run from a random start: (adversarial images, broken mask)."""
    first, minimum, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    bounds = linf_bounds(x, eps)
    t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).mul_(2).sub_(1)
    peak = t.flatten(1).abs().amax(1).clamp_min(1e-12)
    x_adv = project(x + eps * t / per_sample(peak, t), bounds)

    def evaluate(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grad, logits = input_grad_and_logits(model, images, y, loss_fn, False)
        return grad, loss_fn(logits, y), logits.argmax(1) != y

    grad, loss, broken = evaluate(x_adv)
    x_best, x_broken, grad_best, loss_best = x_adv.clone(), x_adv.clone(), grad.clone(), loss.clone()
    step = torch.full((x.shape[0],), 2.0 * eps, device=x.device, dtype=x.dtype)
    x_old = x_adv.clone()
    period, count = first, 0
    increases = torch.zeros(x.shape[0], device=x.device)
    previous, best_at_check = loss.clone(), loss_best.clone()
    reduced_at_check = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for i in range(steps):
        alpha = MOMENTUM if i > 0 else 1.0
        z = project(sign_step(x_adv.clone(), grad, step), bounds)
        x_new = project(x_adv + alpha * (z - x_adv) + (1 - alpha) * (x_adv - x_old), bounds)
        x_old, x_adv = x_adv, x_new
        grad, loss, wrong = evaluate(x_adv)
        x_broken = torch.where(per_sample(wrong, x_adv), x_adv, x_broken)
        broken |= wrong
        increases += (loss > previous).float()
        previous = loss
        better = loss > loss_best
        x_best = torch.where(per_sample(better, x_adv), x_adv, x_best)
        grad_best = torch.where(per_sample(better, grad), grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)
        count += 1
        if count == period:
            reduce = (increases <= period * RHO) | (~reduced_at_check & (best_at_check >= loss_best))
            reduced_at_check, best_at_check = reduce, loss_best.clone()
            step = torch.where(reduce, step / 2, step)
            x_adv = torch.where(per_sample(reduce, x_adv), x_best, x_adv)
            grad = torch.where(per_sample(reduce, grad), grad_best, grad)
            count, period = 0, max(period - shrink, minimum)
            increases.zero_()
    return torch.where(per_sample(broken, x_adv), x_broken, x_best), broken


def _attack_unbroken(model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, broken: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor], Loss], *, eps: float, steps: int, restarts: int,
                     generator: torch.Generator) -> None:
    """Run ``restarts`` APGD runs on the samples not broken yet, updating ``out`` and ``broken`` in place."""
    for _ in range(restarts):
        idx = (~broken).nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        adv, hit = _apgd_run(model, x[idx], y[idx], loss_fn(idx), eps=eps, steps=steps, generator=generator)
        out[idx] = adv
        broken[idx[hit]] = True


def _setup(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, restarts: int,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    check_inputs(x, y, eps=eps, steps=steps)
    if not isinstance(restarts, int) or restarts < 1:
        raise AdvpipeError(f"APGD restarts must be a positive integer, got {restarts!r}")
    x = x.detach()
    with torch.no_grad():
        logits = model(x).float()
    return x, logits, logits.argmax(1) != y, generator_for(x.device, generator)


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100, loss: str = "ce",
         restarts: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted l_inf APGD on cross-entropy (``loss="ce"``, APGD-CE) or DLR (``loss="dlr"``, APGD-DLR)."""
    if loss not in ("ce", "dlr"):
        raise AdvpipeError(f"APGD loss must be ce or dlr, got {loss!r}")
    loss_fn: Loss = LOSSES.get("ce") if loss == "ce" else dlr_loss
    if x.shape[0] == 0:
        return x.detach().clone()
    x, _, broken, g = _setup(model, x, y, eps, steps, restarts, generator)
    out = x.clone()
    _attack_unbroken(model, x, y, out, broken, lambda idx: loss_fn, eps=eps, steps=steps, restarts=restarts,
                     generator=g)
    return out


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
                  targets: int = 9, restarts: int = 1, generator: torch.Generator | None = None,
                  broken: torch.Tensor | None = None) -> torch.Tensor:
    """APGD-T: targeted DLR towards the 2nd, 3rd, ... most likely clean classes (at most K - 1 of them).

    ``broken`` optionally marks samples already broken by another attack; they are left as given.
    """
    if x.shape[0] == 0:
        return x.detach().clone()
    x, logits, wrong, g = _setup(model, x, y, eps, steps, restarts, generator)
    if targets < 1:
        raise AdvpipeError(f"APGD-T needs at least one target class, got {targets}")
    if logits.shape[1] < 4:
        raise AdvpipeError(f"APGD-T's targeted DLR loss needs at least 4 classes, got {logits.shape[1]}")
    done = wrong if broken is None else (wrong | broken)
    out = x.clone()
    ranked = logits.argsort(dim=1, descending=True)
    for k in range(1, min(targets, logits.shape[1] - 1) + 1):
        target = ranked[:, k]

        def loss_for(idx: torch.Tensor, target: torch.Tensor = target) -> Loss:
            return lambda z, labels, targeted=False: dlr_targeted_loss(z, labels, target[idx])

        _attack_unbroken(model, x, y, out, done, loss_for, eps=eps, steps=steps, restarts=restarts, generator=g)
    return out


def apgd_worst_case(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
                    targets: int = 9, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image, the worst case of APGD-CE and APGD-T (AutoAttack's first two attacks, not all four)."""
    if x.shape[0] == 0:
        return x.detach().clone()
    first = apgd(model, x, y, eps=eps, steps=steps, loss="ce", generator=generator)
    with torch.no_grad():
        broken = model(first).argmax(1) != y
    if broken.all():
        return first
    second = apgd_targeted(model, x, y, eps=eps, steps=steps, targets=targets, generator=generator, broken=broken)
    return torch.where(per_sample(broken, first), first, second)
