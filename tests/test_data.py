"""Datasets, fingerprints and the device-side loader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from advpipe.data.datasets import load_dataset
from advpipe.data.loader import DeviceLoader
from advpipe.data.transforms import CropFlipParams, apply_crop_flip, sample_crop_flip
from advpipe.errors import AdvpipeError


def _write_npz(folder, n_train=40, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=rng.integers(0, 10, n))
    return folder


def test_embedded_is_default_sized_real_subset():
    train, test = load_dataset("embedded", "train"), load_dataset("embedded", "test")
    assert (len(train), len(test)) == (2000, 1000)
    assert train.image_shape == (3, 32, 32) and train.images.dtype == torch.uint8
    assert train.num_classes == 10 and set(train.labels.unique().tolist()) == set(range(10))
    assert train.fingerprint != test.fingerprint


def test_fingerprint_is_stable_and_limit_changes_it():
    a, b = load_dataset("embedded", "train"), load_dataset("embedded", "train")
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("sha256:")
    limited = load_dataset("embedded", "train", limit=100)
    assert len(limited) == 100 and torch.equal(limited.images, a.images[:100])
    assert limited.fingerprint != a.fingerprint
    assert load_dataset("embedded", "train", limit=99).fingerprint != limited.fingerprint


def test_fingerprint_sees_one_changed_pixel_and_label():
    ds = load_dataset("synthetic", "test")
    from advpipe.data.fingerprint import fingerprint_arrays

    images, labels = ds.images.permute(0, 2, 3, 1).numpy().copy(), ds.labels.numpy().copy()
    base = fingerprint_arrays(images, labels)
    assert base == ds.fingerprint
    images[5, 3, 3, 1] ^= 1
    assert fingerprint_arrays(images, labels) != base
    images[5, 3, 3, 1] ^= 1
    labels[0] = (labels[0] + 1) % 10
    assert fingerprint_arrays(images, labels) != base


def test_cifar_npz_folder_and_cached_fingerprint(tmp_path):
    root = _write_npz(tmp_path / "cifar10")
    ds = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert len(ds) == 40 and ds.class_names[0] == "airplane"
    raw = np.load(root / "train.npz")
    assert torch.equal(ds.images.permute(0, 2, 3, 1), torch.from_numpy(raw["images"]))
    first = ds.fingerprint
    # the second load hits the on-disk caches (decoded arrays and fingerprint) and agrees
    again = load_dataset("cifar10", "train", data_dir=root)
    assert again.fingerprint == first and torch.equal(again.images, ds.images)


def test_cifar_pickle_folders(tmp_path):
    rng = np.random.default_rng(1)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(c10 / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, fh)
    with open(c10 / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    ds = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert len(ds) == 20 and ds.class_names[3] == "c3" and ds.image_shape == (3, 32, 32)
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for name in ("train", "test"):
        with open(c100 / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "fine_labels": [5, 50, 99]}, fh)
    with open(c100 / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, fh)
    ds100 = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert ds100.num_classes == 100 and ds100.labels.tolist() == [5, 50, 99]


def test_missing_data_folder_says_what_is_expected(tmp_path):
    with pytest.raises(AdvpipeError, match="cifar-10-batches-py.*train.npz"):
        load_dataset("cifar10", "train", data_dir=tmp_path / "nowhere")
    with pytest.raises(AdvpipeError, match="ImageFolder"):
        load_dataset("folder", "train", data_dir=tmp_path)
    with pytest.raises(AdvpipeError, match="choose one of"):
        load_dataset("imagenet-21k", "train")


def test_image_folder_streams_through_the_same_transform(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset("folder", "train", data_dir=tmp_path, image_size=16)
    assert not ds.in_memory and len(ds) == 6 and ds.class_names == ["cat", "dog"]
    assert ds.load_images([0, 5]).shape == (2, 3, 16, 16)
    assert load_dataset("folder", "test", data_dir=tmp_path, image_size=16).fingerprint != ds.fingerprint
    batches = list(DeviceLoader(ds, batch_size=4, seed=3, workers=0, pad=2))
    again = list(DeviceLoader(ds, batch_size=4, seed=3, workers=0, pad=2))
    assert [b.images.shape[0] for b in batches] == [4]  # drop_last in training
    assert torch.equal(batches[0].images, again[0].images)
    assert batches[0].images.dtype == torch.float32 and 0 <= batches[0].images.min() <= batches[0].images.max() <= 1
    # loader workers are spawned, so a lazy split (also a --limit one) must pickle with its fingerprint
    for split in (ds, load_dataset("folder", "train", data_dir=tmp_path, image_size=16, limit=4)):
        assert pickle.loads(pickle.dumps(split)).fingerprint == split.fingerprint


def _reference_crop_flip(x, top, left, flip, pad):
    """Plain per-sample pad/crop/flip to check the batched gather against."""
    out = []
    for i in range(x.shape[0]):
        padded = torch.nn.functional.pad(x[i : i + 1], (pad, pad, pad, pad))[0]
        crop = padded[..., top[i] : top[i] + x.shape[-2], left[i] : left[i] + x.shape[-1]]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_crop_flip_matches_per_sample_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 12, 10), dtype=torch.uint8, generator=gen)
    params = sample_crop_flip(64, pad=4, flip=True, generator=gen, device="cpu")
    assert params.flip.any() and not params.flip.all() and params.top.max() <= 8
    out = apply_crop_flip(x, params)
    assert torch.equal(out, _reference_crop_flip(x, params.top, params.left, params.flip, 4))
    assert torch.equal(x, torch.randint(0, 256, (64, 3, 12, 10), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(0)))  # input untouched
    ident = CropFlipParams(torch.full((64,), 4), torch.full((64,), 4), torch.zeros(64, dtype=torch.bool), 4)
    assert torch.equal(apply_crop_flip(x, ident), x)


def test_side_data_stays_aligned_with_its_image():
    ds = load_dataset("embedded", "train", limit=256)
    side = {"red": ds.images[:, 0].clone(), "mask": ds.images[:, 1] > 128}
    loader = DeviceLoader(ds, batch_size=64, seed=5, side=side)
    for batch in loader:
        pixels = (batch.images * 255).round().to(torch.uint8)
        assert torch.equal(pixels[:, 0], batch.side["red"])
        assert batch.side["mask"].dtype == torch.bool
        # padding is zero in both, so the bool side equals the thresholded green channel exactly
        assert torch.equal(pixels[:, 1] > 128, batch.side["mask"])
        assert torch.equal(batch.labels, ds.labels[batch.index])


def test_loader_is_seeded_and_epochs_differ():
    ds = load_dataset("synthetic", "train")
    a, b = DeviceLoader(ds, batch_size=100, seed=1), DeviceLoader(ds, batch_size=100, seed=1)
    first = [x.index for x in a]
    assert all(torch.equal(x, y.index) for x, y in zip(first, b))
    assert len(first) == len(ds) // 100
    a.set_epoch(1)
    assert not torch.equal(next(iter(a)).index, first[0])
    c = DeviceLoader(ds, batch_size=100, seed=2)
    assert not torch.equal(next(iter(c)).images, next(iter(b)).images)


def test_eval_loader_keeps_order_and_all_samples():
    ds = load_dataset("synthetic", "test")
    batches = list(DeviceLoader(ds, batch_size=100, train=False))
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(len(ds)))
    assert torch.equal(batches[0].images, ds.images[:100].float() / 255)


def test_ranks_get_disjoint_equal_shards():
    ds = load_dataset("synthetic", "train")
    shards = [torch.cat([b.index for b in DeviceLoader(ds, batch_size=8, seed=0, rank=r, world_size=2)])
              for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
