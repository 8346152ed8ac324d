"""Tiny-ImageNet and Flowers-102 replicas, the image cache, streamed decoding and RandomResizedCrop."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from advpipe.data import cache as image_cache
from advpipe.data import decode
from advpipe.data.datasets import load_dataset
from advpipe.data.loader import DeviceLoader
from advpipe.data.transforms import ResizedCropParams, apply_resized_crop, sample_resized_crop
from advpipe.errors import AdvpipeError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted, as in the real wnids.txt


def _jpeg(path, rng, size=(64, 64), gray=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    if gray:
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(path, format="JPEG")
    else:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format="JPEG")


def write_tinyimagenet(root, per_class=3, n_val=5, words=True):
    """A Tiny-ImageNet replica: wnids.txt, words.txt, train/<wnid>/images, val/images + annotations."""
    rng = np.random.default_rng(0)
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    if words:
        (base / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\nn03\ttabby, cat\nn99\tother\n")
    for wnid in WNIDS:
        for i in range(per_class):
            _jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", rng, gray=(wnid == "n03" and i == 0))
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    lines = []
    for i in range(n_val):
        _jpeg(base / "val" / "images" / f"val_{i}.JPEG", rng)
        lines.append(f"val_{i}.JPEG\t{WNIDS[i % 3]}\t0\t0\t10\t10")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def write_flowers(root, labels=(1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3), sizes=None):
    """A Flowers-102 replica: jpg/image_XXXXX.jpg of varying sizes, imagelabels.mat and setid.mat."""
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    base = root / "flowers-102"
    for i in range(1, len(labels) + 1):
        _jpeg(base / "jpg" / f"image_{i:05d}.jpg", rng, size=(40 + 3 * i, 50 + (i % 4) * 7))
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 5, 10]]), "valid": np.array([[2, 6, 11]]),
                                 "tstid": np.array([[3, 4, 7, 8, 9, 12]])})
    return base


# --------------------------------------------------------------------------- Tiny-ImageNet


def test_tinyimagenet_reads_the_official_layout(tmp_path):
    write_tinyimagenet(tmp_path)
    train = load_dataset("tinyimagenet", "train", data_dir=tmp_path)
    test = load_dataset("tinyimagenet", "test", data_dir=tmp_path)
    assert train.class_names == ["goldfish", "salamander", "tabby"]  # sorted wnids n01, n02, n03
    assert len(train) == 9 and train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train.image_shape == (3, 64, 64) and train.resize == "center-crop"
    assert [p.name for p in test.files] == [f"val_{i}.JPEG" for i in range(5)]
    assert test.labels.tolist() == [1, 0, 2, 1, 0]  # n02, n01, n03, n02, n01
    images = train.load_images([0, 6])  # n03_0 is a grayscale JPEG: read as RGB, channels equal
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(images[1, 0], images[1, 1]) and torch.equal(images[1, 1], images[1, 2])
    expected = np.asarray(Image.open(train.files[0]).convert("RGB"))
    assert torch.equal(images[0], torch.from_numpy(expected.copy()).permute(2, 0, 1))  # at 64: no resize
    assert load_dataset("tinyimagenet", "train", data_dir=tmp_path / "tiny-imagenet-200").fingerprint == train.fingerprint
    assert test.fingerprint != train.fingerprint
    assert load_dataset("tinyimagenet", "train", data_dir=tmp_path, image_size=32).load_images([0]).shape == (1, 3, 32, 32)


def test_tinyimagenet_fingerprint_sees_a_relabelled_validation_image(tmp_path):
    base = write_tinyimagenet(tmp_path)
    before = load_dataset("tinyimagenet", "test", data_dir=tmp_path).fingerprint
    notes = base / "val" / "val_annotations.txt"
    text = notes.read_text()
    assert "val_4.JPEG\tn01" in text
    notes.write_text(text.replace("val_4.JPEG\tn01", "val_4.JPEG\tn03"))  # same files, one other label
    assert load_dataset("tinyimagenet", "test", data_dir=tmp_path).fingerprint != before
    assert load_dataset("tinyimagenet", "test", data_dir=tmp_path).labels[4] == 2


def test_tinyimagenet_without_words_and_bad_layouts(tmp_path):
    base = write_tinyimagenet(tmp_path, words=False)
    assert load_dataset("tinyimagenet", "train", data_dir=tmp_path).class_names == ["n01", "n02", "n03"]
    with pytest.raises(AdvpipeError, match="wnids.txt"):
        load_dataset("tinyimagenet", "train", data_dir=tmp_path / "nowhere")
    notes = base / "val" / "val_annotations.txt"
    notes.write_text(notes.read_text() + "val_9.JPEG\tn77\t0\t0\t1\t1\n")
    with pytest.raises(AdvpipeError, match="line 6"):
        load_dataset("tinyimagenet", "test", data_dir=tmp_path)
    notes.write_text("val_0.JPEG\tn01\nval_8.JPEG\tn02\n")
    with pytest.raises(AdvpipeError, match="missing"):
        load_dataset("tinyimagenet", "test", data_dir=tmp_path)
    with pytest.raises(AdvpipeError, match="cannot be downloaded"):
        load_dataset("tinyimagenet", "train", data_dir=tmp_path, download=True)
    with pytest.raises(AdvpipeError, match="takes no option"):
        load_dataset("tinyimagenet:3", "train", data_dir=tmp_path)


# --------------------------------------------------------------------------- Flowers-102


def test_flowers_official_split_from_setid(tmp_path):
    write_flowers(tmp_path)
    train = load_dataset("flowers102", "train", data_dir=tmp_path)
    test = load_dataset("flowers102", "test", data_dir=tmp_path)
    assert [p.name for p in train.files] == [f"image_{i:05d}.jpg" for i in (1, 2, 5, 6, 10, 11)]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and train.class_names == ["1", "2", "3"]
    assert [int(p.stem[-5:]) for p in test.files] == [3, 4, 7, 8, 9, 12]
    assert train.image_shape == (3, 224, 224) and train.num_classes == 3
    assert load_dataset("flowers102", "test", data_dir=tmp_path, image_size=24).load_images([0, 5]).shape == (2, 3, 24, 24)
    assert train.fingerprint != test.fingerprint


def test_flowers_random_split_is_seeded_stratified_and_disjoint(tmp_path):
    base = write_flowers(tmp_path)
    (base / "setid.mat").unlink()  # the random split does not need it
    a_train = load_dataset("flowers102-random", "train", data_dir=tmp_path, image_size=16)
    a_test = load_dataset("flowers102-random", "test", data_dir=tmp_path, image_size=16)
    ids = lambda ds: {int(p.stem[-5:]) for p in ds.files}  # noqa: E731
    assert ids(a_train).isdisjoint(ids(a_test)) and ids(a_train) | ids(a_test) == set(range(1, 13))
    assert sorted(a_train.labels.tolist()) == [0] * 3 + [1] * 4 + [2] * 2  # round(0.8 * 4, 5, 3) per class
    assert a_train.name == "flowers102-random"
    same = load_dataset("flowers102-random:0", "train", data_dir=tmp_path, image_size=16)
    assert ids(same) == ids(a_train) and same.fingerprint == a_train.fingerprint and same.name == "flowers102-random:0"
    draws = {frozenset(ids(load_dataset(f"flowers102-random:{s}", "train", data_dir=tmp_path, image_size=16)))
             for s in range(1, 6)}
    assert len(draws | {frozenset(ids(a_train))}) > 1  # other seeds draw other splits
    with pytest.raises(AdvpipeError, match="whole number"):
        load_dataset("flowers102-random:x", "train", data_dir=tmp_path)
    with pytest.raises(AdvpipeError, match="setid.mat"):
        load_dataset("flowers102", "train", data_dir=tmp_path)


def test_flowers_center_crop_keeps_the_middle_of_a_wide_image(tmp_path):
    base = write_flowers(tmp_path)
    wide = np.zeros((40, 120, 3), dtype=np.uint8)
    wide[:, 40:80] = 255  # a white central square between black sides
    Image.fromarray(wide).save(base / "jpg" / "image_00003.jpg", quality=100)
    image = load_dataset("flowers102", "test", data_dir=tmp_path, image_size=20).load_images([0])[0].float()
    assert image.min() > 200  # the central square fills the output: the black sides were cut
    squashed = decode.read_image(base / "jpg" / "image_00003.jpg", (20, 20), "squash").float()
    assert squashed[:, :, :4].max() < 60  # the squash policy keeps the sides, for comparison


def test_flowers_bad_mat_files_are_one_line_errors(tmp_path):
    base = write_flowers(tmp_path)
    for junk in (b"not a mat file", b"MATLAB 5.0 MAT-file" + bytes(range(256)) * 4):
        (base / "imagelabels.mat").write_bytes(junk)
        with pytest.raises(AdvpipeError, match="imagelabels.mat"):
            load_dataset("flowers102", "train", data_dir=tmp_path)
    from scipy.io import savemat

    savemat(base / "imagelabels.mat", {"other": np.array([[1, 2]])})
    with pytest.raises(AdvpipeError, match="no variable 'labels'"):
        load_dataset("flowers102", "train", data_dir=tmp_path)


# --------------------------------------------------------------------------- decoding


def test_decoding_refuses_oversized_and_broken_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    _jpeg(tmp_path / "a.jpg", rng, size=(30, 50))
    assert decode.jpeg_size((tmp_path / "a.jpg").read_bytes()) == (50, 30)
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(AdvpipeError, match="50x30 pixels"):
        decode.decode_file(tmp_path / "a.jpg")
    monkeypatch.undo()
    (tmp_path / "b.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:200])
    with pytest.raises(AdvpipeError, match="cannot read image"):
        decode.decode_file(tmp_path / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    png = decode.decode_file(tmp_path / "c.png")  # other formats go through PIL
    assert torch.equal(png, torch.from_numpy(np.asarray(Image.open(tmp_path / "c.png")).copy()).permute(2, 0, 1))


def test_batches_decode_alike_with_and_without_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    base = write_flowers(tmp_path)
    files = sorted((base / "jpg").iterdir())
    alone = decode.decode_batch(files, 24, "center-crop", device=torch.device("cpu"))
    with ThreadPoolExecutor(2) as pool:
        threaded = decode.decode_batch(files, 24, "center-crop", device=torch.device("cpu"), pool=pool)
    assert torch.equal(alone, threaded) and alone.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(alone[3], decode.read_image(files[3], (24, 24), "center-crop"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streaming_on_cuda_decodes_on_the_gpu_close_to_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVPIPE_CACHE_DIR", str(tmp_path / "cache"))
    base = write_flowers(tmp_path / "data")
    files = sorted((base / "jpg").iterdir())
    cpu = decode.decode_batch(files, 32, "center-crop", device=torch.device("cpu"))
    gpu = decode.decode_batch(files, 32, "center-crop", device=torch.device("cuda"))
    assert gpu.is_cuda and gpu.shape == cpu.shape
    assert (gpu.cpu().float() - cpu.float()).abs().mean() < 2  # nvjpeg vs libjpeg-turbo: a level or so
    monkeypatch.setenv("ADVPIPE_IMAGE_CACHE_BYTES", "0")
    ds = load_dataset("flowers102", "test", data_dir=tmp_path / "data", image_size=32)
    batches = list(DeviceLoader(ds, batch_size=4, device="cuda", workers=2, train=False))
    assert sum(len(b) for b in batches) == len(ds) and all(b.images.is_cuda for b in batches)


# --------------------------------------------------------------------------- the image cache


def test_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVPIPE_CACHE_DIR", str(tmp_path / "cache"))
    write_tinyimagenet(tmp_path / "data")
    ds = load_dataset("tinyimagenet", "train", data_dir=tmp_path / "data", image_size=32)
    streamed = ds.load_images(range(len(ds)))
    built = ds.decoded_images(threads=2)
    assert torch.equal(built, streamed)  # the cache holds exactly the pixels the streamed path reads
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 1
    monkeypatch.setattr(image_cache, "decode_files", lambda *a, **k: pytest.fail("decoded again"))
    again = load_dataset("tinyimagenet", "train", data_dir=tmp_path / "data", image_size=32)
    assert torch.equal(again.decoded_images(), built)
    assert again.decoded is not None and pickle.loads(pickle.dumps(again)).decoded is None  # not sent along
    assert torch.equal(again.load_images([4, 1]), built[[4, 1]])


@pytest.mark.parametrize("damage", ["truncate", "flip-rows", "json-fingerprint", "no-json", "garbage"])
def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("ADVPIPE_CACHE_DIR", str(tmp_path / "cache"))
    write_tinyimagenet(tmp_path / "data")
    ds = load_dataset("tinyimagenet", "test", data_dir=tmp_path / "data", image_size=16)
    good = ds.decoded_images().clone()
    npy, meta = image_cache.cache_paths(ds.fingerprint, len(ds), 16, "center-crop")
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-10])
    elif damage == "flip-rows":  # same length and header, other pixels
        raw = bytearray(npy.read_bytes())
        raw[-100:] = bytes(255 - b for b in raw[-100:])
        npy.write_bytes(bytes(raw))
    elif damage == "json-fingerprint":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "fingerprint": "sha256:other"}))
    elif damage == "no-json":
        meta.unlink()
    else:
        npy.write_bytes(b"\x93NUMPY garbage")
    fresh = load_dataset("tinyimagenet", "test", data_dir=tmp_path / "data", image_size=16)
    assert torch.equal(fresh.decoded_images(), good)
    assert image_cache.load_cached(ds.fingerprint, (len(ds), 3, 16, 16), "center-crop") is not None  # rewritten


def test_over_the_bound_the_split_streams_with_the_same_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVPIPE_CACHE_DIR", str(tmp_path / "cache"))
    write_tinyimagenet(tmp_path / "data", per_class=5)
    cached = load_dataset("tinyimagenet", "train", data_dir=tmp_path / "data", image_size=16)
    cached_batches = list(DeviceLoader(cached, batch_size=4, seed=5, workers=2))
    monkeypatch.setenv("ADVPIPE_IMAGE_CACHE_BYTES", "1K")  # 15 x 3 x 16 x 16 bytes do not fit
    streamed = load_dataset("tinyimagenet", "train", data_dir=tmp_path / "data", image_size=16)
    loader = DeviceLoader(streamed, batch_size=4, seed=5, workers=2)
    assert loader.images is None and streamed.decoded is None
    for a, b in zip(cached_batches, loader, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)
    monkeypatch.setenv("ADVPIPE_IMAGE_CACHE_BYTES", "lots")
    with pytest.raises(AdvpipeError, match="ADVPIPE_IMAGE_CACHE_BYTES"):
        image_cache.cache_limit_bytes()
    monkeypatch.setenv("ADVPIPE_IMAGE_CACHE_BYTES", "2G")
    assert image_cache.cache_limit_bytes() == 2 << 30 and image_cache.fits(10, 64)


def test_a_limited_split_decodes_the_first_rows_of_the_full_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVPIPE_CACHE_DIR", str(tmp_path / "cache"))
    write_tinyimagenet(tmp_path / "data")
    limited = load_dataset("tinyimagenet", "train", data_dir=tmp_path / "data", image_size=16, limit=4)
    full = load_dataset("tinyimagenet", "train", data_dir=tmp_path / "data", image_size=16)
    assert limited.fingerprint != full.fingerprint and len(limited) == 4
    assert torch.equal(limited.decoded_images(), full.decoded_images()[:4])


# --------------------------------------------------------------------------- RandomResizedCrop


def test_resized_crop_keeps_a_mask_on_its_image():
    gen = torch.Generator().manual_seed(0)
    n, size = 32, 40
    images = torch.zeros(n, 3, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i in range(n):  # a different square per sample, painted in both
        top, left = 5 + i % 7, 8 + (3 * i) % 11
        images[i, :, top : top + 14, left : left + 12] = 1.0
        masks[i, top : top + 14, left : left + 12] = 1
    params = sample_resized_crop(n, size, size, generator=gen, device="cpu")
    assert params.flip.any() and (~params.flip).any()
    out_masks = apply_resized_crop(masks, params, mode="nearest")
    assert out_masks.dtype == torch.uint8 and out_masks.shape == (n, size, size)
    assert torch.equal(out_masks, apply_resized_crop(images, params, mode="nearest")[:, 0].to(torch.uint8))
    bilinear = apply_resized_crop(images, params)
    agree = ((bilinear[:, 0] > 0.5) == out_masks.bool()).float().mean()
    assert agree > 0.97  # bilinear edges may round the other way, the square sits at the same place
    visible = out_masks.flatten(1).any(1)
    assert visible.sum() > n // 2  # most crops still see part of the square


def test_resized_crop_boxes_follow_torchvision_bounds():
    gen = torch.Generator().manual_seed(1)
    p = sample_resized_crop(2000, 30, 50, generator=gen, device="cpu")
    area = (p.height * p.width).float() / (30 * 50)
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.top + p.height <= 30).all() and (p.left + p.width <= 50).all()
    assert area.max() <= 1.0 and area.min() >= 0.05 and area.mean() < 0.7
    tall = sample_resized_crop(50, 64, 16, scale=(0.99, 1.0), ratio=(1.0, 1.0), generator=gen, device="cpu")
    assert (tall.width == 16).all() and (tall.height == 16).all() and (tall.top == 24).all()  # the fallback box
    whole = ResizedCropParams(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                              torch.full((2,), 30), torch.full((2,), 50), torch.tensor([False, True]))
    x = torch.rand(2, 3, 30, 50)
    same = apply_resized_crop(x, whole)
    assert torch.allclose(same[0], x[0], atol=1e-5) and torch.allclose(same[1], x[1].flip(-1), atol=1e-5)
    empty = sample_resized_crop(0, 30, 50, generator=gen, device="cpu")
    assert apply_resized_crop(x[:0], empty).shape == (0, 3, 30, 50)
    with pytest.raises(ValueError, match="2 crop boxes for a batch of 1"):
        apply_resized_crop(x[:1], whole)
    u8 = (x * 255).round().to(torch.uint8).contiguous(memory_format=torch.channels_last)
    crop = sample_resized_crop(2, 30, 50, generator=gen, device="cpu")
    out = apply_resized_crop(u8, crop)  # uint8 stays uint8 and channels_last, within a level of float
    assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float() - apply_resized_crop(u8.float(), crop)).abs().max() <= 1.5
    before = x.clone()
    apply_resized_crop(x, whole)
    assert torch.equal(x, before)


def test_loader_random_resized_crop_moves_side_data_with_images():
    from advpipe.data.datasets import DatasetSplit

    n, size = 16, 24
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    side = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        images[i, :, 4 + i % 5 : 14 + i % 5, 6:16] = 255
        side[i, 4 + i % 5 : 14 + i % 5, 6:16] = True
    ds = DatasetSplit("toy", "train", torch.arange(n) % 2, ["a", "b"], (0.5,) * 3, (0.25,) * 3, (3, size, size),
                      images=images)
    loader = DeviceLoader(ds, batch_size=8, seed=2, crop="random-resized", side={"m": side})
    again = list(DeviceLoader(ds, batch_size=8, seed=2, crop="random-resized", side={"m": side}))
    for batch, twin in zip(loader, again):
        assert torch.equal(batch.images, twin.images)
        assert batch.side["m"].dtype == torch.bool
        agree = ((batch.images[:, 0] > 0.5) == batch.side["m"]).float().mean()
        assert agree > 0.97 and not torch.equal(batch.images[:, 0] > 0.5, images[batch.index, 0] > 127)
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(AdvpipeError, match="unknown crop"):
        DeviceLoader(ds, batch_size=8, crop="zoom")


# --------------------------------------------------------------------------- the CLI


def test_train_on_a_flowers_replica_with_random_resized_crop(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from advpipe.cli import app
    from tests.conftest import TINY_CNN

    monkeypatch.setenv("ADVPIPE_CACHE_DIR", str(tmp_path / "cache"))
    write_flowers(tmp_path / "data")
    common = ["train", "--data", "flowers102-random:3", "--data-dir", str(tmp_path / "data"), "--image-size", "32",
              "--model", TINY_CNN, "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--workers", "1"]
    result = CliRunner().invoke(app, [*common, "--crop", "random-resized", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, (result.output, result.exception)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["crop"] == "random-resized" and config["data"] == "flowers102-random:3"
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 2  # train and test, decoded once
    bad = CliRunner().invoke(app, [*common, "--crop", "zoom", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "crop must be pad or random-resized" in bad.output
