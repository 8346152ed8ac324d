"""Classifiers from advpipe checkpoints, ready for attacks and precompute: [0,1] images in, logits out."""

from __future__ import annotations

from pathlib import Path

import torch

from advpipe.models.build import model_from_checkpoint
from advpipe.models.checkpoint import load_checkpoint, resolve_checkpoint
from advpipe.models.normalize import Normalized

__all__ = ["load_model"]


def load_model(checkpoint: str | Path, *, device: torch.device | str = "cpu") -> Normalized:
    """Load an advpipe checkpoint (a path, or ``builtin:resnet20-cifar10``) as a model in eval mode.

    The model normalizes inside (:class:`advpipe.models.normalize.Normalized`), so it takes
    (B,C,H,W) images in [0,1], as every attack and :func:`advpipe.precompute_masks` expect.
    Loading uses ``torch.load(weights_only=True)``; nothing is unpickled.
    """
    path = resolve_checkpoint(checkpoint)
    model = model_from_checkpoint(load_checkpoint(path), source=str(path))
    return model.to(device).eval()
