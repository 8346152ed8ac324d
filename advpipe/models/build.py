"""Building wrapped models for a dataset or from a checkpoint."""

from __future__ import annotations

from advpipe.data.datasets import DatasetSplit
from advpipe.models.checkpoint import Checkpoint, load_state_into
from advpipe.models.normalize import Normalized
from advpipe.models.registry import create_model


def build_model(arch: str, ds: DatasetSplit) -> Normalized:
    """Create ``arch`` for ``ds`` (classes, image size) wrapped with the dataset's normalization."""
    return Normalized(create_model(arch, num_classes=ds.num_classes, image_size=ds.image_shape[-1]), ds.mean, ds.std)


def model_from_checkpoint(ckpt: Checkpoint, *, source: str = "checkpoint") -> Normalized:
    """Rebuild the wrapped model stored in ``ckpt`` and load its weights strictly."""
    net = create_model(ckpt.arch, num_classes=ckpt.num_classes, image_size=ckpt.image_size)
    load_state_into(net, ckpt.model_state, source=source)
    return Normalized(net, ckpt.mean, ckpt.std)
