"""Mask store: the per-image AdvMask attack masks of a dataset in a chunked Zarr v3 group.

The format (``advpipe-masks/2``) is written down in docs/mask-store.md so other teams can read a
store with plain zarr. This module is the public entry point; the work is split by job:

- :mod:`advpipe.pipeline.writer`: :func:`create_store` and :class:`MaskStoreWriter` (a local or
  shared-filesystem path, one writer at a time under a lock file);
- :mod:`advpipe.pipeline.reader`: :func:`open_store` and :class:`MaskStore` (a path, a zip or any
  fsspec URL), every mask read checked against its rows (:mod:`advpipe.pipeline.rows`);
- :mod:`advpipe.pipeline.verify`: :func:`verify_store`, the full check of a store from elsewhere;
- :mod:`advpipe.pipeline.layout`: the array layout and the one validation path all of them use.
"""

from __future__ import annotations

from advpipe.pipeline.codecs import mask_hash, sample_hash, unpack_masks
from advpipe.pipeline.reader import MaskStore, check_compatible, open_store
from advpipe.pipeline.verify import verify_store
from advpipe.pipeline.writer import DEFAULT_CHUNK_SIZE, MaskStoreWriter, create_store

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MaskStore",
    "MaskStoreWriter",
    "check_compatible",
    "create_store",
    "mask_hash",
    "open_store",
    "sample_hash",
    "unpack_masks",
    "verify_store",
]
