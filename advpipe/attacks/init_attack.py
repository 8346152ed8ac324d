"""The dense attack behind the sparse attack's ``L_init`` (advmask.txt Sec. III-A c, Eq. 4).

The paper normalises the classification loss by ``L_init``, "the loss of cross entropy with
successful attack" computed by a dense attack "such as PGD and MI-FGSM". :func:`dense_init` runs
the configured kind of the one attack registry (:data:`advpipe.attacks.registry.ATTACKS`; the
kinds that may give ``L_init`` are :data:`INIT_ATTACKS`) with the sparse attack's eps, ``init_steps``
steps of ``init_step_size``, targeted when the sparse attack is, and then makes the attack
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

from typing import TYPE_CHECKING

import torch
from torch import nn

from advpipe.attacks.dense import pgd
from advpipe.attacks.primitives import is_adversarial
from advpipe.attacks.registry import ATTACKS, AttackKind
from advpipe.errors import AdvpipeError

if TYPE_CHECKING:
    from advpipe.attacks.sparse_config import SparseAttackConfig

#: the registry kinds that provide L_init (advmask.txt Sec. III-A c: "such as PGD and MI-FGSM"); the default
#: "pgd-early" stops each image at its first success (docs/attack.md has the sweep that chose it)
INIT_ATTACKS: tuple[str, ...] = ("mifgsm", "pgd", "pgd-early")


def init_attack_kind(name: str) -> AttackKind:
    """The registry kind behind ``init_attack=name``; an AdvpipeError lists the choices for any other name."""
    if name not in INIT_ATTACKS:
        raise AdvpipeError(f"unknown initial attack {name!r}; choose one of: {', '.join(INIT_ATTACKS)}")
    return ATTACKS.get(name)


@torch.no_grad()
def _adversarial(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """(B,) bool: the model classifies ``x_adv`` as ``y`` (targeted) or as anything but ``y``."""
    return is_adversarial(model(x_adv).argmax(1), y, targeted)


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
    kind = init_attack_kind(cfg.init_attack)
    x_init = kind(model, x, y, eps=cfg.eps, steps=cfg.init_steps, step=cfg.init_step_size, targeted=cfg.targeted,
                  generator=generator)
    return continue_until_success(model, x, x_init, y, eps=float(cfg.eps), step_size=float(cfg.init_step_size),
                                  steps=cfg.init_extra_steps, targeted=cfg.targeted)
