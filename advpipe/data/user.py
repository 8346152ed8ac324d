"""Users' own data: a torch ``Dataset`` or tensors as one (images, labels) pair, and dataset indices.

advpipe pairs every attack mask with its sample by **dataset index** (the position in the
dataset), so a training loop needs each sample's index next to its image: :class:`IndexedDataset`
adds it to any map-style dataset. :func:`as_tensors` reads a dataset once into memory for the
precompute stage, and :func:`fingerprint_tensors` names its content for the store's provenance.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from advpipe.data.fingerprint import fingerprint_arrays
from advpipe.errors import AdvpipeError

__all__ = ["IndexedDataset", "as_tensors", "fingerprint_tensors", "to_uint8"]

#: prefix of the content hash of float images (uint8 images use the datasets' own fingerprint)
FLOAT_FINGERPRINT_VERSION = "advpipe-fp1-float32"


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that item ``i`` is ``(*item, i)``: the sample plus its dataset index.

    Example::

        loader = DataLoader(IndexedDataset(train_set), batch_size=128, shuffle=True)
        for images, labels, index in loader:
            masks = store.masks(index, device)
    """

    def __init__(self, dataset: Dataset) -> None:
        """Wrap ``dataset``, whose items are tuples such as ``(image, label)``."""
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        return (*item, index) if isinstance(item, (tuple, list)) else (item, index)


def _image_tensor(image: Any) -> torch.Tensor:
    """One image as a (C,H,W) tensor: tensors as they are, (H,W,C) arrays and PIL images as uint8."""
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, np.ndarray):
        array = image[:, :, None] if image.ndim == 2 else image
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image, as torchvision datasets give
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image)
    raise AdvpipeError(f"dataset items must hold an image tensor, array or PIL image first, got {type(image).__name__}")


def as_tensors(data: Dataset | Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: (N,C,H,W) uint8 or float in [0,1] and (N,) int64, on the CPU.

    ``data`` is a pair ``(images, labels)`` of tensors or arrays, or a map-style dataset whose items
    start with ``(image, label)`` (a tensor, an HWC array or a PIL image, and an int or 0-d tensor).
    Float images must lie in [0,1]; every image must have the same shape.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
        images, labels = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in data)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if not items:
            raise AdvpipeError("the dataset is empty")
        if not all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items):
            raise AdvpipeError("dataset items must be tuples that start with (image, label)")
        try:
            images = torch.stack([_image_tensor(item[0]) for item in items])
        except RuntimeError as exc:
            raise AdvpipeError(f"dataset images differ in shape: {exc}") from exc
        labels = torch.as_tensor([int(item[1]) for item in items])
    else:
        raise AdvpipeError(f"data must be a map-style torch Dataset or a pair (images, labels), "
                           f"got {type(data).__name__}")
    images, labels = images.detach().cpu(), labels.detach().cpu().long()
    if images.dim() != 4 or len(images) == 0:
        raise AdvpipeError(f"images must be a non-empty (N,C,H,W) batch, got shape {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise AdvpipeError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    if images.is_floating_point():
        if not bool(((images >= 0) & (images <= 1)).all()):
            raise AdvpipeError("float images must lie in [0,1] (normalization belongs inside the model)")
    elif images.dtype != torch.uint8:
        raise AdvpipeError(f"images must be uint8 or float in [0,1], got {images.dtype}")
    return images.contiguous(), labels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as they are; [0,1] floats rounded to the nearest of the 256 levels."""
    return images if images.dtype == torch.uint8 else images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def fingerprint_tensors(images: torch.Tensor, labels: torch.Tensor) -> str:
    """The content hash of (N,C,H,W) images and their labels, as a store's ``dataset.fingerprint``.

    uint8 images get exactly the fingerprint advpipe's own datasets have (so a store made from the
    embedded images as tensors is one ``advpipe train --data embedded`` accepts); float images get a
    sha256 over their float32 bytes, so values that differ below 1/255 still differ.
    """
    if images.dtype == torch.uint8:
        return fingerprint_arrays(images.permute(0, 2, 3, 1).numpy(), labels.numpy())
    h = hashlib.sha256(f"{FLOAT_FINGERPRINT_VERSION}|{tuple(images.shape)}|".encode())
    h.update(images.float().permute(0, 2, 3, 1).contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(labels.numpy(), dtype="<i8").tobytes())
    return "sha256:" + h.hexdigest()
