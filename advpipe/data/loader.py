"""Batches on the device: shuffling, pad-crop/flip and float conversion happen where training runs.

In-memory datasets (all CIFAR-sized ones, and image-file splits that fit the image cache, see
:mod:`advpipe.data.cache`) keep their uint8 tensor on the device and gather each batch by index.
Larger image-file splits are streamed: each batch's files are read and decoded on a pool of
``workers`` threads (on CUDA the JPEGs are decoded on the GPU), one batch ahead, then reach the
same device-side transform. Side data (per-sample (H,W) tensors such as attack masks) is looked up
by dataset index, or computed from the batch's images as they are stored (:class:`FromImages`,
e.g. Harris corners), and goes through the same crop (pad-crop or RandomResizedCrop) and flip.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Union

import torch

from advpipe.data.batch import Batch
from advpipe.data.datasets import DatasetSplit
from advpipe.data.decode import decode_batch
from advpipe.data.transforms import apply_crop_flip, apply_resized_crop, sample_crop_flip, sample_resized_crop
from advpipe.errors import AdvpipeError
from advpipe.rng import epoch_seed


@dataclass(frozen=True)
class FromImages:
    """Side data computed from each batch's stored images, before the crop and flip (which it then follows).

    ``fn`` maps the uint8 (B,C,H,W) images on the loader's device to (B,H,W), so what it finds
    there never sees the padding; the result is cropped and flipped exactly like the images.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]


#: a side source is an (N,H,W) tensor indexed by dataset index, a function index -> (B,H,W), or
#: :class:`FromImages` (a function of the un-padded, un-cropped images)
SideSource = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], FromImages]


