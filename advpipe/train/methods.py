"""The training-objective interface and its registry (AdvProp, A-FAN, M2AT, M-TLAT plug in here).

A method is a small object whose ``step`` returns a dict with at least ``loss``. The training loop
stays one loop for every method: it calls ``prepare`` once, ``step`` per batch, and backpropagates
the returned loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.data.batch import Batch
from advpipe.registry import Registry


@dataclass(frozen=True)
class MethodContext:
    """What a training method may need to know about the run it is built for."""

    num_classes: int
    epochs: int
    image_size: tuple[int, int]


class Method:
    """Base class of training objectives; the default is plain cross-entropy."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Adapt the model before training (e.g. dual BN) and return it."""
        return model

    def step(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Compute this batch's loss; return ``loss`` and optionally ``logits`` for accuracy."""
        raise NotImplementedError

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Hook for schedules that depend on training progress (default: none)."""

    def export_state(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """The plain-architecture state_dict that evaluation loads (e.g. main BNs only for AdvProp)."""
        return net.state_dict()

    def epoch_metrics(self) -> dict[str, float]:
        """Statistics gathered since the last call (e.g. mean attack strength), then reset."""
        return {}


class Standard(Method):
    """Plain cross-entropy on the (possibly augmented) batch."""

    def step(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Cross-entropy of the model on the batch."""
        logits = model(batch.images)
        return {"loss": F.cross_entropy(logits, batch.labels), "logits": logits}


MethodFactory = Callable[..., Method]
METHODS: Registry[MethodFactory] = Registry("training method")


def _standard(ctx: MethodContext, **options: Any) -> Method:
    if options:
        raise TypeError(f"unexpected options {sorted(options)}")
    return Standard()


METHODS.register("standard", _standard)


def build_method(name: str, ctx: MethodContext, **options: Any) -> Method:
    """Create the registered method ``name`` for ``ctx``; unknown options raise."""
    return METHODS.get(name)(ctx, **options)
