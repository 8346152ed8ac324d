"""Streaming attack masks from a mask store into training, paired with samples by dataset index.

Before anything is read, the store's provenance must match the training data (fingerprint,
split, N, image shape) and be complete; every read is checksum-verified by the store's codecs and
the per-sample content hashes must equal the data's. A CIFAR-sized store is loaded once and kept on
the device bit-packed (about 6 MB per 50k 32x32 masks) and unpacked per batch; larger stores are
read chunk by chunk, ahead of use in a background thread, through a bounded cache, and training
visits them in a chunk-aware shuffled order. The store is opened read-only and never modified.
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
from advpipe.pipeline.codecs import sample_hash, unpack_masks
from advpipe.pipeline.reader import MaskStore, check_compatible, open_store

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
                           f"choose one with masks", fields=("masks",))
    limit = f" --limit {len(ds)}" if ds.name != "embedded" or len(ds) != 2000 else ""
    raise AdvpipeError(f"no complete mask store for {ds.name}/{ds.split} (fingerprint {ds.fingerprint[:19]}) under "
                       f"{search_dir}/; run `advpipe precompute-masks --data {ds.name} --split {ds.split}{limit} "
                       f"--model resnet20` first (after training that model), or pass masks STORE|URL",
                       fields=("masks",))


def open_for_training(location: str, ds: DatasetSplit) -> MaskStore:
    """Open ``location`` read-only and refuse it unless it is complete and made for exactly ``ds``."""
    store = open_store(location)
    check_compatible(store, fingerprint=ds.fingerprint, split=ds.split, n=len(ds), image_shape=ds.image_shape)
    if ds.in_memory:  # per-sample hashes catch a store whose rows are in another order than this dataset's
        store.check_samples(sample_hash(ds.images.numpy(), layout="NCHW"))
    return store


def mask_reader(store: MaskStore, device: torch.device) -> "ResidentMasks | ChunkCache":
    """Index -> (B,H,W) masks of ``store`` on ``device``: kept whole and bit-packed if small, else chunk by chunk."""
    _, h, w = store.image_shape
    packed_bytes = store.n * -(-h * w // 8)
    return ResidentMasks(store, device) if packed_bytes <= RESIDENT_LIMIT_BYTES else ChunkCache(store, device)


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
    """Masks of a large store read one chunk at a time, in the background, through a bounded cache.

    Every read is chunk-sized, never one tiny read per sample. ``shuffle_blocks`` asks the training
    loader for a chunk-aware shuffled order (chunks in random order, ``window`` chunks' samples
    shuffled together, see :func:`advpipe.data.loader.block_shuffle`); :meth:`plan` then starts a
    thread that reads the epoch's chunks in order of first use, at most ``ahead`` chunks beyond the
    furthest one training has reached. At most ``max_chunks`` decoded chunks stay in memory (two
    windows, as a batch may straddle them, plus the read-ahead); eviction drops chunks training is
    done with first, else the one needed furthest in the future. A chunk the thread could not read is read again on use,
    so errors surface in training with their own message.
    """

    def __init__(self, store: MaskStore, device: torch.device, window: int = 8, ahead: int | None = None,
                 max_chunks: int | None = None) -> None:
        """Wrap ``store``: shuffle ``window`` chunks together, read up to ``ahead`` (default ``window``) chunks ahead."""
        if window < 1:
            raise AdvpipeError(f"chunk window must be >= 1, got {window}")
        self.store, self.device, self.window = store, device, window
        self.ahead = window if ahead is None else ahead
        # a batch may straddle two windows; ahead of them, the read-ahead
        self.max_chunks = max_chunks or (2 * window + self.ahead)
        self.shuffle_blocks = (store.chunk_size, window)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._loading: set[int] = set()
        self._cond = threading.Condition()
        self._plan: dict[int, int] = {}  # chunk -> position in this epoch's chunk sequence
        self._reached = -1  # furthest position of the current batch's chunks
        self._low = -1  # earliest position of the current batch's chunks
        self._generation = 0

    def _chunk(self, i: int) -> torch.Tensor:
        with self._cond:
            while i not in self._cache and i in self._loading:
                self._cond.wait()  # the read-ahead thread is reading it: wait instead of reading twice
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
            self._loading.add(i)
        try:
            start, stop = self.store.chunk_bounds(i)
            data = torch.from_numpy(self.store.read_masks(start, stop))
        except BaseException:
            with self._cond:
                self._loading.discard(i)
                self._cond.notify_all()
            raise
        with self._cond:
            # Leave "loading" and enter the cache in one step: in between, another thread would find
            # the chunk in neither and read it a second time.
            self._loading.discard(i)
            self._cache[i] = data
            while len(self._cache) > self.max_chunks:
                del self._cache[self._victim()]
            self._cond.notify_all()
        return data

    def _victim(self) -> int:
        """The chunk to drop: one training is done with (before the current batch in this epoch's
        order, or off the plan), else the one needed furthest in the future."""
        position = {c: self._plan.get(c, -1) for c in self._cache}
        done = [c for c, pos in position.items() if pos < self._low]
        return min(done, key=position.__getitem__) if done else max(position, key=position.__getitem__)

    def plan(self, order: torch.Tensor) -> threading.Thread:
        """Start reading this epoch's chunks in order of first use (replacing any earlier plan)."""
        chunks = (order.cpu() // self.store.chunk_size).numpy()
        _, first = np.unique(chunks, return_index=True)
        sequence = chunks[np.sort(first)].tolist()
        with self._cond:
            self._generation += 1
            self._plan = {c: pos for pos, c in enumerate(sequence)}
            self._reached = self._low = -1
            self._cond.notify_all()
        thread = threading.Thread(target=self._read_ahead, args=(sequence, self._generation), daemon=True,
                                  name="advpipe-mask-read-ahead")
        thread.start()
        return thread

    def _read_ahead(self, sequence: list[int], generation: int) -> None:
        for pos, chunk in enumerate(sequence):
            with self._cond:
                while generation == self._generation and pos > self._reached + self.ahead:
                    self._cond.wait()
                if generation != self._generation:
                    return
            try:
                self._chunk(chunk)
            except Exception as exc:  # noqa: BLE001 - training reads the chunk itself and reports the error
                log.debug("mask read-ahead stopped at chunk %d: %s", chunk, exc)
                return

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Return the (B,H,W) bool masks of the given dataset indices."""
        idx = index.cpu()
        chunk_of = idx // self.store.chunk_size
        needed = chunk_of.unique().tolist()
        with self._cond:
            positions = [self._plan.get(c, -1) for c in needed]
            self._low = max(self._low, min(positions, default=-1))
            reached = max(positions, default=-1)
            if reached > self._reached:
                self._reached = reached
                self._cond.notify_all()
        out = torch.empty(len(idx), *self.store.image_shape[1:], dtype=torch.bool)
        for c in needed:
            rows = (chunk_of == c).nonzero().squeeze(1)
            out[rows] = self._chunk(c)[idx[rows] - c * self.store.chunk_size]
        return out.to(self.device, non_blocking=True)


def attack_mask_source(location: str | None, ds: DatasetSplit, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return index -> (B,H,W) attack masks for ``ds`` from the store at ``location`` (or the one found)."""
    location = location or find_store(ds)
    store = open_for_training(location, ds)
    _, h, w = store.image_shape
    log.info("attack masks from %s (%d masks, %.1f MB packed)", location, store.n, store.n * -(-h * w // 8) / 1e6)
    return mask_reader(store, device)
