"""The public API (``import advpipe``): lazy imports, and objects that give exactly what the internal kernels give."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import advpipe
from advpipe.augment import AugmentContext, build_augment
from advpipe.data.batch import Batch
from advpipe.data.datasets import CIFAR100_MEAN, load_dataset
from advpipe.data.transforms import apply_crop_flip, sample_crop_flip
from advpipe.errors import AdvpipeError, OverwriteRefused
from advpipe.rng import chunk_seed
from advpipe.pipeline.codecs import sample_hash
from advpipe.pipeline.reader import open_store
from advpipe.pipeline.streaming import ResidentMasks
from helpers.sharing import tiny_store
from helpers.stores import assert_same_store, store_arrays
from helpers.template_task import tiny_cnn

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in:UserWarning")]
N = 32


@pytest.fixture(scope="module")
def ds():
    return load_dataset("embedded", "train", limit=N)


@pytest.fixture(scope="module")
def store(ds, tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("api") / "tiny.zarr", ds, chunk_size=8)


def _gen(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- import


def test_import_is_lazy_and_fast() -> None:
    code = ("import sys, time; t = time.perf_counter(); import advpipe; dt = time.perf_counter() - t; "
            "print(dt, 'torch' in sys.modules, 'zarr' in sys.modules, 'numpy' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seconds, torch_loaded, zarr_loaded, numpy_loaded = proc.stdout.split()
    assert float(seconds) < 0.5
    assert (torch_loaded, zarr_loaded, numpy_loaded) == ("False", "False", "False")


def test_every_public_name_resolves_and_is_listed() -> None:
    assert "__version__" in advpipe.__all__ and len(advpipe.__all__) == len(set(advpipe.__all__))
    for name in advpipe.__all__:
        assert getattr(advpipe, name) is not None, name
    assert set(advpipe.__all__) <= set(dir(advpipe))
    assert advpipe.AdvMask is advpipe.api.augment.AdvMask and advpipe.augment.AUGMENTS is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        advpipe.nope  # noqa: B018
    # every public callable documents itself in one line at least
    assert all((getattr(advpipe, n).__doc__ or "").strip() for n in advpipe.__all__ if n != "__version__")


# ------------------------------------------------------------------------------------------- mask stores


def test_open_masks_returns_the_stored_rows_on_the_device(ds, store) -> None:
    masks = advpipe.open_masks(store)
    assert len(masks) == N and masks.image_shape == (3, 32, 32) and masks.summary["n"] == N
    index = torch.tensor([5, 0, 31, 5])
    got = masks.masks(index, "cpu")
    assert got.dtype == torch.bool and got.shape == (4, 32, 32)
    np.testing.assert_array_equal(got.numpy(), open_store(store).read_masks(0, N)[index.numpy()])
    assert torch.equal(masks(index.tolist()), got)  # lists, and the default device is the indices'
    assert advpipe.open_masks(masks) is masks
    with pytest.raises(AdvpipeError, match=r"\[0, 32\)"):
        masks.masks([0, 32])
    with pytest.raises(AdvpipeError, match="integers"):
        masks.masks(torch.tensor([0.5]))


def test_check_data_accepts_the_data_and_refuses_another_order(ds, store) -> None:
    masks = advpipe.open_masks(store)
    masks.check_data(TensorDataset(ds.images, ds.labels))
    masks.check_data((ds.images.float() / 255, ds.labels))  # float images hash as their uint8 levels
    with pytest.raises(AdvpipeError, match="samples do not match the data by content hash"):
        masks.check_data((ds.images.flip(0), ds.labels))
    with pytest.raises(AdvpipeError, match="16 images"):
        masks.check_data((ds.images[:16], ds.labels[:16]))


def test_incomplete_store_is_refused(ds, tmp_path) -> None:
    path = tiny_store(tmp_path / "partial.zarr", ds, chunk_size=8, finalize=False)
    with pytest.raises(AdvpipeError, match="incomplete"):
        advpipe.open_masks(path)


# ------------------------------------------------------------------------------------------ augmentations


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_public_advmask_equals_the_internal_augmentation(ds, store, device) -> None:
    """Same store, options, schedule and generator seed: exactly the training loop's output."""
    dev = torch.device(device)
    options = dict(l=(2, 15), p=(0.2, 0.4), o=0.1, prob_max=0.8)
    internal = build_augment("advmask", AugmentContext("embedded", (32, 32), 10, ds.mean, epochs=4), **options)
    internal.set_epoch(2, 4)
    index = torch.randperm(N, generator=_gen(1))[:24]  # a loader's indices stay on the CPU
    x = (ds.images[index].float() / 255).to(dev)
    resident = ResidentMasks(open_store(store), dev)
    batch = Batch(x, ds.labels[index].to(dev), index.to(dev), {"attack_mask": resident(index)})

    def gen() -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(3)

    expected = internal(batch.images, side=batch.side, generator=gen())  # as the training loop calls it
    for masks in (advpipe.open_masks(store), str(store), torch.from_numpy(open_store(store).read_masks(0, N))):
        aug = advpipe.AdvMask(masks, **options, mean=ds.mean)
        aug.set_epoch(2, 4)
        before = x.clone()
        out = aug(x, index, generator=gen())
        assert out.device == x.device and torch.equal(out, expected) and torch.equal(x, before)
        assert aug.fraction == internal.fraction == pytest.approx(0.6)
    assert (out != x).any(1).flatten(1).any(1).float().mean() > 0.3  # the kernel did occlude
    assert aug.epoch_metrics() == internal.epoch_metrics()
    # masks given per call (e.g. after RandomCropFlip) instead of looked up by index
    aug = advpipe.AdvMask(**options, mean=ds.mean)
    aug.set_epoch(2, 4)
    assert torch.equal(aug(x, attack_masks=batch.side["attack_mask"], generator=gen()), expected)