def block_shuffle(n: int, block: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of ``range(n)`` that reads blocks of ``block`` consecutive indices ``window`` at a time.

    The blocks are visited in random order; the indices of each group of ``window`` consecutive
    blocks in that order are shuffled together. A streamed store then needs only about ``window``
    chunks in memory at once, and every sample still appears exactly once per epoch.
    """
    if block < 1 or window < 1:
        raise ValueError(f"block and window must be >= 1, got {block}, {window}")
    n_blocks = -(-n // block)
    blocks = torch.randperm(n_blocks, generator=generator)
    parts = []
    for g in range(0, n_blocks, window):
        index = torch.cat([torch.arange(b * block, min(n, (b + 1) * block)) for b in blocks[g : g + window].tolist()])
        parts.append(index[torch.randperm(len(index), generator=generator)])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

#: the training crops: the pad-and-crop of CIFAR, or RandomResizedCrop (fine-tuning at 224)
CROPS = ("pad", "random-resized")


class DeviceLoader:
    """Yields :class:`Batch` objects on ``device`` with per-sample crop/flip when ``train`` is set.

    Each epoch's order and augmentation come from generators seeded by (seed, epoch), so the same
    seed gives the same batches and a resumed run continues exactly. With ``world_size > 1`` each
    rank takes a disjoint, equally long shard of every epoch's shuffled order. ``indices`` restricts
    the loader to those dataset indices (a held-out validation split, or the rest of the training
    split), which keep their dataset index, so side data still lines up. A side source with a
    ``shuffle_blocks`` attribute (block, window) makes the training order chunk-aware
    (:func:`block_shuffle`); one with a ``plan`` method is told each epoch's order before it starts.
    ``crop="random-resized"`` replaces the pad-and-crop of training batches by a RandomResizedCrop
    (scale (0.08, 1), ratio (3/4, 4/3)) back to the stored size; side data follows it (nearest).
    An image-file split is decoded once into memory when it fits the image cache (on ``workers``
    threads), else streamed batch by batch.
    """

    def __init__(
        self,
        ds: DatasetSplit,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        train: bool = True,
        seed: int = 0,
        pad: int = 4,
        flip: bool = True,
        drop_last: bool | None = None,
        side: Mapping[str, SideSource] | None = None,
        workers: int = 2,
        rank: int = 0,
        world_size: int = 1,
        indices: torch.Tensor | None = None,
        crop: str = "pad",
    ) -> None:
        """Prepare batches of ``ds``; in-memory (or cached) images are moved to ``device`` once, here."""
        if crop not in CROPS:
            raise AdvpipeError(f"unknown crop {crop!r}; choose one of: {', '.join(CROPS)}", fields=("crop",))
        self.crop = crop
        self.ds = ds
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = train
        self.seed = seed
        self.pad = pad if train else 0
        self.flip = flip and train
        self.drop_last = train if drop_last is None else drop_last
        self.side = dict(side or {})
        blocks = [src.shuffle_blocks for src in self.side.values() if getattr(src, "shuffle_blocks", None)]
        self.shuffle_blocks: tuple[int, int] | None = blocks[0] if blocks else None
        self.workers = workers
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long).cpu()
        held = ds.decoded_images(threads=max(1, workers))  # channels_last: crops, flips and floats keep it
        self.images = held.to(self.device, memory_format=torch.channels_last) if held is not None else None
        self.labels = ds.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        subset = self.indices
        n = len(self.ds) if subset is None else len(subset)
        if self.train:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            if self.shuffle_blocks:
                order = block_shuffle(len(self.ds), *self.shuffle_blocks, generator=gen)
                if subset is not None:  # keep the chunk-aware order, restricted to the subset
                    keep = torch.zeros(len(self.ds), dtype=torch.bool)
                    keep[subset] = True
                    order = order[keep[order]]
            else:
                order = torch.randperm(n, generator=gen)
                order = order if subset is None else subset[order]
        else:
            order = torch.arange(n) if subset is None else subset
        if self.world_size > 1:
            per_rank = n // self.world_size if self.train else -(-n // self.world_size)
            order = order[self.rank :: self.world_size][:per_rank]
        return order

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        if self.drop_last:
            order = order[: len(order) // self.batch_size * self.batch_size]
        for src in self.side.values():
            if hasattr(src, "plan"):
                src.plan(order)  # e.g. start reading mask chunks ahead, in this order
        # crops and flips differ per rank; rank 0 keeps the single-process stream
        gen = torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, self.epoch, stream=1 + 10 * self.rank))
        for index, images in self._raw_batches(order):
            yield self._finish(index, images, gen)

    def _raw_batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (dataset indices on device, uint8 images on device) in ``order``."""
        if self.images is not None:
            order_dev = order.to(self.device)
            for start in range(0, len(order_dev), self.batch_size):
                index = order_dev[start : start + self.batch_size]
                # index_select along N of the (N,H,W,C) memory: the batch stays channels_last
                yield index, self.images.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
            return
        yield from self._stream(order)

    def _stream(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decode the files of each batch on ``workers`` threads, the next batch while this one is used."""
        files, size, policy = self.ds.files, self.ds.image_shape[-1], self.ds.resize
        assert files is not None
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        pool = ThreadPoolExecutor(max_workers=self.workers) if self.workers > 0 else None
        ahead = ThreadPoolExecutor(max_workers=1)  # one batch in flight: memory stays at two batches

        def load(index: torch.Tensor) -> torch.Tensor:
            return decode_batch([files[i] for i in index.tolist()], size, policy, device=self.device, pool=pool)

        try:
            pending = ahead.submit(load, batches[0]) if batches else None
            for k, index in enumerate(batches):
                assert pending is not None
                images = pending.result()
                pending = ahead.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
                yield index.to(self.device), images
        finally:
            ahead.shutdown(wait=True, cancel_futures=True)
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _finish(self, index: torch.Tensor, images: torch.Tensor, gen: torch.Generator) -> Batch:
        """Look up labels and side data, run crop/flip on all of them, convert images to float."""
        side = {name: self._side(src, index, images) for name, src in self.side.items()}
        if self.train and self.crop == "random-resized":
            params = sample_resized_crop(len(index), *images.shape[-2:], flip=self.flip, generator=gen,
                                         device=self.device)
            images = apply_resized_crop(images, params)
            side = {name: apply_resized_crop(t, params, mode="nearest") for name, t in side.items()}
        elif self.train and (self.pad or self.flip):
            params = sample_crop_flip(len(index), pad=self.pad, flip=self.flip, generator=gen, device=self.device)
            images = apply_crop_flip(images, params)
            side = {name: apply_crop_flip(t, params) for name, t in side.items()}
        # channels_last on every device: oneDNN's CPU convolutions gain too (benchmarks/README.md); a
        # channels_last uint8 batch (the in-memory path) is converted in one pass, without a layout copy
        floats = images.div(255.0).contiguous(memory_format=torch.channels_last)
        return Batch(floats, self.labels[index], index, side)

    def _side(self, src: SideSource, index: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if isinstance(src, FromImages):
            return src.fn(images).to(self.device)
        if callable(src) and not isinstance(src, torch.Tensor):
            return src(index).to(self.device)
        return src[index.to(src.device)].to(self.device)
