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

from advpipe.attacks.losses import LOSSES, AttackLoss
from advpipe.errors import AdvpipeError


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    targeted: bool = False,
    loss: str = "ce",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fast Gradient Sign Method: one step ``x + eps * sign(grad)`` (Goodfellow et al., 2015).

    m2at.txt Eq. (5); the targeted form (m-tlat.txt Eq. 5, ``x - eps * sign(grad CE(x, target))``)
    is the same step on the sign-flipped targeted loss. ``generator`` is accepted so that every
    dense attack has the same call shape; FGSM draws nothing.

    Example::

        x_adv = fgsm(model, images, labels, eps=4 / 255)
    """
    _check_inputs(x, y, eps=eps)
    loss_fn = LOSSES.get(loss)
    if x.shape[0] == 0:
        return x.detach().clone()
    x = x.detach()
    lower, upper = _box(x, eps)
    grad = _input_grad(model, x, y, loss_fn, targeted)
    return x.add(grad.sign(), alpha=eps).clamp_(lower, upper)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
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
    ball around ``x``), so an earlier run can be continued; nothing is drawn then.

    Example::

        g = torch.Generator(device=images.device).manual_seed(0)
        x_adv = pgd(model, images, labels, eps=8 / 255, steps=10, step_size=2 / 255, generator=g)
    """
    _check_inputs(x, y, eps=eps, steps=steps, step_size=step_size)
    loss_fn = LOSSES.get(loss)
    if x.shape[0] == 0:
        return x.detach().clone()
    x = x.detach()
    lower, upper = _box(x, eps)
    if start is not None:
        if start.shape != x.shape:
            raise ValueError(f"start must have the shape of x {tuple(x.shape)}, got {tuple(start.shape)}")
        x_adv = start.detach().to(x.dtype).clone().clamp_(lower, upper)
    else:
        x_adv = _start(x, eps, random_start, generator).clamp_(lower, upper)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(steps):
        grad, logits = _input_grad_and_logits(model, x_adv, y, loss_fn, targeted)
        if early_stop:
            pred = logits.argmax(1)
            active &= pred != y if targeted else pred == y
            if not active.any():
                break
            grad = grad * active.view(-1, *([1] * (grad.dim() - 1)))  # sign(0) = 0: frozen images stay
        x_adv.add_(grad.sign(), alpha=step_size).clamp_(lower, upper)
    return x_adv


def mifgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float | None = None,
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
    _check_inputs(x, y, eps=eps, steps=steps, step_size=step_size)
    if decay < 0:
        raise AdvpipeError(f"MI-FGSM decay must be >= 0, got {decay}")
    loss_fn = LOSSES.get(loss)
    if x.shape[0] == 0:
        return x.detach().clone()
    x = x.detach()
    lower, upper = _box(x, eps)
    x_adv = _start(x, eps, random_start, generator).clamp_(lower, upper)
    momentum = torch.zeros_like(x)
    reduce_dims = tuple(range(1, x.dim()))
    for _ in range(steps):
        grad = _input_grad(model, x_adv, y, loss_fn, targeted)
        # The floor only matters for an all-zero gradient, where the sample then keeps its momentum.
        l1 = grad.abs().sum(dim=reduce_dims, keepdim=True).clamp_min_(torch.finfo(grad.dtype).tiny)
        momentum.mul_(decay).add_(grad / l1)
        x_adv.add_(momentum.sign(), alpha=step_size).clamp_(lower, upper)
    return x_adv


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
    generator = _generator_for(y.device, generator)
    offset = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
    return (y.long() + offset) % num_classes


def _input_grad(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: AttackLoss, targeted: bool
) -> torch.Tensor:
    """Gradient of the summed per-sample loss w.r.t. the input only (parameters untouched)."""
    return _input_grad_and_logits(model, x_adv, y, loss_fn, targeted)[0]


def _input_grad_and_logits(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: AttackLoss, targeted: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input gradient of :func:`_input_grad` and the (detached) logits of the same forward."""
    with torch.enable_grad():
        # A detached view shares x_adv's storage, so the in-place update after this call needs
        # no copy; the graph holding it is freed by autograd.grad before that update.
        leaf = x_adv.detach().requires_grad_(True)
        logits = model(leaf)
        loss = loss_fn(logits, y, targeted=targeted).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad, logits.detach()


def _box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel bounds of the intersection of the l_inf eps ball around x and [0,1]."""
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


def _start(x: torch.Tensor, eps: float, random_start: bool, generator: torch.Generator | None) -> torch.Tensor:
    """A fresh copy of x, plus uniform noise in [-eps, eps] when random_start."""
    if not random_start:
        return x.clone()
    generator = _generator_for(x.device, generator)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return noise.mul_(2 * eps).sub_(eps).add_(x)


def _generator_for(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    """The caller's generator (checked to be on ``device``) or a fresh default-seeded one."""
    if generator is None:
        return torch.Generator(device=device)
    gen_device = torch.device(generator.device)
    same = gen_device.type == device.type and (
        gen_device.index is None or device.index is None or gen_device.index == device.index
    )
    if not same:
        raise ValueError(f"generator is on {gen_device} but the tensors are on {device}")
    return generator


def _check_inputs(
    x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int | None = None, step_size: float | None = None
) -> None:
    """Reject malformed tensors (ValueError) and invalid attack settings (AdvpipeError)."""
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point image batch, got {x.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if not eps >= 0:
        raise AdvpipeError(f"attack eps must be >= 0, got {eps}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise AdvpipeError(f"attack steps must be a positive integer, got {steps!r}")
    if step_size is not None and not step_size >= 0:
        raise AdvpipeError(f"attack step_size must be >= 0, got {step_size}")