@pytest.mark.parametrize("cls, name", [(advpipe.Cutout, "cutout"), (advpipe.RandomErasing, "random-erasing"),
                                       (advpipe.HideAndSeek, "hide-and-seek"), (advpipe.GridMask, "gridmask")])
def test_baselines_equal_the_internal_kernels(ds, cls, name) -> None:
    x = ds.images[:16].float() / 255
    internal = build_augment(name, AugmentContext("cifar10", (32, 32), 10, ds.mean, epochs=1))
    expected = internal(x, generator=_gen())
    aug = cls(mean=ds.mean)
    assert type(aug) is type(internal) is cls  # one class serves the training loop and the public API
    assert torch.equal(aug(x, generator=_gen()), expected) and not torch.equal(expected, x)
    params = aug.sample(x, generator=_gen())
    assert torch.equal(aug.apply(x, params), expected)  # sample, then apply, replays
    # without a generator the object's own one (seeded by ``seed``) advances from call to call
    a, b = cls(seed=5), cls(seed=5)
    first = a(x)
    assert torch.equal(first, b(x)) and not torch.equal(first, a(x))


def test_create_augmentation_by_name_and_options(ds) -> None:
    assert set(advpipe.list_augmentations()) >= {"advmask", "advmask-rp", "aapm", "cutout", "gridmask"}
    x = ds.images[:8].float() / 255
    out = advpipe.create_augmentation("cutout", size=8)(x, generator=_gen())
    assert int((out != x).any(1).flatten(1).sum(1).max()) <= 64
    rp = advpipe.AdvMask(points="random", num_points=50, prob_max=1.0)  # the RP ablation needs no masks
    assert (rp(x, generator=_gen()) != x).any()
    cifar100 = advpipe.AdvMask(dataset="cifar100")
    assert cifar100.l_range == (5, 20) and cifar100.mean == CIFAR100_MEAN
    assert advpipe.Cutout(image_size=64).size == 32  # paper pixels scale with the image
    assert advpipe.AdvMask is advpipe.augment.advmask.AdvMask and advpipe.Cutout is advpipe.augment.occlusion.Cutout
    with pytest.warns(DeprecationWarning, match="create_augmentation"):
        old = advpipe.Augmentation("cutout", size=8)  # the old wrapper's name, for one release
    assert torch.equal(old(x, generator=_gen()), out)


def test_incremental_schedule_occludes_the_scheduled_fraction(ds, store) -> None:
    aug = advpipe.AdvMask(advpipe.open_masks(store), prob_max=0.8)
    x = ds.images.float() / 255
    g = _gen()
    for epoch, expected in ((0, 0.2), (1, 0.4), (3, 0.8), (7, 0.8)):
        aug.set_epoch(epoch, 4)
        for _ in range(4):
            aug(x, torch.arange(N), generator=g)
        assert aug.epoch_metrics()["fraction_augmented"] == pytest.approx(expected, abs=1 / N)


