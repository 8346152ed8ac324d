"""Mask streaming into training: alignment by index, refusal of mismatched or incomplete stores."""

from __future__ import annotations

import json

import numpy as np
from helpers.sharing import tiny_store
import pytest
import torch

from advpipe.data.datasets import load_dataset
from advpipe.data.loader import DeviceLoader
from advpipe.errors import AdvpipeError
from advpipe.pipeline.streaming import ChunkCache, ResidentMasks, attack_mask_source, find_store, open_for_training
from advpipe.train.config import TrainConfig
from advpipe.train.loop import train


def fake_masks(ds) -> np.ndarray:
    """Deterministic 'attack masks' derived from the images: bright red pixels."""
    return (ds.images[:, 0] > 200).numpy()


def write_store(path, ds, *, chunk_size=64, finalize=True, masks=None):
    return tiny_store(path, ds, chunk_size=chunk_size, finalize=finalize, masks=fake_masks(ds) if masks is None else masks)


@pytest.fixture(scope="module")
def ds():
    return load_dataset("embedded", "train", limit=300)


@pytest.fixture(scope="module")
def store_path(ds, tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("s") / "m.zarr", ds)


def test_masks_follow_their_image_through_crop_and_flip(ds, store_path):
    source = attack_mask_source(str(store_path), ds, torch.device("cpu"))
    assert isinstance(source, ResidentMasks)
    loader = DeviceLoader(ds, batch_size=50, seed=4, side={"attack_mask": source})
    for batch in loader:
        red = (batch.images[:, 0] * 255).round()
        # the loader cropped/flipped image and mask identically: mask == (red > 200) pixel by pixel
        assert torch.equal(batch.side["attack_mask"], red > 200)


def test_chunk_cache_reads_the_same_masks(ds, store_path):
    store = open_for_training(str(store_path), ds)
    cache, resident = ChunkCache(store, torch.device("cpu"), max_chunks=2), ResidentMasks(store, torch.device("cpu"))
    index = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:100]
    assert torch.equal(cache(index), resident(index))
    assert torch.equal(resident(index), torch.from_numpy(fake_masks(ds))[index])
    assert len(cache._cache) <= 2


