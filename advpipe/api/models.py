"""Classifiers from the registry, timm, torchvision, pretrained weights or advpipe checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from advpipe.errors import AdvpipeError
from advpipe.models.build import build_network, model_from_checkpoint
from advpipe.models.checkpoint import load_checkpoint, resolve_checkpoint
from advpipe.models.normalize import Normalized

__all__ = ["create_model", "load_model"]


def create_model(name: str, num_classes: int, image_size: int = 32, *, pretrained: str | Path | None = None,
                 small_stem: bool = False, download: bool = False, normalized: bool = False) -> nn.Module:
    """Build model ``name`` (registered, torchvision, ``torchvision:NAME`` or ``timm:NAME``) for ``num_classes``.

    ``pretrained`` loads weights: a ``.safetensors``/``.pth`` file (never unpickled), or
    ``"torchvision"``/``"timm"`` for the library's cached weights (``download=True`` fetches them);
    the head is replaced when the class count differs and the rest loads strictly. ``small_stem``
    makes a ResNet stem keep resolution (stride-1 first conv, no max-pool). The network is bare
    (normalized inputs, timm's habit); ``normalized=True`` wraps it in
    :class:`~advpipe.models.normalize.Normalized` with the weights' own mean/std, so it takes
    [0,1] images as the attacks expect.
    """
    net, norm = build_network(name, num_classes, image_size, pretrained=str(pretrained) if pretrained else None,
                              small_stem=small_stem, download=download)
    if not normalized:
        return net
    if norm is None:
        raise AdvpipeError(f"{pretrained or name} records no normalization; wrap the network yourself: "
                           "Normalized(create_model(...), mean, std)")
    return Normalized(net, *norm)


def load_model(checkpoint: str | Path, *, device: torch.device | str = "cpu") -> Normalized:
    """Load an advpipe checkpoint (a path, or ``builtin:resnet20-cifar10``) as a model in eval mode.

    The model normalizes inside (:class:`advpipe.models.normalize.Normalized`), so it takes
    (B,C,H,W) images in [0,1], as every attack and :func:`advpipe.precompute_masks` expect.
    Loading uses ``torch.load(weights_only=True)``; nothing is unpickled.
    """
    path = resolve_checkpoint(checkpoint)
    model = model_from_checkpoint(load_checkpoint(path), source=str(path))
    return model.to(device).eval()
