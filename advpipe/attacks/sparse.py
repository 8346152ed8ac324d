"""The AdvMask sparse adversarial attack (advmask.txt Sec. III-A, IV-B, V-A): one batched reference.

Per image, a perturbation ``delta`` (B,C,H,W) in the l_inf ball of radius ``eps`` and an encoder
``H`` (:mod:`advpipe.attacks.encoders`) are optimised jointly. The encoder turns ``delta`` into a
soft per-pixel mask (Eq. 3) ``m = sigmoid(alpha * H(delta))`` of shape (B,1,H,W), ``alpha``
annealed from ``alpha_min`` to ``alpha_max`` (Sec. IV-B), and the attacked image is
``clamp(x + delta * m, 0, 1)``. The loss (Eq. 4, 5), per image::

    L_classify = -CE(f(x + delta*m), y) / L_init + 1           (targeted: CE(., t) / L_init - 1)
    L          = max(L_classify, eta * L_classify) + lambda * ||m||_1 / N
    lambda     = C + gamma * mean(m > 0.5)                      (lambda_rule="paper")

``L_init`` is the cross-entropy of a successful dense attack (PGD or MI-FGSM from
:mod:`advpipe.attacks.dense`), by default at the iterate where PGD first succeeds
(``init_attack="pgd-early"``); images it has not brought to success after ``init_steps`` continue
up to ``init_extra_steps`` more steps (:mod:`advpipe.attacks.init_attack`). ``delta`` follows
MI-FGSM on ``L`` with an L1-normalised gradient and is clipped to the eps ball (Eq. 6); the
encoder follows Adam. The attack mask is ``m > 0.5``.

Beyond the paper (options, documented with measurements in docs/attack.md):

* ``lambda_rule="adaptive"`` multiplies each image's lambda by ``lambda_up`` after a step on which
  the attack succeeded and by ``lambda_down`` after a failure, so lambda reacts to success.
* ``keep_best=True`` returns, per image, the sparsest binary mask (with its delta) seen during the
  run that succeeds in float32, like C&W-style attacks; otherwise the last iterate.
* ``straight_through=True`` forwards the binary mask and backpropagates through the soft one.
* ``alpha_schedule`` picks the curve of the annealing (the paper only says "gradually increase").

For precomputing masks, ``SparseAttackConfig(lambda_rule="adaptive", alpha_schedule="linear")`` is
recommended: 100% ASR with about half the l0 of the paper's rules on our ResNet-20 (docs/attack.md).

``delta`` is also kept inside ``[-x, 1-x]`` (the image box), so ``x + delta * m`` never needs the
clamp and the reported norms are those of the perturbation actually applied.

The pieces live in files of one job each, and every name is importable from here:
:mod:`~advpipe.attacks.sparse_config` (:class:`SparseAttackConfig`), :mod:`~advpipe.attacks.sparse_rules`
(alpha schedules, lambda rules, target pickers), :mod:`~advpipe.attacks.sparse_result`
(:class:`SparseAttackResult`, :class:`StepInfo`) and :mod:`~advpipe.attacks.init_attack` (``L_init``).
The projection, the MI-FGSM update and the success test are :mod:`advpipe.attacks.primitives`.

Example::

    cfg = SparseAttackConfig(eps=Fraction(8, 255))
    g = torch.Generator().manual_seed(0)
    res = sparse_attack(model.eval(), images, labels, cfg, generator=g)
    res.mask            # (B,H,W) bool attack masks (the points of interest)
    res.success.float().mean(), res.l0_pixels[res.success].float().mean()
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.attacks.encoders import build_encoder
from advpipe.attacks.init_attack import INIT_ATTACKS, dense_init
from advpipe.attacks.primitives import (
    is_adversarial,
    linf_bounds,
    momentum_update,
    project,
    sign_step,
    uniform_noise,
)
from advpipe.rng import check_generator
from advpipe.attacks.sparse_config import AUTOCAST, SMALL_IMAGE_PIXELS, SparseAttackConfig
from advpipe.attacks.sparse_result import SparseAttackResult, StepInfo, empty_result, result_from
from advpipe.attacks.sparse_rules import (
    ALPHA_SCHEDULES,
    LAMBDA_RULES,
    TARGETS,
    AlphaSchedule,
    LambdaRule,
    cosine_alpha,
    geometric_alpha,
    linear_alpha,
)
from advpipe.errors import AdvpipeError
from advpipe.progress import task

__all__ = [
    "ALPHA_SCHEDULES", "INIT_ATTACKS", "LAMBDA_RULES", "SMALL_IMAGE_PIXELS", "TARGETS", "AlphaSchedule", "LambdaRule",
    "SparseAttackConfig", "SparseAttackResult", "StepInfo", "cosine_alpha", "dense_init", "geometric_alpha",
    "linear_alpha", "sparse_attack",
]

log = logging.getLogger(__name__)


def sparse_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: SparseAttackConfig,
    *,
    generator: torch.Generator,
    targets: torch.Tensor | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> SparseAttackResult:
    """Run the AdvMask sparse attack (advmask.txt Eq. 3-6) on a batch and return masks and metrics.

    ``model`` maps [0,1] images to logits and should be in eval mode (its mode is not changed;
    its parameters' gradients are not touched). ``x`` is (B,C,H,W) in [0,1], ``y`` (B,) the true
    labels. With ``config.targeted`` the targets are ``targets`` if given, else picked by
    ``config.target``. All randomness (targets, dense start, encoder init, initial delta) comes
    from ``generator``, which must live on ``x``'s device. ``on_step``, if given, is called after
    every optimisation step with a :class:`StepInfo` (for diagnostics such as mask-freeze curves).
    """
    if not isinstance(config, SparseAttackConfig):
        raise TypeError(f"config must be a SparseAttackConfig, got {type(config).__name__}")
    if not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"x must be a (B,C,H,W) floating-point batch, got {tuple(x.shape)} {x.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (the attack draws its randomness only from it)")
    check_generator(generator, x.device)
    if targets is not None and not config.targeted:
        raise AdvpipeError("targets were given but config.targeted is False")
    if targets is not None and targets.shape != y.shape:
        raise ValueError(f"targets must have shape {tuple(y.shape)}, got {tuple(targets.shape)}")
    if model.training:
        log.warning("sparse_attack: the model is in train mode; BatchNorm statistics will change (call model.eval())")

    cfg = config.resolve(tuple(x.shape[1:]))
    return _SparseRun(model, x.detach().float(), y.detach().long(), cfg, generator, targets, on_step).run()


class _SparseRun:
    """State of one batched attack run (kept in an object so the step stays readable)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SparseAttackConfig,
                 generator: torch.Generator, targets: torch.Tensor | None,
                 on_step: Callable[[StepInfo], None] | None) -> None:
        self.model, self.x, self.y, self.cfg, self.gen = model, x, y, cfg, generator
        self.device = x.device
        self.eps = float(cfg.eps)
        dtype = AUTOCAST.get(cfg.autocast_dtype) if cfg.autocast_dtype else None
        self.autocast_dtype = dtype
        self.targets_in = targets
        self.on_step = on_step

    def _autocast(self) -> Any:
        """The autocast context of the optimisation (disabled without ``autocast_dtype``)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    @torch.no_grad()
    def _fp32_success(self, x_adv: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Success of attacked images in float32 (boundary masks flip under bf16)."""
        with torch.autocast(self.device.type, enabled=False):
            pred = self.model(x_adv).argmax(dim=1)
        return is_adversarial(pred, label, self.cfg.targeted)

    def run(self) -> SparseAttackResult:
        """Run the whole attack on the batch and assemble the result."""
        cfg, x, y = self.cfg, self.x, self.y
        b, c, h, w = x.shape
        if b == 0:
            return empty_result(x, cfg.targeted, cfg.to_dict())

        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            clean_logits = self.model(x)
        clean_correct = clean_logits.argmax(1) == y
        targets = None
        if cfg.targeted:
            if self.targets_in is not None:
                targets = self.targets_in.to(self.device).long()
            else:
                targets = TARGETS.get(cfg.target)(self.model, x, y, clean_logits.shape[1], self.gen)
        label = targets if cfg.targeted else y

        # L_init: the cross-entropy a successful dense attack reaches (Eq. 4).
        with self._autocast():
            x_init = dense_init(self.model, x, label, cfg, self.gen)
        with torch.no_grad():
            with self._autocast():
                init_logits = self.model(x_init)
            l_init = F.cross_entropy(init_logits.float(), label, reduction="none")
        init_success = self._fp32_success(x_init, label)
        # Only guards the division: a dense attack that already fits the target exactly gives CE ~ 0.
        l_init_div = l_init.clamp_min(1e-6)

        encoder = build_encoder(cfg.encoder, (c, h, w), b, scope=cfg.encoder_scope,
                                options={"backbone": cfg.unet_backbone} if cfg.encoder == "unet" else None,
                                generator=self.gen, device=self.device)
        encoder.train()
        params = [p for p in encoder.parameters()]
        # The fused kernel is ~10x faster than the foreach one for a 3M-parameter encoder on CPU.
        optimizer = torch.optim.Adam(params, lr=cfg.adam_lr, fused=True)

        # The eps ball intersected with the image box, as offsets from x.
        bounds = linf_bounds(None, self.eps, low=-x, high=1 - x)
        delta = project(uniform_noise(x, self.eps, self.gen), bounds)
        momentum = torch.zeros_like(delta)
        rule = LAMBDA_RULES.get(cfg.lambda_rule)(cfg, b, self.device)
        schedule = ALPHA_SCHEDULES.get(cfg.alpha_schedule)
        n_pix = h * w
        beta = float(cfg.beta)

        # Best-so-far store (keep_best): sentinel n_pix + 1 pixels means "no successful mask yet".
        best_pix = torch.full((b,), n_pix + 1, dtype=torch.long, device=self.device)
        best_mask = torch.zeros((b, h, w), dtype=torch.bool, device=self.device)
        best_delta = torch.zeros_like(delta)
        best_step = torch.full((b,), cfg.steps, dtype=torch.long, device=self.device)

        def consider(d: torch.Tensor, mask_bin: torch.Tensor, step: int, hint: torch.Tensor | None) -> None:
            """Keep (d, mask) for images where it is sparser than their best and succeeds in fp32.

            ``hint`` (the soft-mask forward's success) limits the fp32 check to promising images:
            checking every image every step would cost half a step more (forward ~ input-only backward).
            """
            pix = mask_bin.flatten(1).sum(1)
            cand = pix < best_pix
            if hint is not None:
                cand &= hint
            idx = cand.nonzero().squeeze(1)
            if idx.numel() == 0:
                return
            m_sel = mask_bin[idx].unsqueeze(1).to(d.dtype)
            ok = self._fp32_success(x[idx] + d[idx] * m_sel, label[idx])
            sel = idx[ok]
            best_pix[sel] = pix[sel]
            best_mask[sel] = mask_bin[sel]
            best_delta[sel] = d[sel]
            best_step[sel] = step

        loss_i = torch.zeros(b, device=self.device)
        alpha = cfg.alpha_min
        with task("sparse attack", total=cfg.steps, unit="step") as bar:
            for step in range(cfg.steps):
                alpha = schedule(step, cfg.steps, cfg.alpha_min, float(cfg.alpha_max))
                with torch.enable_grad():
                    leaf = delta.detach().requires_grad_(True)
                    m = torch.sigmoid(alpha * encoder(leaf))
                    m_fwd = m
                    if cfg.straight_through:
                        # Forward with the binary mask, backward through the soft one (Bengio et al., 2013).
                        m_fwd = m + ((m > 0.5).to(m.dtype) - m).detach()
                    with self._autocast():
                        logits = self.model(x + leaf * m_fwd)
                    ce = F.cross_entropy(logits.float(), label, reduction="none")
                    ratio = ce / l_init_div
                    l_cls = ratio - 1 if cfg.targeted else 1 - ratio
                    l_cls = torch.maximum(l_cls, cfg.eta * l_cls)
                    m_flat = m.flatten(1)
                    lam = cfg.C + cfg.gamma * (m_flat.detach() > 0.5).float().mean(1)
                    if rule.multiplier is not None:
                        lam = lam * rule.multiplier
                    loss_i = l_cls + lam * m_flat.mean(1)
                    # allow_unused: some smp backbones (efficientnet) hold parameters the U-Net never uses.
                    grads = torch.autograd.grad(loss_i.sum(), [leaf, *params], allow_unused=True)

                soft_success = is_adversarial(logits.detach().argmax(1), label, cfg.targeted)
                if cfg.keep_best:
                    consider(delta, (m.detach() > 0.5).squeeze(1), step, soft_success)
                rule.update(soft_success)
                if self.on_step is not None:
                    self.on_step(StepInfo(step, alpha, delta, m.detach().squeeze(1), soft_success, loss_i.detach(),
                                          None if rule.multiplier is None else rule.multiplier.clone()))

                for p, g in zip(params, grads[1:]):
                    p.grad = g
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                # Eq. (6): MI-FGSM descent on L with the per-image L1-normalised gradient.
                momentum_update(momentum, grads[0], cfg.mu)
                delta = project(sign_step(delta.clone(), momentum, -beta), bounds)
                bar.advance(1, alpha=round(alpha, 3))

        with torch.no_grad():
            final_soft = torch.sigmoid(alpha * encoder(delta)).squeeze(1)
        final_mask = final_soft > 0.5
        if cfg.keep_best:
            consider(delta, final_mask, cfg.steps, None)
            found = best_pix <= n_pix
            keep = found.view(b, 1, 1)
            mask = torch.where(keep, best_mask, final_mask)
            delta_out = torch.where(keep.unsqueeze(1), best_delta, delta)
            success = found
        else:
            mask, delta_out = final_mask, delta
            success = self._fp32_success(x + delta * mask.unsqueeze(1).float(), label)
            best_step.fill_(cfg.steps)

        return result_from(
            mask,
            delta_out,
            soft_mask=final_soft,
            success=success,
            loss=loss_i.detach(),
            l_init=l_init,
            init_success=init_success,
            clean_correct=clean_correct,
            best_step=best_step,
            targets=targets,
            config=cfg.to_dict(),
        )
