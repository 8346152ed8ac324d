"""Dense l_inf attacks on [0,1] images: FGSM, PGD, MI-FGSM, plus target pickers.

Shared contract of every attack here:

* ``model`` maps (B,C,H,W) images in [0,1] to (B,K) logits (normalization lives in the model).
* ``y`` is the true label (untargeted) or the target class (``targeted=True``). The attack always
  ascends a per-sample loss from :data:`advpipe.attacks.losses.LOSSES`; targeted losses carry the
  sign, so a targeted attack descends the loss to its target.
* The result lies in ``[0,1]`` and in the l_inf ball of radius ``eps`` around ``x``, has ``x``'s
  dtype and device and is detached. ``x`` is not modified.
* **The model's train/eval mode is never changed.** The caller chooses the BatchNorm mode (e.g.
  AdvProp's auxiliary BN, A-FAN, or eval-mode attacks for evaluation). In train mode every attack
  step is a forward pass that updates the BN running statistics, exactly as the caller's own
  forward would.
* Gradients are taken with :func:`torch.autograd.grad` w.r.t. the input only: parameters' ``.grad``
  and ``requires_grad`` are left as they were. Per-sample losses are *summed*, so a sample's
  gradient does not depend on the batch size or on the other samples (in eval mode).
* The caller may wrap the call in ``torch.autocast``; losses are computed in float32 and the
  perturbation is kept in ``x``'s dtype. Gradients are enabled internally, so calling under
  ``torch.no_grad()`` works (``torch.inference_mode()`` does not).
* Randomness (PGD/MI-FGSM random start) comes only from ``generator``, which must live on ``x``'s
  device. ``generator=None`` uses a fresh ``torch.Generator`` with PyTorch's default seed
  (reproducible, and the global RNG is never touched); pass your own generator to vary the noise.
"""

from __future__ import annotations

import torch
from torch import nn

from advpipe.attacks.losses import LOSSES
from advpipe.attacks.primitives import Scalar, check_inputs, linf_bounds, project, sign_ascent, uniform_noise
from advpipe.rng import generator_for
from advpipe.errors import AdvpipeError


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Scalar,
    targeted: bool = False,
    loss: str = "ce",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fast Gradient Sign Method: one step ``x + eps * sign(grad)`` (Goodfellow et al., 2015).

    m2at.txt Eq. (5); the targeted form (m-tlat.txt Eq. 5, ``x - eps * sign(grad CE(x, target))``)
    is the same step on the sign-flipped targeted loss. ``eps`` is one radius or a (B,) tensor
    with one per sample (M-TLAT draws ``eps ~ U[0, 0.025]`` per sample). ``generator`` is
    accepted so that every dense attack has the same call shape; FGSM draws nothing.

    Example::

        x_adv = fgsm(model, images, labels, eps=4 / 255)
    """
    check_inputs(x, y, eps=eps)
    loss_fn = LOSSES.get(loss)
    if x.shape[0] == 0:
        return x.detach().clone()
    x = x.detach()
    return sign_ascent(model, x.clone(), y, bounds=linf_bounds(x, eps), steps=1, step_size=eps, loss_fn=loss_fn,
                       targeted=targeted)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Scalar,
    steps: int,
    step_size: Scalar,
    random_start: bool = True,
    targeted: bool = False,
    loss: str = "ce",
    generator: torch.Generator | None = None,
    early_stop: bool = False,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected Gradient Descent in l_inf (Madry et al., 2018), optionally from a random start.

    ``x_{t+1} = Proj_{B_eps(x) ∩ [0,1]}(x_t + step_size * sign(grad L(x_t, y)))`` (m2at.txt Eq. 6,
    a-fan.txt Eq. 2), starting from ``x + U(-eps, eps)`` when ``random_start`` (Madry et al.) or
    from ``x`` otherwise (then it is I-FGSM / BIM, Kurakin et al., 2017; advprop.txt Tab. 7).
    AdvProp's "PGD5 (eps=4)" is ``pgd(..., eps=4/255, steps=5, step_size=1/255)``.
    With ``early_stop``, each image stays at the first iterate the model classifies adversarially
    (not ``y``; or ``y`` when ``targeted``), which costs no extra forward. ``start`` (B,C,H,W), if
    given, is the first iterate instead of ``x`` or the random start (it is projected into the
    ball around ``x``), so an earlier run can be continued; nothing is drawn then. ``eps`` and
    ``step_size`` may be (B,) tensors (one per sample).

    Example::

        g = torch.Generator(device=images.device).manual_seed(0)
        x_adv = pgd(model, images, labels, eps=8 / 255, steps=10, step_size=2 / 255, generator=g)
    """
    check_inputs(x, y, eps=eps, steps=steps, step_size=step_size)
    loss_fn = LOSSES.get(loss)
    if x.shape[0] == 0:
        return x.detach().clone()
    x = x.detach()
    bounds = linf_bounds(x, eps)
    if start is not None:
        if start.shape != x.shape:
            raise ValueError(f"start must have the shape of x {tuple(x.shape)}, got {tuple(start.shape)}")
        x_adv = project(start.detach().to(x.dtype).clone(), bounds)
    else:
        x_adv = project(_start(x, eps, random_start, generator), bounds)
    return sign_ascent(model, x_adv, y, bounds=bounds, steps=steps, step_size=step_size, loss_fn=loss_fn,
                       targeted=targeted, early_stop=early_stop)


def mifgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Scalar,
    steps: int,
    step_size: Scalar | None = None,
    decay: float = 1.0,
    targeted: bool = False,
    loss: str = "ce",
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Momentum Iterative FGSM (Dong et al., 2018, "Boosting adversarial attacks with momentum").

    Dong et al. Alg. 1: ``g_{t+1} = decay * g_t + grad / ||grad||_1`` with the L1 norm taken
    per sample, then ``x_{t+1} = Proj(x_t + step_size * sign(g_{t+1}))``. The default step size is
    ``eps / steps`` (the paper's ``alpha = eps / T``). The projection onto the eps ball and [0,1]
    is not in the paper's equations (its step size cannot leave the ball) but keeps the contract
    when ``step_size`` or ``random_start`` are used. m-tlat.txt Sec. 4.1 evaluates with ten-step MI-FGSM.

    Example::

        x_adv = mifgsm(model, images, labels, eps=0.04, steps=10)
    """
    if step_size is None:
        step_size = eps / steps if isinstance(steps, int) and steps > 0 else 0.0
    check_inputs(x, y, eps=eps, steps=steps, step_size=step_size)
    if decay < 0:
        raise AdvpipeError(f"MI-FGSM decay must be >= 0, got {decay}")
    loss_fn = LOSSES.get(loss)
    if x.shape[0] == 0:
        return x.detach().clone()
    x = x.detach()
    bounds = linf_bounds(x, eps)
    x_adv = project(_start(x, eps, random_start, generator), bounds)
    return sign_ascent(model, x_adv, y, bounds=bounds, steps=steps, step_size=step_size, loss_fn=loss_fn,
                       targeted=targeted, decay=decay)


@torch.no_grad()
def least_likely_targets(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the model's least likely class per sample (argmin of the logits), shape (B,).

    The target of "PGD_LL" / iterative least-likely-class attacks (Kurakin et al., 2017; used by
    m-tlat.txt Sec. 4.1). Runs one forward in the model's current mode (not changed here).
    """
    return model(x).float().argmin(dim=1)


def random_targets(y: torch.Tensor, num_classes: int, *, generator: torch.Generator | None) -> torch.Tensor:
    """Return a class drawn uniformly from the ``num_classes - 1`` classes different from ``y``.

    Used for randomly targeted FGSM (m-tlat.txt Sec. 5.4). Drawing an offset in
    ``[1, num_classes)`` and adding it modulo ``num_classes`` is uniform over the other classes
    without rejection sampling.
    """
    if num_classes < 2:
        raise AdvpipeError(f"random targets need at least 2 classes, got {num_classes}")
    if y.dim() != 1:
        raise ValueError(f"y must have shape (B,), got {tuple(y.shape)}")
    generator = generator_for(y.device, generator)
    offset = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
    return (y.long() + offset) % num_classes


def _start(x: torch.Tensor, eps: Scalar, random_start: bool, generator: torch.Generator | None) -> torch.Tensor:
    """A fresh copy of x, plus uniform noise in [-eps, eps] when random_start."""
    if not random_start:
        return x.clone()
    return uniform_noise(x, eps, generator).add_(x)
