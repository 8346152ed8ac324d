"""Dataset fingerprints: a content hash over image bytes, labels and shape, cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from advpipe.files import atomic_write_text
from advpipe.paths import cache_dir

FINGERPRINT_VERSION = "advpipe-fp1"


def fingerprint_arrays(images_nhwc: np.ndarray, labels: np.ndarray) -> str:
    """Return ``sha256:<hex>`` over the shape, the uint8 NHWC image bytes and the int64 labels."""
    images_nhwc = np.ascontiguousarray(images_nhwc, dtype=np.uint8)
    h = hashlib.sha256()
    h.update(f"{FINGERPRINT_VERSION}|{tuple(images_nhwc.shape)}|".encode())
    # Hash in slices so a 150 MB dataset never needs a second full copy in memory.
    step = 4096
    for start in range(0, len(images_nhwc), step):
        h.update(memoryview(images_nhwc[start : start + step]).cast("B"))
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return "sha256:" + h.hexdigest()


def cached_fingerprint(key: dict, compute: Callable[[], str]) -> str:
    """Return the fingerprint cached under ``key`` (a JSON-able dict), computing it once if absent."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / "fingerprints" / f"{digest}.txt"
    if path.is_file():
        value = path.read_text().strip()
        if value.startswith("sha256:"):
            return value
    value = compute()
    try:
        atomic_write_text(path, value + "\n")
    except OSError:  # a read-only cache only costs time, never correctness
        pass
    return value


def file_stat_key(path: Path) -> dict:
    """Return a cache key that changes whenever the file at ``path`` is replaced or modified."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
