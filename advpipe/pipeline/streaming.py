"""Streaming attack masks from a mask store into training, paired with samples by dataset index.

Before anything is read, the store's provenance must match the training data (fingerprint,
split, N, image shape) and be complete; every read is checksum-verified by the store's codecs and
the per-sample content hashes must equal the data's. A CIFAR-sized store is loaded once and kept on
the device bit-packed (about 6 MB per 50k 32x32 masks) and unpacked per batch; larger stores are
read chunk by chunk through a bounded cache. The store is opened read-only and never modified.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from advpipe.data.datasets import DatasetSplit
from advpipe.errors import AdvpipeError
from advpipe.pipeline.store import MaskStore, check_compatible, open_store, sample_hash, unpack_masks

log = logging.getLogger(__name__)

#: stores whose packed masks fit in this many bytes are kept whole on the device
RESIDENT_LIMIT_BYTES = 512 << 20
MASK_DIR = Path("masks")


def find_store(ds: DatasetSplit, search_dir: Path = MASK_DIR) -> str:
    """Return the one complete store under ``search_dir`` made for ``ds``, or say how to make one."""
    matches = []
    for path in sorted(search_dir.glob("*.zarr")) if search_dir.is_dir() else []:
        try:
            store = open_store(path)
        except AdvpipeError:
            continue
        prov = store.provenance["dataset"]
        if store.complete and prov["fingerprint"] == ds.fingerprint and prov["split"] == ds.split:
            matches.append(str(path))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise AdvpipeError(f"several mask stores under {search_dir}/ match this data ({', '.join(matches)}); "
                           f"choose one with --masks")
    limit = f" --limit {len(ds)}" if ds.name != "embedded" or len(ds) != 2000 else ""
    raise AdvpipeError(f"no complete mask store for {ds.name}/{ds.split} (fingerprint {ds.fingerprint[:19]}) under "
                       f"{search_dir}/; run `advpipe precompute-masks --data {ds.name} --split {ds.split}{limit} "
                       f"--model resnet20` first (after training that model), or pass --masks STORE|URL")


def open_for_training(location: str, ds: DatasetSplit) -> MaskStore:
    """Open ``location`` read-only and refuse it unless it is complete and made for exactly ``ds``."""
    store = open_store(location)
    check_compatible(store, fingerprint=ds.fingerprint, split=ds.split, n=len(ds), image_shape=ds.image_shape)
    if ds.in_memory:
        # Per-sample hashes catch a store whose rows are in another order than this dataset's.
        ours = sample_hash(ds.images.numpy(), layout="NCHW")
        theirs = store.sample_hashes()
        bad = np.flatnonzero(ours != theirs)
        if len(bad):
            raise AdvpipeError(f"mask store {location}: {len(bad)} samples do not match the data by content hash "
                               f"(first at index {int(bad[0])})")
    return store


class ResidentMasks:
    """All masks of a store on the device, bit-packed; unpacks the rows of a batch on demand."""

    def __init__(self, store: MaskStore, device: torch.device) -> None:
        """Read every chunk once (checksums verified) and move the packed bits to ``device``."""
        _, self.height, self.width = store.image_shape
        self.packed = torch.from_numpy(store.read_all_packed()).to(device)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Return the (B,H,W) bool masks of the given dataset indices."""
        return unpack_masks(self.packed[index.to(self.packed.device)], self.height, self.width)


class ChunkCache:
    """Masks of a large store read one chunk at a time through a bounded LRU cache.

    Every read is chunk-sized, never one tiny read per sample; memory stays below ``max_chunks``
    decoded chunks. ``prefetch`` reads chunks in a background thread ahead of their use.
    """

    def __init__(self, store: MaskStore, device: torch.device, max_chunks: int = 16) -> None:
        """Wrap ``store``; keep at most ``max_chunks`` decoded chunks."""
        self.store, self.device, self.max_chunks = store, device, max_chunks
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def _chunk(self, i: int) -> torch.Tensor:
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        start, stop = self.store.chunk_bounds(i)
        data = torch.from_numpy(self.store.read_masks(start, stop))
        with self._lock:
            self._cache[i] = data
            while len(self._cache) > self.max_chunks:
                self._cache.popitem(last=False)
        return data

    def prefetch(self, chunks: list[int]) -> threading.Thread:
        """Start reading ``chunks`` in the background (bounded by the cache size)."""
        thread = threading.Thread(target=lambda: [self._chunk(i) for i in chunks[: self.max_chunks // 2]],
                                  daemon=True)
        thread.start()
        return thread

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Return the (B,H,W) bool masks of the given dataset indices."""
        idx = index.cpu()
        chunk_of = idx // self.store.chunk_size
        out = torch.empty(len(idx), *self.store.image_shape[1:], dtype=torch.bool)
        for c in chunk_of.unique().tolist():
            rows = (chunk_of == c).nonzero().squeeze(1)
            out[rows] = self._chunk(c)[idx[rows] - c * self.store.chunk_size]
        return out.to(self.device, non_blocking=True)


def attack_mask_source(location: str | None, ds: DatasetSplit, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return index -> (B,H,W) attack masks for ``ds`` from the store at ``location`` (or the one found)."""
    location = location or find_store(ds)
    store = open_for_training(location, ds)
    _, h, w = store.image_shape
    packed_bytes = store.n * -(-h * w // 8)
    log.info("attack masks from %s (%d masks, %.1f MB packed)", location, store.n, packed_bytes / 1e6)
    if packed_bytes <= RESIDENT_LIMIT_BYTES:
        return ResidentMasks(store, device)
    return ChunkCache(store, device)
