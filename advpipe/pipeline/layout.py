"""The array layout every ``advpipe-masks/2`` store must have, and the one check every reader and writer runs.

:func:`open_arrays` is the single validation path of a store's arrays: ``open_store`` (and so
training, ``masks info|report|show`` and ``verify``) and the writer all go through it. It refuses
an array whose shape, chunks, dtype, fill value, codec chain or chunk key encoding is not the
format's, so a store whose metadata was edited (a ``v2`` key encoding that makes every chunk read
as the fill value, a codec chain without ``crc32c``) is refused before any chunk is read.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

from advpipe.errors import AdvpipeError
from advpipe.pipeline.codecs import ARRAYS, DONE_ARRAY, codec_kwargs, quiet_zarr
from advpipe.pipeline.provenance import MAX_CHUNK_BYTES, image_shape_of

Layout = dict[str, tuple[tuple[int, ...], tuple[int, ...], np.dtype]]


def has_mask_hash(attrs: dict[str, Any]) -> bool:
    """Whether the store records per-sample mask hashes (stores written before they existed do not; readers refuse them)."""
    return "mask_hash" in attrs


def expected_layout(attrs: dict[str, Any]) -> Layout:
    """Return name -> (shape, chunks, dtype) that every array of a store with ``attrs`` must have."""
    n, chunk = attrs["dataset"]["n"], attrs["chunk_size"]
    _, h, w = attrs["dataset"]["image_shape"]
    out = {}
    for name, spec in ARRAYS.items():
        trail = (h, w) if spec.per_pixel else ()
        out[name] = ((n, *trail), (chunk, *trail), spec.dtype)
    out[DONE_ARRAY] = ((math.ceil(n / chunk),), (1,), np.dtype(bool))
    return out


def check_chunk_bytes(attrs: dict[str, Any], where: str = "") -> None:
    """Refuse a chunk size whose one chunk of every array together decodes to over 1 GiB.

    The attribute check bounds the mask chunk alone; with 1x1 images the per-sample arrays (47
    bytes a sample) dominate, and verify holds one chunk of each at a time.
    """
    chunk = min(attrs["chunk_size"], attrs["dataset"]["n"])
    total = sum(math.prod(chunks) * dtype.itemsize for _, chunks, dtype in expected_layout(attrs).values()
                if len(chunks) > 1 or chunks[0] > 1)
    if total > MAX_CHUNK_BYTES:
        raise AdvpipeError(f"{where}chunk_size {chunk} makes one chunk of every array decode to {total} bytes "
                           f"(limit {MAX_CHUNK_BYTES})")


def _codec_names(name: str) -> list[str]:
    kw = codec_kwargs(name)
    return [type(c).__name__ for c in (*kw["filters"], kw["serializer"], *kw["compressors"])]


def _same_fill(a: Any, b: Any) -> bool:
    a, b = np.asarray(a).item(), np.asarray(b).item()
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def layout_problem(name: str, arr: zarr.Array, shape: tuple[int, ...], chunks: tuple[int, ...],
                   dtype: np.dtype) -> str | None:
    """Describe how array ``name`` differs from the format (None if it is exactly the format's)."""
    if arr.shape != shape or arr.chunks != chunks or arr.shards is not None or arr.dtype != dtype:
        return (f"array {name!r} is {arr.dtype} shape {arr.shape} chunks {arr.chunks}"
                f"{' sharded' if arr.shards is not None else ''}; the attributes require {dtype} shape {shape} "
                f"chunks {chunks}")
    meta = arr.metadata
    encoding = getattr(meta, "chunk_key_encoding", None)
    if encoding != DefaultChunkKeyEncoding(separator="/"):
        shown = encoding.to_dict() if hasattr(encoding, "to_dict") else encoding
        return (f"array {name!r} has chunk_key_encoding {shown!r:.200}; the format uses "
                "{'name': 'default', 'separator': '/'} (another encoding would read every chunk as the fill value)")
    got, want = [type(c).__name__ for c in meta.codecs], _codec_names(name)
    if got != want:
        crc = "" if "Crc32cCodec" in got else " (no crc32c codec: corruption in it cannot be detected)"
        return f"array {name!r} has codecs {got}; the format uses {want}{crc}"
    spec = ARRAYS.get(name)
    fill = spec.fill_value if spec is not None else False
    if not _same_fill(meta.fill_value, fill):
        return f"array {name!r} has fill value {np.asarray(meta.fill_value).item()!r:.80}; the format uses {fill!r}"
    return None


def open_arrays(group: zarr.Group, attrs: dict[str, Any], where: str) -> dict[str, zarr.Array]:
    """Return every array of the store, refusing any whose layout, codecs or key encoding is not the format's."""
    check_chunk_bytes(attrs, f"{where}: ")
    arrays = {}
    for name, (shape, chunks, dtype) in expected_layout(attrs).items():
        with quiet_zarr():
            try:
                arr = group[name]
            except KeyError as exc:
                raise AdvpipeError(f"{where}: array {name!r} is missing") from exc
        if not isinstance(arr, zarr.Array):
            raise AdvpipeError(f"{where}: {name!r} is not an array")
        if problem := layout_problem(name, arr, shape, chunks, dtype):
            raise AdvpipeError(f"{where}: {problem}")
        arrays[name] = arr
    return arrays


class Chunked:
    """The N / image shape / chunk geometry that writer and reader share, read from validated attributes."""

    def _init_layout(self, attrs: dict[str, Any]) -> None:
        self.n: int = attrs["dataset"]["n"]
        self.image_shape: tuple[int, int, int] = image_shape_of(attrs["dataset"]["image_shape"])
        self.chunk_size: int = attrs["chunk_size"]
        self.n_chunks: int = math.ceil(self.n / self.chunk_size)

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Return the [start, stop) sample range of chunk ``i``."""
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < self.n_chunks:
            raise AdvpipeError(f"chunk index must be in [0, {self.n_chunks}), got {i!r}")
        start = int(i) * self.chunk_size
        return start, min(start + self.chunk_size, self.n)
