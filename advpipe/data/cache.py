"""The image cache: a file split decoded once, at its size, into a uint8 ``.npy`` tied to its fingerprint.

An image-folder split (``folder``, ``tinyimagenet``, ``flowers102``) whose decoded size N*3*S*S fits
the bound (``$ADVPIPE_IMAGE_CACHE_BYTES``, default 4 GiB; ``0`` turns the cache off) is decoded once
and kept in memory, so the loader takes the in-memory device path that CIFAR takes. The decoded
array is also written to ``$ADVPIPE_CACHE_DIR/images/`` (default ``~/.cache/advpipe``) as
``<key>.npy`` (uint8 NHWC rows, which is the channels_last layout the loader uses) plus
``<key>.json``; the key covers the split's fingerprint, the size and the resize
policy. Both files are written atomically (a temporary file, then a rename).

A cache file is local but never trusted blindly: it is used only when its JSON names the same
fingerprint, shape and policy, its ``.npy`` header has that shape and dtype, the file has exactly
the expected length, and a digest of a sample of its rows (the first, the last and up to 64 spread
between) matches the one written beside it. Anything else is rebuilt from the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from advpipe.data.decode import decode_files
from advpipe.errors import AdvpipeError
from advpipe.files import atomic_write_text
from advpipe.paths import cache_dir

log = logging.getLogger(__name__)

CACHE_VERSION = "advpipe-imagecache1"
DEFAULT_LIMIT = 4 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def cache_limit_bytes() -> int:
    """The largest decoded split the cache holds: ``$ADVPIPE_IMAGE_CACHE_BYTES`` (e.g. ``2G``, ``0`` = off), default 4 GiB."""
    text = os.environ.get("ADVPIPE_IMAGE_CACHE_BYTES", "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return DEFAULT_LIMIT
    unit = text[-1] if text[-1] in _UNITS else ""
    try:
        value = float(text[: len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        value = -1
    if value < 0:
        raise AdvpipeError(f"ADVPIPE_IMAGE_CACHE_BYTES must be a byte count such as 4G, 500M or 0, "
                           f"got {os.environ['ADVPIPE_IMAGE_CACHE_BYTES']!r}")
    return int(value)


def fits(n: int, size: int) -> bool:
    """Whether ``n`` images of 3x``size``x``size`` bytes fit the cache bound."""
    return 0 < n * 3 * size * size <= cache_limit_bytes()


def cache_paths(fingerprint: str, n: int, size: int, policy: str) -> tuple[Path, Path]:
    """The ``.npy`` and ``.json`` paths of the cache entry for this split, size and policy."""
    key = f"{CACHE_VERSION}|{fingerprint}|{n}|{size}|{policy}"
    stem = cache_dir() / "images" / hashlib.sha256(key.encode()).hexdigest()[:32]
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _sample_digest(images: np.ndarray) -> str:
    """sha256 over the first, the last and up to 64 evenly spread rows (cheap, catches swaps and holes)."""
    n = len(images)
    rows = sorted(set(np.linspace(0, n - 1, num=min(n, 66)).round().astype(int).tolist())) if n else []
    h = hashlib.sha256(f"{images.shape}|{rows}|".encode())
    for r in rows:
        h.update(np.ascontiguousarray(images[r]).tobytes())
    return "sha256:" + h.hexdigest()


def _meta(fingerprint: str, shape: tuple[int, ...], policy: str) -> dict:
    return {"version": CACHE_VERSION, "fingerprint": fingerprint, "shape": list(shape), "policy": policy}


def load_cached(fingerprint: str, shape: tuple[int, int, int, int], policy: str) -> torch.Tensor | None:
    """The cached channels_last uint8 (N,3,S,S) images of this split, or None when the entry is absent or fails a check."""
    npy, meta_path = cache_paths(fingerprint, shape[0], shape[-1], policy)
    shape = (shape[0], shape[2], shape[3], shape[1])  # stored NHWC
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or {k: meta.get(k) for k in ("version", "fingerprint", "shape", "policy")} \
                != _meta(fingerprint, shape, policy):
            raise ValueError("the entry describes other data")
        with open(npy, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unexpected .npy format version {version}")
            header = read_header(fh)  # (shape, fortran_order, dtype)
            offset = fh.tell()
        if header[0] != tuple(shape) or header[1] or header[2] != np.dtype(np.uint8):
            raise ValueError(f"header {header} does not match {shape}")
        if os.path.getsize(npy) != offset + int(np.prod(shape)):
            raise ValueError("the file has the wrong length")
        images = np.fromfile(npy, dtype=np.uint8, offset=offset).reshape(shape)
        if _sample_digest(images) != meta.get("sample_digest"):
            raise ValueError("the sampled rows differ from those written")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
        log.warning("image cache %s is unusable (%s); rebuilding it", npy, exc)
        return None
    return torch.from_numpy(images).permute(0, 3, 1, 2)  # channels_last (N,C,H,W)


def store_cached(images: torch.Tensor, fingerprint: str, policy: str) -> None:
    """Write ``images`` as this split's cache entry, atomically; a failed write only costs time later."""
    npy, meta_path = cache_paths(fingerprint, images.shape[0], images.shape[-1], policy)
    array = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())  # NHWC rows: no copy when channels_last
    tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
    try:
        npy.parent.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # the JSON goes last: a half-replaced entry is never used
        with open(tmp, "wb") as fh:
            np.lib.format.write_array(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, npy)
        meta = {**_meta(fingerprint, tuple(array.shape), policy), "sample_digest": _sample_digest(array)}
        atomic_write_text(meta_path, json.dumps(meta) + "\n")
    except OSError as exc:
        log.warning("cannot write the image cache %s (%s); the split stays decoded in memory only", npy, exc)
    finally:
        tmp.unlink(missing_ok=True)


def decoded_split(files: Sequence[Path], size: int, policy: str, fingerprint: str, *,
                  threads: int = 1) -> torch.Tensor:
    """All of ``files`` as uint8 (N,3,size,size): from the cache when a valid entry exists, else decoded and cached."""
    shape = (len(files), 3, size, size)
    cached = load_cached(fingerprint, shape, policy)
    if cached is not None:
        return cached
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            images = decode_files(files, size, policy, pool=pool)
    else:
        images = decode_files(files, size, policy)
    store_cached(images, fingerprint, policy)
    return images
