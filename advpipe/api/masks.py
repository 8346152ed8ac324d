"""A mask store opened for your own training loop: the attack masks of any dataset indices, on any device.

:func:`open_masks` opens a finished store (a local path, a ``.zip`` or an fsspec URL, optionally
pinned by content digest) read-only and returns :class:`AttackMasks`. ``masks(indices, device)``
returns the (B,H,W) bool masks of those dataset indices. Small stores (every CIFAR-sized one) are
read once and kept bit-packed on the device (128 bytes per 32x32 mask), larger ones are read chunk
by chunk through a bounded cache, exactly as ``advpipe train`` reads them
(:mod:`advpipe.pipeline.streaming`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from advpipe.data.user import as_tensors, to_uint8
from advpipe.errors import AdvpipeError
from advpipe.pipeline.codecs import sample_hash
from advpipe.pipeline.reader import MaskStore, open_store
from advpipe.pipeline.streaming import mask_reader

__all__ = ["AttackMasks", "open_masks"]


class AttackMasks:
    """The attack masks of a complete mask store, looked up by dataset index (see :func:`open_masks`).

    Example::

        masks = advpipe.open_masks("masks/cifar10-train-resnet20-eps8_255.zarr")
        m = masks.masks(index, device)        # (B,H,W) bool, True = attack point
        masks.provenance["model"]["arch"], masks.summary["asr"]
    """

    def __init__(self, store: MaskStore) -> None:
        """Wrap an opened store; refuses one whose precompute run has not finished."""
        store.require_complete()
        self.store = store
        self._readers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"AttackMasks({self.store.location.root!r}, n={self.n}, image_shape={self.image_shape})"

    def __len__(self) -> int:
        return self.store.n

    @property
    def n(self) -> int:
        """Number of samples (masks) in the store."""
        return self.store.n

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C,H,W) of the images the masks belong to."""
        return tuple(self.store.image_shape)  # type: ignore[return-value]

    @property
    def provenance(self) -> dict[str, Any]:
        """The store's provenance: dataset, model, attack, seed, versions, summary."""
        return self.store.provenance

    @property
    def summary(self) -> dict[str, Any]:
        """ASR and the l0/l2/l_inf means and medians over the images the model classified correctly."""
        return self.store.provenance["summary"]

    @property
    def digest(self) -> str | None:
        """The store's content digest ``sha256:<hex>`` (None if it has no manifest)."""
        return self.store.digest

    def _reader(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        key = str(device)
        if key not in self._readers:
            self._readers[key] = mask_reader(self.store, device)
        return self._readers[key]

    def masks(self, indices: torch.Tensor | Sequence[int] | np.ndarray,
              device: torch.device | str | None = None) -> torch.Tensor:
        """Return the (B,H,W) bool masks of the dataset ``indices`` on ``device`` (default: the indices' device)."""
        index = torch.as_tensor(indices)
        if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise AdvpipeError(f"indices must be a 1-d sequence of integers, got {index.dtype} of shape "
                               f"{tuple(index.shape)}")
        index = index.long()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.n):
            raise AdvpipeError(f"dataset indices must lie in [0, {self.n}) for this store, got "
                               f"[{int(index.min())}, {int(index.max())}]")
        target = torch.device(device) if device is not None else index.device
        return self._reader(target)(index).to(target)

    __call__ = masks

    def check_data(self, data: Dataset | Sequence[Any]) -> None:
        """Raise AdvpipeError unless ``data`` holds exactly the store's images, in the store's order.

        ``data`` is a dataset or ``(images, labels)`` as :func:`advpipe.data.user.as_tensors` takes
        it; each image's per-sample hash (of its uint8 pixels) must equal the stored one.
        """
        images, _ = as_tensors(data)
        if len(images) != self.n or tuple(images.shape[1:]) != self.image_shape:
            raise AdvpipeError(f"the data has {len(images)} images of shape {tuple(images.shape[1:])}, the store "
                               f"{self.n} of shape {self.image_shape}")
        self.store.check_samples(sample_hash(to_uint8(images).numpy(), layout="NCHW"))


def open_masks(location: str | os.PathLike[str] | AttackMasks, *, digest: str | None = None,
               storage_options: dict[str, Any] | None = None) -> AttackMasks:
    """Open a finished mask store read-only: a path, a ``.zip``, or a URL such as ``s3://bucket/c10.zarr``.

    ``digest`` (or ``LOCATION#sha256=HEX``) pins the content, ``storage_options`` reach a remote
    store (e.g. ``{"anon": True}``). An :class:`AttackMasks` is returned as it is.
    """
    if isinstance(location, AttackMasks):
        return location
    return AttackMasks(open_store(location, storage_options=storage_options, digest=digest))