def test_bad_input_raises_user_errors(ds, store) -> None:
    x = ds.images[:4].float() / 255
    with pytest.raises(AdvpipeError, match="needs attack masks"):
        advpipe.AdvMask()(x, torch.arange(4))
    with pytest.raises(AdvpipeError, match="needs attack masks"):
        advpipe.AdvMask(store)(x)  # masks without indices
    with pytest.raises(AdvpipeError, match="float tensor"):
        advpipe.Cutout()(ds.images[:4])
    with pytest.raises(AdvpipeError, match="indices must have shape"):
        advpipe.AdvMask(store)(x, torch.arange(3))
    with pytest.raises(AdvpipeError, match="no known mean"):
        advpipe.Cutout(dataset="mnist")
    with pytest.raises(AdvpipeError, match="l_min"):
        advpipe.AdvMask(l=(5, 2))
    with pytest.raises(TypeError):
        advpipe.create_augmentation("cutout", sizee=3)  # unknown options never vanish
    with pytest.raises(TypeError):
        advpipe.create_augmentation("cutout", sizee=None)


def test_random_crop_flip_keeps_masks_on_their_pixels() -> None:
    images = torch.zeros(64, 3, 8, 8)
    masks = torch.zeros(64, 8, 8, dtype=torch.bool)
    images[:, :, 2, 5] = 1.0
    masks[:, 2, 5] = True
    crop = advpipe.RandomCropFlip(pad=2)
    out, out_masks = crop(images, masks, generator=_gen())
    assert out_masks.dtype == torch.bool and torch.equal(out[:, 0] > 0.5, out_masks)
    params = sample_crop_flip(64, pad=2, flip=True, generator=_gen(), device="cpu")
    assert torch.equal(out, apply_crop_flip(images, params))
    assert len({tuple(m.nonzero().flatten().tolist()) for m in out_masks}) > 5  # crops differ per image
    assert torch.equal(crop(images, generator=_gen()), out)  # one tensor in, one out


# ------------------------------------------------------------------------------------------- precompute


