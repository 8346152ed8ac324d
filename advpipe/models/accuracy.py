"""Clean accuracy of a classifier on batches: top-1 overall and per class.

It sits with the models, below every stage that measures a model (training, evaluation and the
precompute stage's provenance), so none of them imports a layer above its own.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from advpipe import progress
from advpipe.data.batch import Batch
from advpipe.precision import autocast_context

__all__ = ["evaluate_accuracy"]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Iterable[Batch], num_classes: int, *,
                      precision: str = "fp32", description: str = "evaluate", total: int | None = None,
                      reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Return ``top1``, ``per_class`` accuracies, ``n`` and ``non_finite`` (images with a NaN or inf logit).

    ``reduce`` sums the per-class counts over processes when each evaluated a shard.
    """
    was_training = model.training
    model.eval()
    correct = total_seen = None
    non_finite = torch.zeros((), dtype=torch.long)
    try:
        for batch in progress.track(batches, description, total=total, unit="batch"):
            device = batch.images.device
            if correct is None:
                correct = torch.zeros(num_classes, dtype=torch.long, device=device)
                total_seen = torch.zeros(num_classes, dtype=torch.long, device=device)
            with autocast_context(device, precision):
                logits = model(batch.images)
            pred = logits.argmax(1)
            non_finite = non_finite.to(device) + (~torch.isfinite(logits).all(1)).sum()
            total_seen.index_add_(0, batch.labels, torch.ones_like(batch.labels))
            correct.index_add_(0, batch.labels, (pred == batch.labels).long())
    finally:
        model.train(was_training)
    if correct is None:
        correct = torch.zeros(num_classes, dtype=torch.long)
        total_seen = torch.zeros(num_classes, dtype=torch.long)
    if reduce is not None:
        extra = torch.zeros_like(correct)
        extra[0] = non_finite.to(correct.device)
        counts = reduce(torch.stack([correct, total_seen, extra]).to(correct.device))
        correct, total_seen, non_finite = counts[0], counts[1], counts[2, 0]
    per_class = (correct.float() / total_seen.clamp(min=1).float()).tolist()
    n = int(total_seen.sum())
    return {"top1": float(correct.sum()) / max(n, 1), "per_class": per_class, "n": n, "non_finite": int(non_finite)}
