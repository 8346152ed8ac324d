"""M-TLAT, and its ablations Mixup and TLAT (m-tlat.txt, Laugros et al., ECCV-W 2020).

M-TLAT, Alg. 1, one training step (images in [0, 1], labels one-hot):

* two Mixup pairs (Eq. 1), ``λ1, λ2 ~ Beta(α, α)`` with ``α = 0.4`` (Sec. 4.2):
  ``x_mix1 = λ1 x1 + (1 - λ1) x2`` and ``x_mix2 = λ2 x3 + (1 - λ2) x4`` (labels alike);
* targeted FGSM on the second pair (Eq. 5) toward ``y_target ~ U{0..N-1}`` with
  ``ε ~ U[0, ε_max]``, ``ε_max = 0.025``: ``x_mtlat = x_mix2 - ε sign(∇ CE(f(x_mix2), y_target))``;
* targeted labeling (Eqs. 4, 6): ``y_mtlat = (1 - ε) y_mix2 + ε onehot(y_target)``;
* ``loss = CE(x_mix1, y_mix1) + CE(x_mtlat, y_mtlat)`` with soft-label cross-entropy.

Ablations (Sec. 5.3, Tab. 2): ``mixup`` is Mixup alone on the whole batch (Eq. 1); ``tlat`` is M-TLAT
without the mixing: ``CE(x_clean, y) + CE(x_tlat, y_tlat)`` (Eq. 4, "trained on both clean samples and
adversarial samples", Sec. 3.2).

Choices where the paper is silent, and why:

* a batch of B images supplies the four sources: the first ``ceil(B/2)`` images form the clean
  (mixed) half, the last ``floor(B/2)`` the adversarial half, and each half is paired with a random
  permutation of itself (the usual Mixup implementation; a sample may be paired with itself).
  Kurakin et al., whom the paper follows ("the training minibatches contain both adversarial and
  nonadversarial samples"), replace part of each minibatch by adversarial examples, so an epoch
  still sees every image once and both halves go through *one* forward, sharing BN statistics;
* λ, ε and the target are drawn per sample (Alg. 1 describes one generated couple);
* the target is uniform over all N classes as Alg. 1 writes (``targets=other`` excludes the
  label of the image that leads the pair, using :func:`advpipe.attacks.random_targets`);
* FGSM runs in train mode with BN running statistics restored afterwards. Per-sample ε: the
  registry's ``fgsm`` (:func:`advpipe.attacks.fgsm`) takes a (B,) eps, so each sample moves by
  its own ε and is clipped to [0, 1].

Options: ``alpha`` (0.4; mtlat, mixup), ``eps_max`` (0.025; mtlat, tlat), ``targets`` ("any" or "other").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advpipe.attacks.dense import random_targets
from advpipe.attacks.registry import ATTACKS
from advpipe.data.batch import Batch
from advpipe.errors import AdvpipeError
from advpipe.models.dual_bn import preserve_bn_stats
from advpipe.train.methods import METHODS, Method, MethodContext
from advpipe.train.soft_labels import (
    checked_options,
    fraction_option,
    mix,
    one_hot,
    sample_beta,
    soft_cross_entropy,
    without_ddp,
)


def targeted_fgsm_per_sample(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                             eps: torch.Tensor) -> torch.Tensor:
    """Eq. (5) with a per-sample ε: ``clip(x - ε_i sign(∇_x CE(f(x), target)), 0, 1)`` (detached)."""
    return ATTACKS.get("fgsm")(model, x, target, eps=eps, targeted=True)


def tlat_labels(y_soft: torch.Tensor, target: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eqs. (4)/(6): ``(1 - ε) y + ε onehot(target)`` for (B,K) soft labels and (B,) ε."""
    e = eps.view(-1, 1).to(y_soft.dtype)
    return (1 - e) * y_soft + e * one_hot(target, y_soft.shape[1], y_soft.dtype)


