"""Building wrapped models for a dataset or from a checkpoint."""

from __future__ import annotations

import logging

from torch import nn

from advpipe.data.datasets import DatasetSplit
from advpipe.models.checkpoint import Checkpoint, load_state_into
from advpipe.models.normalize import Normalized
from advpipe.models.pretrained import Normalization, load_pretrained
from advpipe.models.registry import create_model

log = logging.getLogger(__name__)


def build_network(arch: str, num_classes: int, image_size: int = 32, *, pretrained: str | None = None,
                  small_stem: bool = False, download: bool = False) -> tuple[nn.Module, Normalization | None]:
    """Create ``arch`` (with ``pretrained`` weights, a small stem); return it and the weights' normalization.

    The normalization is None without ``pretrained``, or when the weights and the architecture
    record none (the caller then uses the data's mean/std).
    """
    net = create_model(arch, num_classes=num_classes, image_size=image_size, small_stem=small_stem)
    norm = load_pretrained(net, arch, pretrained, download=download) if pretrained else None
    return net, norm


def build_model(arch: str, ds: DatasetSplit, *, pretrained: str | None = None, small_stem: bool = False,
                download: bool = False) -> Normalized:
    """Create ``arch`` for ``ds`` (classes, image size), wrapped with the weights' (else the data's) normalization."""
    net, norm = build_network(arch, ds.num_classes, ds.image_shape[-1], pretrained=pretrained, small_stem=small_stem,
                              download=download)
    if pretrained and norm is None:
        log.info("%s records no normalization; using %s's mean/std", pretrained, ds.name)
    mean, std = norm if norm is not None else (ds.mean, ds.std)
    return Normalized(net, mean, std)


def model_from_checkpoint(ckpt: Checkpoint, *, source: str = "checkpoint") -> Normalized:
    """Rebuild the wrapped model stored in ``ckpt`` and load its weights strictly."""
    net = create_model(ckpt.arch, num_classes=ckpt.num_classes, image_size=ckpt.image_size, small_stem=ckpt.small_stem)
    load_state_into(net, ckpt.model_state, source=source)
    return Normalized(net, ckpt.mean, ckpt.std)
