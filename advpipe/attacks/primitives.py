"""The building blocks every attack here shares, each written once.

* :func:`per_sample` broadcasts a float or a per-sample (B,) tensor (eps, step sizes, masks)
  against a (B,...) batch;
* :func:`linf_bounds` and :func:`project`: the l_inf ball of radius eps, intersected with a box
  (``[0,1]`` for images; ``[-x, 1-x]`` for the sparse attack's offsets; none for A-FAN's
  features), and the clamp onto it;
* :func:`uniform_noise`: a random start ``U(-eps, eps)`` drawn from an explicit generator;
* :func:`sign_step`: ``v + step * sign(direction)`` (FGSM's, PGD's and MI-FGSM's step);
* :func:`l1_normalized` and :func:`momentum_update`: MI-FGSM's ``g <- mu g + grad / ||grad||_1``
  (Dong et al. 2018, Alg. 1; advmask.txt Eq. 6);
* :func:`input_grad_and_logits`: the gradient of a summed per-sample loss w.r.t. the input only;
* :func:`is_adversarial`: misclassified (untargeted) or classified as the target (targeted);
* :func:`check_inputs` / :func:`check_eps`: the attacks' shared argument checks;
* :func:`sign_ascent`: the one iterative sign-gradient loop (FGSM, PGD/I-FGSM, MI-FGSM, the
  sparse attack's ``L_init`` continuation, A-FAN's feature PGD).

The perturbation norms are :mod:`advpipe.attacks.norms`.

Example::

    bounds = linf_bounds(x, eps)                        # images: the ball around x within [0,1]
    x_adv = sign_ascent(model, project(x + uniform_noise(x, eps, g), bounds), y, bounds=bounds,
                        steps=10, step_size=eps / 4, loss_fn=LOSSES.get("ce"))
"""

from __future__ import annotations

from typing import Callable

import torch

from advpipe.attacks.losses import AttackLoss
from advpipe.errors import AdvpipeError
from advpipe.rng import generator_for

#: a radius or step size: one number for the batch, or a (B,) tensor with one per sample
Scalar = float | torch.Tensor
Bound = float | torch.Tensor | None
Forward = Callable[[torch.Tensor], torch.Tensor]


def per_sample(value: Scalar, like: torch.Tensor) -> Scalar:
    """``value`` ready to broadcast against ``like`` (B,...): a (B,) tensor becomes (B,1,...,1).

    Python numbers and 0-dim tensors are returned as they are (floating tensors in ``like``'s
    dtype); a (B,) tensor is viewed as (B,1,...,1), floating ones cast to ``like``'s dtype and
    boolean masks kept boolean.
    """
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        value = value.to(like.dtype)
    if value.dim() == 0:
        return value
    if value.shape != (like.shape[0],):
        raise ValueError(f"a per-sample value must have shape ({like.shape[0]},), got {tuple(value.shape)}")
    return value.view(-1, *([1] * (like.dim() - 1)))


def check_eps(eps: Scalar, batch: int, name: str = "eps") -> None:
    """Reject a negative or NaN radius (AdvpipeError) and a tensor that is not 0-dim or (batch,) (ValueError)."""
    if isinstance(eps, torch.Tensor):
        if eps.dim() != 0 and eps.shape != (batch,):
            raise ValueError(f"attack {name} must be a number or a ({batch},) tensor, got shape {tuple(eps.shape)}")
        if not bool((eps >= 0).all()):
            raise AdvpipeError(f"attack {name} must be >= 0, got {eps.min().item()}")
    elif not eps >= 0:
        raise AdvpipeError(f"attack {name} must be >= 0, got {eps}")


