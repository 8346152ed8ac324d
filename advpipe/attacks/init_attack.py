"""The dense attack behind the sparse attack's ``L_init`` (advmask.txt Sec. III-A c, Eq. 4).

The paper normalises the classification loss by ``L_init``, "the loss of cross entropy with
successful attack" computed by a dense attack "such as PGD and MI-FGSM". :func:`dense_init` runs
the configured attack of :data:`INIT_ATTACKS` for ``init_steps`` steps and then makes the attack
*successful* wherever it can: every image the model does not yet classify adversarially (not its
label; its target when targeted) continues with PGD from where it stands, same eps and step size,
no restart, each image stopped at its first success, for at most ``init_extra_steps`` more steps.
The cap on the whole dense attack is therefore ``init_steps + init_extra_steps`` steps (100 by
default). Images that still fail at the cap keep their last iterate (``init_success`` is False).

Success is judged in the precision the caller runs in (the sparse attack's optimisation
precision), as the early stop of ``pgd-early`` is; the sparse attack reports ``init_success`` in
float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from advpipe.attacks.dense import mifgsm, pgd
from advpipe.registry import Registry

if TYPE_CHECKING:
    from advpipe.attacks.sparse import SparseAttackConfig


def _init_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SparseAttackConfig,
              generator: torch.Generator) -> torch.Tensor:
    """PGD (random start) on the sparse attack's eps, for L_init."""
    return pgd(model, x, y, eps=float(cfg.eps), steps=cfg.init_steps, step_size=float(cfg.init_step_size),
               random_start=True, targeted=cfg.targeted, generator=generator)


def _init_pgd_early(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SparseAttackConfig,
                    generator: torch.Generator) -> torch.Tensor:
    """PGD as ``_init_pgd``, but each image stops at its first successful iterate (L_init "at success")."""
    return pgd(model, x, y, eps=float(cfg.eps), steps=cfg.init_steps, step_size=float(cfg.init_step_size),
               random_start=True, targeted=cfg.targeted, generator=generator, early_stop=True)


def _init_mifgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SparseAttackConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """MI-FGSM (decay 1) on the sparse attack's eps, for L_init."""
    return mifgsm(model, x, y, eps=float(cfg.eps), steps=cfg.init_steps, step_size=float(cfg.init_step_size),
                  decay=1.0, targeted=cfg.targeted, generator=generator)


#: dense attacks that provide L_init (advmask.txt Sec. III-A c: "such as PGD and MI-FGSM"); the default
#: "pgd-early" stops each image at its first success (docs/attack.md has the sweep that chose it)
INIT_ATTACKS: Registry[Callable[..., torch.Tensor]] = Registry("initial attack")
INIT_ATTACKS.register("pgd", _init_pgd)
INIT_ATTACKS.register("pgd-early", _init_pgd_early)
INIT_ATTACKS.register("mifgsm", _init_mifgsm)


@torch.no_grad()
def _adversarial(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """(B,) bool: the model classifies ``x_adv`` as ``y`` (targeted) or as anything but ``y``."""
    pred = model(x_adv).argmax(1)
    return pred == y if targeted else pred != y


def continue_until_success(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, *,
                           eps: float, step_size: float, steps: int, targeted: bool) -> torch.Tensor:
    """Continue PGD from ``x_adv`` on the images not yet adversarial, each stopped at its first success.

    At most ``steps`` more steps (0: return ``x_adv``); images already adversarial are returned as
    they are. The ball is the eps ball around ``x``; nothing random is drawn.
    """
    if steps == 0 or x.shape[0] == 0:
        return x_adv
    failed = ~_adversarial(model, x_adv, y, targeted)
    idx = failed.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x_adv
    more = pgd(model, x[idx], y[idx], eps=eps, steps=steps, step_size=step_size, targeted=targeted,
               early_stop=True, start=x_adv[idx])
    return x_adv.index_copy(0, idx, more)


def dense_init(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SparseAttackConfig,
               generator: torch.Generator) -> torch.Tensor:
    """The dense attack whose cross-entropy is ``L_init``: ``cfg.init_attack``, then continued to success (capped)."""
    x_init = INIT_ATTACKS.get(cfg.init_attack)(model, x, y, cfg, generator)
    return continue_until_success(model, x, x_init, y, eps=float(cfg.eps), step_size=float(cfg.init_step_size),
                                  steps=cfg.init_extra_steps, targeted=cfg.targeted)
