"""Comparing mask stores read with plain zarr (shared by the precompute and fault tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from advpipe.pipeline.codecs import ARRAYS as STORE_ARRAYS, DONE_ARRAY
from advpipe.pipeline.reader import open_store

#: every array of a store: the per-sample ones and the per-chunk done flags
ARRAYS = (*STORE_ARRAYS, DONE_ARRAY)
PER_SAMPLE = tuple(STORE_ARRAYS)


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read every array of a store with plain zarr."""
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in ARRAYS}


def assert_same_store(path: Path, ref: Path) -> None:
    """Every array and the configuration and summary of ``path`` equal the reference's."""
    got, want = store_arrays(path), store_arrays(ref)
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    a, b = open_store(path).provenance, open_store(ref).provenance
    assert a["status"] == b["status"] == "complete"
    for key in ("dataset", "model", "attack", "seed", "chunk_size", "summary"):
        assert a[key] == b[key], key