def check_inputs(
    x: torch.Tensor, y: torch.Tensor, *, eps: Scalar, steps: int | None = None, step_size: Scalar | None = None
) -> None:
    """Reject malformed tensors (ValueError) and invalid attack settings (AdvpipeError)."""
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point image batch, got {x.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    check_eps(eps, x.shape[0])
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise AdvpipeError(f"attack steps must be a positive integer, got {steps!r}")
    if step_size is not None:
        check_eps(step_size, x.shape[0], "step_size")


def _intersect(a: torch.Tensor | float, b: Bound, *, upper: bool) -> torch.Tensor | float:
    """Elementwise max(a, b) (a lower bound) or min(a, b) (``upper``); ``b=None`` is no bound."""
    if b is None:
        return a
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.minimum(a, b) if upper else torch.maximum(a, b)
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return min(a, b) if upper else max(a, b)
    tensor, number = (a, b) if isinstance(a, torch.Tensor) else (b, a)
    return tensor.clamp(max=number) if upper else tensor.clamp(min=number)


def linf_bounds(center: torch.Tensor | None, eps: Scalar, *, low: Bound = 0.0,
                high: Bound = 1.0) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Bounds of the l_inf ball of radius ``eps`` around ``center``, intersected with ``[low, high]``.

    ``center=None`` is the ball around 0 (bounds on a perturbation rather than on the images).
    ``eps`` is a float or a per-sample (B,) tensor; ``low``/``high`` are floats, tensors or None
    (unbounded). Images in [0,1]: ``linf_bounds(x, eps)`` is one per-pixel clamp to
    ``[max(x - eps, 0), min(x + eps, 1)]``. The sparse attack's offsets ``delta`` with
    ``x + delta`` in [0,1]: ``linf_bounds(None, eps, low=-x, high=1 - x)``. A-FAN's features:
    ``linf_bounds(None, eps, low=None, high=None)``.
    """
    if center is None:
        like = next((b for b in (low, high) if isinstance(b, torch.Tensor)), None)
        r = per_sample(eps, like) if like is not None else eps
        return _intersect(-r, low, upper=False), _intersect(r, high, upper=True)
    r = per_sample(eps, center)
    return _intersect(center - r, low, upper=False), _intersect(center + r, high, upper=True)


def project(v: torch.Tensor, bounds: tuple[torch.Tensor | float, torch.Tensor | float]) -> torch.Tensor:
    """Clamp ``v`` in place onto ``bounds`` from :func:`linf_bounds` (the projection onto the ball ∩ box)."""
    return v.clamp_(*bounds)


def uniform_noise(like: torch.Tensor, eps: Scalar, generator: torch.Generator | None) -> torch.Tensor:
    """Noise ``U(-eps, eps)`` of ``like``'s shape, dtype and device, drawn only from ``generator``."""
    generator = generator_for(like.device, generator)
    noise = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    r = per_sample(eps, like)
    return noise.mul_(2 * r).sub_(r)


def sign_step(v: torch.Tensor, direction: torch.Tensor, step_size: Scalar) -> torch.Tensor:
    """``v += step_size * sign(direction)`` in place; a negative step descends, a (B,) step is per sample."""
    if isinstance(step_size, torch.Tensor):
        return v.addcmul_(direction.sign(), per_sample(step_size, v))
    return v.add_(direction.sign(), alpha=step_size)


def l1_normalized(grad: torch.Tensor) -> torch.Tensor:
    """``grad / ||grad||_1`` per sample; an all-zero gradient is divided by a tiny floor (it stays 0)."""
    reduce_dims = tuple(range(1, grad.dim()))
    l1 = grad.abs().sum(dim=reduce_dims, keepdim=True).clamp_min_(torch.finfo(grad.dtype).tiny)
    return grad / l1


def momentum_update(momentum: torch.Tensor, grad: torch.Tensor, decay: float) -> torch.Tensor:
    """MI-FGSM's momentum, in place: ``g <- decay * g + grad / ||grad||_1`` (Dong et al. 2018, Alg. 1)."""
    return momentum.mul_(decay).add_(l1_normalized(grad))


def input_grad_and_logits(forward: Forward, v: torch.Tensor, y: torch.Tensor, loss_fn: AttackLoss,
                          targeted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-sample loss w.r.t. ``v`` only, and the (detached) logits of that forward.

    Parameters' ``.grad`` are untouched. Gradients are enabled here, so this works under
    ``torch.no_grad()``. Summing makes each sample's gradient independent of the batch size.
    """
    with torch.enable_grad():
        # A detached view shares v's storage, so the in-place update after this call needs no
        # copy; the graph holding it is freed by autograd.grad before that update.
        leaf = v.detach().requires_grad_(True)
        logits = forward(leaf)
        loss = loss_fn(logits, y, targeted=targeted).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad, logits.detach()


def is_adversarial(pred: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """(B,) bool: predicted class ``pred`` is the target ``y`` (targeted) or anything but ``y``."""
    return pred == y if targeted else pred != y


def sign_ascent(forward: Forward, start: torch.Tensor, y: torch.Tensor, *,
                bounds: tuple[torch.Tensor | float, torch.Tensor | float], steps: int, step_size: Scalar,
                loss_fn: AttackLoss, targeted: bool = False, decay: float | None = None,
                early_stop: bool = False) -> torch.Tensor:
    """Iterate ``v <- Proj(v + step_size * sign(d))`` from ``start`` (updated in place and returned).

    ``d`` is the input gradient of ``loss_fn(forward(v), y)`` (PGD, Madry et al. 2018; m2at.txt
    Eq. 6, a-fan.txt Eq. 2), or with ``decay`` MI-FGSM's momentum of the L1-normalised gradients.
    With ``early_stop`` each sample stays at its first iterate that ``forward`` classifies
    adversarially (read from the forward the next step computes anyway), and the loop ends when
    every sample has stopped. ``v`` may be images (``forward`` the model) or any other tensor the
    loss depends on (A-FAN's feature perturbation, ``forward = lambda d: head(f + d)``).
    """
    v = start
    momentum = torch.zeros_like(v) if decay is not None else None
    active = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
    for _ in range(steps):
        grad, logits = input_grad_and_logits(forward, v, y, loss_fn, targeted)
        if early_stop:
            active &= ~is_adversarial(logits.argmax(1), y, targeted)
            if not active.any():
                break
            grad = grad * per_sample(active, grad)  # sign(0) = 0: stopped samples stay
        if momentum is not None:
            grad = momentum_update(momentum, grad, decay)
        project(sign_step(v, grad, step_size), bounds)
    return v