class MixTLAT(Method):
    """M-TLAT (``mixup`` and ``adversarial``), Mixup (``mixup`` only) or TLAT (``adversarial`` only)."""

    def __init__(self, *, num_classes: int, mixup: bool, adversarial: bool, alpha: float = 0.4,
                 eps_max: float = 0.025, targets: str = "any") -> None:
        """Build the objective; see the module docstring for the three variants."""
        if not (mixup or adversarial):
            raise ValueError("MixTLAT needs mixup, adversarial, or both")
        if adversarial and num_classes < 2:
            raise AdvpipeError("targeted labeling needs at least 2 classes")
        self.num_classes, self.mixup, self.adversarial = num_classes, mixup, adversarial
        self.alpha, self.eps_max, self.targets = alpha, eps_max, targets

    def _mixed(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup (Eq. 1) of a half-batch with a permutation of itself, per-sample λ; (images, soft labels)."""
        y_soft = one_hot(y, self.num_classes)
        if not self.mixup or x.shape[0] == 0:
            return x, y_soft
        perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
        lam = sample_beta(x.shape[0], self.alpha, self.alpha, generator=generator, device=x.device)
        return mix(x, x[perm], lam), mix(y_soft, y_soft[perm], lam)

    def step(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Return ``CE(mix1) + CE(tlat)`` (or the ablation's loss) over one forward of the whole batch."""
        x, y = batch.images, batch.labels
        n = x.shape[0]
        n_adv = n // 2 if self.adversarial else 0
        n_clean = n - n_adv
        x1, t1 = self._mixed(x[:n_clean], y[:n_clean], generator)
        out: dict[str, torch.Tensor] = {}
        if n_adv:
            x2, t2 = self._mixed(x[n_clean:], y[n_clean:], generator)
            eps = torch.rand(n_adv, generator=generator, device=x.device) * self.eps_max
            if self.targets == "any":
                target = torch.randint(0, self.num_classes, (n_adv,), generator=generator, device=x.device)
            else:
                target = random_targets(y[n_clean:], self.num_classes, generator=generator)
            with preserve_bn_stats(model):
                x2 = targeted_fgsm_per_sample(without_ddp(model), x2, target, eps)
            t2 = tlat_labels(t2, target, eps)
            x1, t1 = torch.cat([x1, x2]), torch.cat([t1, t2])
            out["eps_mean"] = eps.mean()
        logits = model(x1)
        loss_clean = soft_cross_entropy(logits[:n_clean], t1[:n_clean])
        loss = loss_clean
        if n_adv:
            loss_adv = soft_cross_entropy(logits[n_clean:], t1[n_clean:])
            loss = loss_clean + loss_adv
            out.update(loss_clean=loss_clean.detach(), loss_adv=loss_adv.detach())
        return {"loss": loss, **out, "logits": logits}

    def passes(self) -> dict[str, float]:
        """Predicted passes per step: one training pass, plus FGSM on the adversarial half."""
        half = 0.5 if self.adversarial else 0.0
        return {"forward": 1 + half, "backward": 1, "input_backward": half}


def _alpha(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise AdvpipeError(f"method option alpha must be a number > 0, got {value!r}")
    return float(value)


def _targets(value: Any) -> str:
    if value not in ("any", "other"):
        raise AdvpipeError(f"method option targets must be 'any' or 'other', got {value!r}")
    return value


@checked_options
def _mtlat(ctx: MethodContext, *, alpha: Any = 0.4, eps_max: Any = 0.025, targets: Any = "any") -> MixTLAT:
    return MixTLAT(num_classes=ctx.num_classes, mixup=True, adversarial=True, alpha=_alpha(alpha),
                   eps_max=fraction_option(eps_max, "eps_max"), targets=_targets(targets))


@checked_options
def _mixup(ctx: MethodContext, *, alpha: Any = 0.4) -> MixTLAT:
    return MixTLAT(num_classes=ctx.num_classes, mixup=True, adversarial=False, alpha=_alpha(alpha))


@checked_options
def _tlat(ctx: MethodContext, *, eps_max: Any = 0.025, targets: Any = "any") -> MixTLAT:
    return MixTLAT(num_classes=ctx.num_classes, mixup=False, adversarial=True,
                   eps_max=fraction_option(eps_max, "eps_max"), targets=_targets(targets))


METHODS.register("mtlat", _mtlat)
METHODS.register("mixup", _mixup)
METHODS.register("tlat", _tlat)
