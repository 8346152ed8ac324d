"""Each mask against the rows that describe it: its pixel count against ``l0_pixels``, its hash against ``mask_hash``.

Checksums prove that an object's bytes arrived as written; they cannot tell a mask chunk that was
swapped with another one, rewritten through zarr (valid checksums) or linked in from another store.
These checks can, because the writer recorded, per sample, facts the mask must agree with:

- **pixel count**: ``l0_pixels`` counts the pixels where the applied perturbation ``delta * mask``
  is non-zero, so every one of them is a mask pixel: ``mask.sum() >= l0_pixels`` always holds.
  Equality holds on 99-100% of the rows of honest stores: a masked pixel whose perturbation is zero
  in every channel (a saturated pixel, black or white, where the [0, 1] box clamps delta to 0) is
  in the mask but not in ``l0_pixels`` (measured: 4 of 500 rows of an embedded-data store, by at
  most 2 pixels). A mask with fewer pixels than its ``l0_pixels`` (all-False masks, chunks moved)
  is refused.
- **mask hash**: ``mask_hash`` is blake2b of the sample's image
  hash and its packed mask (:func:`advpipe.pipeline.codecs.mask_hash`), so a mask moved to another
  row or rewritten without also forging the hashes is refused. A store written before mask hashes
  existed is refused on open (:class:`advpipe.pipeline.reader.MaskStore`).

Neither proves a store was computed honestly: whoever rewrites masks, ``l0_pixels`` and
``mask_hash`` together (and the store's manifest, which every read is checked against) passes.
Only a pinned content digest (docs/sharing.md) or recomputing the attack does.
"""

from __future__ import annotations

import numpy as np

from advpipe.pipeline.codecs import mask_hash


def bad_rows(masks: np.ndarray, l0_pixels: np.ndarray, sample_hashes: np.ndarray,
             mask_hashes: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Return the (sorted, relative) indices of rows whose mask disagrees with its metric row or hash, and why."""
    n = len(masks)
    pixels = masks.reshape(n, -1).sum(axis=1, dtype=np.int64)
    l0p = np.asarray(l0_pixels, dtype=np.int64)
    bad = pixels < l0p
    why = ["mask has fewer pixels than l0_pixels"] if bad.any() else []
    if mask_hashes is not None:
        wrong = mask_hash(masks, sample_hashes) != np.asarray(mask_hashes, dtype=np.uint64)
        if wrong.any():
            why.append("mask differs from its recorded mask_hash")
        bad |= wrong
    return np.flatnonzero(bad), " or ".join(why)


def describe(bad: np.ndarray, total: int, why: str) -> str:
    """One line naming the disagreeing rows: how many, and the first few indices."""
    return f"{bad.size} of {total} masks disagree with their rows ({why}; first indices {bad[:5].tolist()})"