def test_block_shuffle_is_a_chunk_aware_permutation():
    from advpipe.data.loader import block_shuffle

    ragged = block_shuffle(1003, 10, 4, torch.Generator().manual_seed(1))
    assert sorted(ragged.tolist()) == list(range(1003))  # every sample once, with a short last block
    order = block_shuffle(1000, 10, 4, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(1000))
    assert not torch.equal(order, torch.arange(1000))
    # each group of 4 blocks (40 samples) draws from exactly 4 chunks, and the order inside a group
    # is mixed rather than chunk by chunk
    for start in range(0, 1000, 40):
        group = order[start : start + 40]
        assert len((group // 10).unique()) == 4
        assert (group[1:] // 10 != group[:-1] // 10).sum() > 10
    assert torch.equal(order, block_shuffle(1000, 10, 4, torch.Generator().manual_seed(1)))


class CountingStore:
    """A store wrapper that counts chunk reads and records how many were held at once."""

    def __init__(self, store):
        self.store, self.reads = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def read_masks(self, start, stop):
        self.reads.append(start // self.store.chunk_size)
        return self.store.read_masks(start, stop)


def test_large_store_streams_each_chunk_once_in_the_background_with_bounded_memory(ds, tmp_path):
    import time

    path = write_store(tmp_path / "small-chunks.zarr", ds, chunk_size=10)  # 30 chunks
    store = CountingStore(open_for_training(str(path), ds))
    cache = ChunkCache(store, torch.device("cpu"), window=3, ahead=3)
    loader = DeviceLoader(ds, batch_size=20, seed=2, side={"attack_mask": cache}, pad=0, flip=False)
    assert loader.shuffle_blocks == (10, 3)  # the loader's order follows the chunks
    expected = torch.from_numpy(fake_masks(ds))
    largest = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        before = len(store.reads)
        for i, batch in enumerate(loader):
            if i == 0:
                # the read-ahead thread had read the first chunks before training asked for them
                deadline = time.monotonic() + 10
                while len(store.reads) - before < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
            assert torch.equal(batch.side["attack_mask"], expected[batch.index])
            largest = max(largest, len(cache._cache))
        reads = sorted(store.reads[before:])
        assert len(set(reads)) == len(reads)  # no chunk read twice in an epoch
        if epoch == 0:
            assert reads == list(range(30))  # (later epochs find the previous epoch's last chunks cached)
    assert largest <= cache.max_chunks == 9


def test_mismatched_data_is_refused_naming_both_sides(store_path):
    other = load_dataset("embedded", "train", limit=299)
    with pytest.raises(AdvpipeError, match="store .* vs data"):
        attack_mask_source(str(store_path), other, torch.device("cpu"))


def test_reordered_rows_are_refused_by_content_hash(ds, tmp_path):
    path = write_store(tmp_path / "m.zarr", ds)
    from advpipe.pipeline.reader import open_store

    # same fingerprint and shape, but the per-sample hashes belong to other images
    store = open_store(path)
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    hashes = group["sample_hash"][:]
    group["sample_hash"][:] = np.roll(hashes, 1)
    del store
    with pytest.raises(AdvpipeError, match="sample_hash/c/0' differs from manifest"):
        open_for_training(str(path), ds)  # the store's own manifest catches the edit
    from advpipe.pipeline.location import write_manifest

    write_manifest(path)  # a forger who also rewrites the manifest is caught by the content hashes
    with pytest.raises(AdvpipeError, match="content hash"):
        open_for_training(str(path), ds)


def test_incomplete_store_is_refused(ds, tmp_path):
    path = write_store(tmp_path / "m.zarr", ds, finalize=False)
    with pytest.raises(AdvpipeError, match="incomplete"):
        attack_mask_source(str(path), ds, torch.device("cpu"))


def test_find_store_picks_the_matching_one_or_says_what_to_run(ds, store_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdvpipeError, match="advpipe precompute-masks --data embedded --split train --limit 300"):
        find_store(ds)
    (tmp_path / "masks").mkdir()
    import shutil

    shutil.copytree(store_path, tmp_path / "masks" / "x.zarr")
    assert find_store(ds).endswith("x.zarr")


def test_train_with_advmask_streams_masks_and_logs_rates(ds, store_path, tmp_path):
    before = {p.name: p.read_bytes() for p in sorted(store_path.rglob("*")) if p.is_file()}
    cfg = TrainConfig(data="embedded", limit=300, model="resnet20", aug="advmask", masks=str(store_path), epochs=2,
                      batch_size=50, lr=0.05, out=str(tmp_path / "run"), device="cpu")
    train(cfg)
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # incremental schedule: 0.4 of the batch in epoch 1 of 2, then 0.8
    assert 0.25 < lines[0]["aug_fraction_augmented"] < 0.55 and 0.65 < lines[1]["aug_fraction_augmented"] < 0.95
    assert 0.05 < lines[1]["aug_mean_masked_ratio"] <= 0.4 + 1e-6 and "aug_fallback_rate" in lines[1]
    after = {p.name: p.read_bytes() for p in sorted(store_path.rglob("*")) if p.is_file()}
    assert before == after  # the store is never modified


def test_a_pinned_store_streams_only_the_content_it_was_pinned_to(ds, store_path, tmp_path):
    from advpipe.pipeline.manifest import MANIFEST_KEY, digest_of

    digest = digest_of((store_path / MANIFEST_KEY).read_bytes())  # written when the store was finalized
    source = attack_mask_source(f"{store_path}#sha256={digest[7:]}", ds, torch.device("cpu"))
    assert torch.equal(source(torch.arange(len(ds))), torch.from_numpy(fake_masks(ds)))
    with pytest.raises(AdvpipeError, match=f"differs from the pinned sha256:{'0' * 64}"):
        attack_mask_source(f"{store_path}#sha256={'0' * 64}", ds, torch.device("cpu"))
    # other masks of the same shape, written back with valid checksums: refused by the pin only
    import shutil

    import zarr

    forged = tmp_path / "forged.zarr"
    shutil.copytree(store_path, forged)
    group = zarr.open_group(str(forged), mode="r+")
    group["masks"][0:64] = ~group["masks"][0:64]
    # unpinned, the store's own manifest refuses the object (issue 24) ...
    with pytest.raises(AdvpipeError, match=r"object 'masks/c/0/0/0' differs from manifest sha256:\w+: sha256"):
        attack_mask_source(str(forged), ds, torch.device("cpu"))
    with pytest.raises(AdvpipeError, match=rf"object 'masks/c/0/0/0' differs from manifest {digest} \(pinned\)"):
        attack_mask_source(f"{forged}#sha256={digest[7:]}", ds, torch.device("cpu"))
    from advpipe.pipeline.location import write_manifest

    write_manifest(forged)  # ... and with a rewritten manifest the masks no longer match their rows (issue 18)
    with pytest.raises(AdvpipeError, match=r"masks disagree with their rows .*first indices \[0, 1, 2, 3, 4\]"):
        attack_mask_source(str(forged), ds, torch.device("cpu"))


def test_a_pinned_store_proves_its_flags_and_hashes_without_reading_them(ds, store_path, monkeypatch):
    from advpipe.pipeline.manifest import MANIFEST_KEY, digest_of
    from advpipe.pipeline.reader import MaskStore

    digest = digest_of((store_path / MANIFEST_KEY).read_bytes())
    reads = []
    original = MaskStore._read
    monkeypatch.setattr(MaskStore, "_read", lambda self, name, *a: reads.append(name) or original(self, name, *a))
    attack_mask_source(f"{store_path}#sha256={digest[7:]}", ds, torch.device("cpu"))
    # the pinned manifest lists the objects that "all done" and these images' hashes encode to
    # the masks and the l0_pixels rows each mask is checked against (issue 18); the masks' recorded
    # hashes are proven by the manifest too (their objects are what these masks hash to)
    assert reads == ["masks", "l0_pixels"]
    reads.clear()
    attack_mask_source(str(store_path), ds, torch.device("cpu"))  # unpinned: read and compared
    assert reads == ["chunk_done", "sample_hash", "masks", "l0_pixels", "mask_hash"]
    import dataclasses

    other = dataclasses.replace(ds, images=ds.images.clone())
    other.images[5, 0, 0, 0] ^= 1
    other.__dict__["fingerprint"] = ds.fingerprint  # same claimed data, one image differs
    reads.clear()
    with pytest.raises(AdvpipeError, match="1 samples do not match the data by content hash"):
        open_for_training(f"{store_path}#sha256={digest[7:]}", other)
    assert reads == ["sample_hash"]  # the proof failed, so the hashes were read and compared


def test_training_refuses_swapped_mask_chunks_on_both_paths(ds, store_path, tmp_path):
    import shutil

    swapped = tmp_path / "swapped.zarr"
    shutil.copytree(store_path, swapped)
    a, b = (swapped / "masks" / "c" / str(i) / "0" / "0" for i in (1, 2))
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    cache = ChunkCache(open_for_training(str(swapped), ds), torch.device("cpu"))
    with pytest.raises(AdvpipeError, match=r"object 'masks/c/1/0/0' differs from manifest"):
        cache(torch.arange(64, 70))  # the store's own manifest refuses the moved object as it is read
    from advpipe.pipeline.location import write_manifest

    write_manifest(swapped)  # a forger who rewrites the manifest meets the row checks
    with pytest.raises(AdvpipeError, match=r"masks disagree with their rows .*first indices \[64,"):
        attack_mask_source(str(swapped), ds, torch.device("cpu"))  # resident: read whole, refused before training
    cache = ChunkCache(open_for_training(str(swapped), ds), torch.device("cpu"))
    assert torch.equal(cache(torch.arange(10)), torch.from_numpy(fake_masks(ds))[:10])  # chunk 0 is intact
    with pytest.raises(AdvpipeError, match=r"in rows \[64, 128\)"):
        cache(torch.arange(64, 70))  # streamed: the chunk is refused when training reaches it