def _model(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return advpipe.Normalized(tiny_cnn(10, batchnorm=True), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


ATTACK = dict(steps=2, init_steps=1, init_extra_steps=0)
RUN = dict(batch_size=4, chunk_size=8)


def test_precompute_from_objects_writes_the_cli_store(ds, tmp_path) -> None:
    model = _model()
    model.train()
    attack = advpipe.SparseAttackConfig(**ATTACK)
    res = advpipe.precompute_masks(model, TensorDataset(ds.images[:16], ds.labels[:16]), tmp_path / "m.zarr",
                                   attack=attack, name="embedded", **RUN)
    assert model.training and all(p.requires_grad for p in model.parameters())  # the caller's model untouched
    assert (res.n_chunks, res.chunks_run, res.images_run) == (2, 2, 16)
    prov = res.provenance
    assert prov["dataset"] == {"name": "embedded", "split": "train", "n": 16, "image_shape": [3, 32, 32],
                               "fingerprint": load_dataset("embedded", "train", limit=16).fingerprint}
    assert prov["model"]["arch"] == "Sequential" and len(prov["model"]["checkpoint_sha256"]) == 64
    assert prov["attack"]["batch_size"] == 4 and prov["attack"]["encoder"] == "linear" and prov["seed"] == 0
    arrays = store_arrays(res.path)
    np.testing.assert_array_equal(arrays["sample_hash"], sample_hash(ds.images[:16].numpy(), layout="NCHW"))
    # chunk 1 is the attack of its own images with the generator seeded from (seed, 1), batch by batch
    victim = _model().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(chunk_seed(0, 1))
    for start in (8, 12):
        x = ds.images[start : start + 4].float() / 255
        direct = advpipe.sparse_attack(victim, x, ds.labels[start : start + 4], attack, generator=g)
        np.testing.assert_array_equal(arrays["masks"][start : start + 4], direct.mask.numpy())
    assert prov["model"]["clean_accuracy"] == pytest.approx(arrays["clean_correct"].mean())
    assert advpipe.open_masks(res.path).masks(torch.arange(16)).shape == (16, 32, 32)

    again = advpipe.precompute_masks(model, (ds.images[:16], ds.labels[:16]), res.path, attack=attack,
                                     name="embedded", **RUN)
    assert (again.chunks_run, again.chunks_already_done) == (0, 2)
    # a typed refusal that names the field (the CLI writes it --overwrite), no rewritten message (issue 24)
    with pytest.raises(OverwriteRefused, match="complete and immutable.*pass overwrite to recompute") as refused:
        advpipe.precompute_masks(_model(seed=1), (ds.images[:16], ds.labels[:16]), res.path, attack=attack, **RUN)
    assert refused.value.fields == ("overwrite",)


def test_precompute_from_objects_resumes_after_a_failure(ds, tmp_path, monkeypatch) -> None:
    from advpipe.pipeline.precompute_runner import ChunkTask

    data = (ds.images[:16].float() / 255, ds.labels[:16])  # float images: same masks, float fingerprint
    attack = advpipe.SparseAttackConfig(**ATTACK)
    ref = advpipe.precompute_masks(_model(), data, tmp_path / "ref.zarr", attack=attack, clean_accuracy=0.5, **RUN)
    assert ref.provenance["dataset"]["fingerprint"] != load_dataset("embedded", "train", limit=16).fingerprint

    call = ChunkTask.__call__

    def dies_on_chunk_1(self, writer, index):
        if index == 1:
            raise RuntimeError("killed")
        return call(self, writer, index)

    monkeypatch.setattr(ChunkTask, "__call__", dies_on_chunk_1)
    with pytest.raises(RuntimeError, match="killed"):
        advpipe.precompute_masks(_model(), data, tmp_path / "run.zarr", attack=attack, clean_accuracy=0.5, **RUN)
    assert open_store(tmp_path / "run.zarr").chunk_done().tolist() == [True, False]
    monkeypatch.setattr(ChunkTask, "__call__", call)
    with pytest.raises(AdvpipeError, match="another configuration.*seed"):
        advpipe.precompute_masks(_model(), data, tmp_path / "run.zarr", attack=attack, seed=1, **RUN)
    resumed = advpipe.precompute_masks(_model(), data, tmp_path / "run.zarr", attack=attack, clean_accuracy=0.5, **RUN)
    assert (resumed.chunks_run, resumed.chunks_already_done) == (1, 1)
    assert_same_store(ref.path, resumed.path)
    uint8 = store_arrays(ref.path)
    np.testing.assert_array_equal(uint8["sample_hash"], sample_hash(ds.images[:16].numpy(), layout="NCHW"))


@pytest.mark.slow
def test_precompute_from_objects_on_a_dask_worker_gives_the_same_store(ds, tmp_path, monkeypatch) -> None:
    """The model and data travel to the worker once (scattered), and the store equals the in-process one."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data, attack = (ds.images[:16], ds.labels[:16]), advpipe.SparseAttackConfig(**ATTACK)
    local = advpipe.precompute_masks(_model(), data, tmp_path / "local.zarr", attack=attack, clean_accuracy=0.5, **RUN)
    remote = advpipe.precompute_masks(_model(), data, tmp_path / "dask.zarr", attack=attack, clean_accuracy=0.5,
                                      workers=1, **RUN)
    assert remote.chunks_run == 2
    assert_same_store(local.path, remote.path)


class _PilDataset(Dataset):
    """A torchvision-style dataset: (PIL image, int label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(self.images[i]), int(self.labels[i])


def test_datasets_read_as_tensors_and_bad_data_refused(ds) -> None:
    from advpipe.data.user import as_tensors

    images, labels = as_tensors(_PilDataset(ds.images[:6], ds.labels[:6]))
    assert torch.equal(images, ds.images[:6]) and torch.equal(labels, ds.labels[:6])
    images, _ = as_tensors((ds.images[:2].permute(0, 1, 2, 3).numpy(), ds.labels[:2].numpy()))
    assert images.dtype == torch.uint8
    indexed = advpipe.IndexedDataset(TensorDataset(ds.images[:4], ds.labels[:4]))
    assert len(indexed) == 4 and indexed[3][2] == 3 and torch.equal(indexed[3][0], ds.images[3])
    with pytest.raises(AdvpipeError, match=r"\[0,1\]"):
        as_tensors((ds.images[:2].float(), ds.labels[:2]))
    with pytest.raises(AdvpipeError, match="labels must have shape"):
        as_tensors((ds.images[:2], ds.labels[:3]))
    with pytest.raises(AdvpipeError, match="nn.Module"):
        advpipe.precompute_masks("resnet20", (ds.images[:2], ds.labels[:2]), "x.zarr")
    with pytest.raises(AdvpipeError, match="chunk_size"):
        advpipe.precompute_masks(_model(), (ds.images[:2], ds.labels[:2]), "x.zarr", chunk_size=0)


def test_load_model_and_the_registry(tmp_path) -> None:
    from advpipe.models.build import model_from_checkpoint
    from advpipe.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    assert "resnet20" in advpipe.list_models()
    net = advpipe.create_model("resnet20", num_classes=10)
    path = tmp_path / "r20.pt"
    save_checkpoint(path, Checkpoint(arch="resnet20", num_classes=10, dataset="embedded", fingerprint="sha256:x",
                                     mean=(0.5,) * 3, std=(0.25,) * 3, image_size=32, model_state=net.state_dict()))
    model = advpipe.load_model(path)
    x = torch.rand(2, 3, 32, 32, generator=_gen())
    assert not model.training
    assert torch.equal(model(x), model_from_checkpoint(load_checkpoint(path)).eval()(x))
    with pytest.raises(AdvpipeError, match="unknown model"):
        advpipe.create_model("resnet9000", num_classes=10)
