"""A pinned read proves each mask's recorded mask_hash from the manifest instead of fetching it.

The proof is the same comparison the row check makes (the masks' hashes against the stored ones),
made on the object digests the pinned manifest lists; a range or a store it cannot prove is
fetched and compared as before, so nothing gets through that the fetched check would refuse.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from helpers.sharing import tiny_store
from advpipe.data.datasets import load_dataset
from advpipe.errors import AdvpipeError
from advpipe.pipeline.location import Location
from advpipe.pipeline.manifest import MANIFEST_KEY, digest_of, encode_manifest, sha256_hex
from advpipe.pipeline.reader import MaskStore, open_store

N, CHUNK = 40, 16  # the last chunk is partial


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    ds = load_dataset("embedded", "train", limit=N)
    return tiny_store(tmp_path_factory.mktemp("pin") / "m.zarr", ds, chunk_size=CHUNK)


def _reads(monkeypatch) -> list[str]:
    names: list[str] = []
    real = MaskStore._read

    def spy(self, name, *args):
        names.append(name)
        return real(self, name, *args)

    monkeypatch.setattr(MaskStore, "_read", spy)
    return names


def _digest(path) -> str:
    return digest_of((path / MANIFEST_KEY).read_bytes())


def test_a_pinned_read_never_fetches_mask_hash(store, monkeypatch):
    expected = open_store(store).read_masks(0, N)
    pinned = open_store(store, digest=_digest(store))
    reads = _reads(monkeypatch)
    np.testing.assert_array_equal(pinned.read_masks(0, N), expected)
    np.testing.assert_array_equal(pinned.read_masks(CHUNK, N), expected[CHUNK:])  # from a boundary to the end
    assert "masks" in reads and "mask_hash" not in reads
    unpinned = open_store(store)
    unpinned.read_masks(0, N)
    assert reads.count("mask_hash") == 1, "without a pin the hashes are fetched"


def test_a_range_off_the_chunk_grid_is_fetched_and_compared(store, monkeypatch):
    pinned = open_store(store, digest=_digest(store))
    reads = _reads(monkeypatch)
    pinned.read_masks(1, CHUNK)
    assert "mask_hash" in reads


def test_a_pinned_store_whose_mask_hash_rows_disagree_is_still_refused(store, tmp_path):
    """A publisher's own inconsistent store, pinned: the proof fails, the fetched check names the row."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    group = zarr.open_group(str(bad), mode="r+")
    hashes = group["mask_hash"][0:CHUNK]
    hashes[3] ^= np.uint64(1)
    group["mask_hash"][0:CHUNK] = hashes
    objects = dict(Location(str(bad)).load_manifest().objects)
    data = (bad / "mask_hash" / "c" / "0").read_bytes()
    objects["mask_hash/c/0"] = (len(data), sha256_hex(data))
    (bad / MANIFEST_KEY).write_bytes(encode_manifest(objects))
    pinned = open_store(bad, digest=_digest(bad))
    with pytest.raises(AdvpipeError, match=r"1 of 16 masks disagree .*mask_hash; first indices \[3\]"):
        pinned.read_masks(0, CHUNK)
