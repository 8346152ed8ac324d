"""Dual batch normalization for AdvProp (advprop.txt Sec. 4.2, Fig. 3b), and BN-statistics guards.

:func:`convert_dual_bn` replaces every ``BatchNorm1d/2d/3d`` of a model by a
:class:`DualBatchNorm1d/2d/3d`: the module *is* the main BN (same class hierarchy, same
parameters and buffers, so the same ``state_dict`` keys) and holds the auxiliary BN as its child
``aux``. A routing switch chooses which of the two normalizes the input; :func:`use_aux_bn`
flips every switch of a model inside a ``with`` block. Because the main BN keeps its keys,
:func:`main_bn_state` (the state without the ``.aux.`` entries) loads strictly into the plain
architecture: that is how "at test time, these extra auxiliary BNs are all dropped" is done.

Example::

    net = convert_dual_bn(create_model("resnet20", 10))
    with use_aux_bn(net):
        logits_adv = net(x_adv)          # auxiliary BNs
    logits = net(x)                      # main BNs (the default route)
    plain.load_state_dict(main_bn_state(net))

:func:`preserve_bn_stats` restores the running statistics of every BN after a block of forwards,
so attack iterations run with batch statistics (train mode, the function the loss sees) without
leaving their images in the running averages that evaluation uses.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from advpipe.errors import AdvpipeError


class _DualMixin:
    """Forward through ``self`` (main BN) or ``self.aux`` depending on ``self.route``."""

    route: str
    aux: _BatchNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x`` with the main BN, or with the auxiliary BN when routed to ``aux``."""
        if self.route == "aux":
            return self.aux(x)
        return super().forward(x)  # type: ignore[misc]

    def extra_repr(self) -> str:
        """BN's description plus the current route."""
        return super().extra_repr() + f", route={self.route}"  # type: ignore[misc]


class DualBatchNorm1d(_DualMixin, nn.BatchNorm1d):
    """A BatchNorm1d (the main BN) with an auxiliary BatchNorm1d child ``aux``."""


class DualBatchNorm2d(_DualMixin, nn.BatchNorm2d):
    """A BatchNorm2d (the main BN) with an auxiliary BatchNorm2d child ``aux``."""


class DualBatchNorm3d(_DualMixin, nn.BatchNorm3d):
    """A BatchNorm3d (the main BN) with an auxiliary BatchNorm3d child ``aux``."""


_DUAL_OF = {nn.BatchNorm1d: DualBatchNorm1d, nn.BatchNorm2d: DualBatchNorm2d, nn.BatchNorm3d: DualBatchNorm3d}
DUAL_TYPES = tuple(_DUAL_OF.values())


def _dual_from(bn: _BatchNorm) -> _BatchNorm:
    """A dual BN whose main and auxiliary halves both start as copies of ``bn``."""
    dual = _DUAL_OF[type(bn)](bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                              track_running_stats=bn.track_running_stats)
    aux = type(bn)(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    ref = next(iter(bn.state_dict().values()), None)
    if ref is not None:
        dual.to(device=ref.device)
        aux.to(device=ref.device)
    state = bn.state_dict()
    dual.load_state_dict(state)
    aux.load_state_dict(state)
    dual.aux = aux
    dual.route = "main"
    dual.train(bn.training)
    aux.train(bn.training)
    return dual


def convert_dual_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in ``model`` (in place) by a dual BN; return ``model``.

    The auxiliary BN starts as a copy of the main one (AdvProp trains both from the same
    initialization). Converting twice is a no-op; SyncBatchNorm and other BN subclasses raise
    AdvpipeError because their state layout cannot be mirrored safely.
    """
    if type(model) in _DUAL_OF:
        raise AdvpipeError("convert_dual_bn needs a model containing BatchNorm layers, not a bare BatchNorm")
    converted = 0
    for parent in list(model.modules()):
        if isinstance(parent, DUAL_TYPES):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, DUAL_TYPES):
                continue
            if type(child) in _DUAL_OF:
                setattr(parent, name, _dual_from(child))
                converted += 1
            elif isinstance(child, _BatchNorm):
                raise AdvpipeError(f"cannot add an auxiliary BN to {type(child).__name__} at {name!r}; "
                                   "only BatchNorm1d/2d/3d are supported")
    if converted == 0 and not any(isinstance(m, DUAL_TYPES) for m in model.modules()):
        raise AdvpipeError("AdvProp needs a model with BatchNorm layers; this one has none")
    return model


def dual_bn_modules(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Return ``(qualified name, module)`` of every dual BN in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DUAL_TYPES)]


@contextlib.contextmanager
def use_aux_bn(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every dual BN of ``model`` uses its auxiliary BN; the old routes come back after."""
    duals = dual_bn_modules(model)
    if not duals:
        raise AdvpipeError("use_aux_bn: the model has no dual BN layers (call convert_dual_bn first)")
    previous = [m.route for _, m in duals]
    for _, m in duals:
        m.route = "aux"
    try:
        yield model
    finally:
        for (_, m), route in zip(duals, previous):
            m.route = route


def main_bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of ``model`` without auxiliary BN entries: loadable by the plain architecture."""
    prefixes = tuple(f"{name}.aux." if name else "aux." for name, _ in dual_bn_modules(model))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


@contextlib.contextmanager
def preserve_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every BN's running mean/var and batch counter on exit (forwards still use batch stats).

    Cheaper and exact compared with momentum tricks: BN momentum 0 would still bump
    ``num_batches_tracked``, and eval-mode BN would change the function being attacked.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            saved.append((m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()))
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
