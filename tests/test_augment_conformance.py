"""Conformance of every registered input augmentation, torchvision-style (``check_kernel``).

One parametrized suite over ``AUGMENTS.names()``, so a newly registered augmentation is covered
without touching this file. The shared contract (docs/augmentations.md, "Sample, then apply"):

- ``sample(batch, generator)`` draws every image's own parameters as batched tensors (leading
  dimension B) on the batch's device, from the explicit generator only. The draws come in
  batch-shaped tensors from one generator, so a row's parameters depend on the generator state and
  on its position in the batch; the per-image guarantee is therefore about applying them:
- ``apply(images, params)`` is pure: applying the whole batch equals applying each image with its
  own slice of the parameters, applying twice replays exactly, ``__call__`` is exactly
  ``apply(images, sample(batch, generator))``, and neither touches its inputs;
- dtype (float32, float64, bfloat16) and device are kept, values stay in [0,1], empty batches work.

Augmentations that need attack masks get tiny random ones built here.
"""

from __future__ import annotations

import pytest
import torch

import advpipe.augment  # noqa: F401  (registers every augmentation)
from advpipe.augment.base import AUGMENTS, AugmentContext, InputAugment, build_augment
from advpipe.data.batch import Batch

MEAN = (0.4914, 0.4822, 0.4465)
NAMES = AUGMENTS.names()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_batch(n: int = 12, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
               same: bool = False) -> Batch:
    """Random images with random attack masks (about 80 points each); ``same`` repeats the first image."""
    g = gen(seed)
    images = torch.rand(n, 3, 32, 32, generator=g)
    masks = torch.rand(n, 32, 32, generator=g) < 0.08
    if same and n:
        images, masks = images[:1].expand_as(images).clone(), masks[:1].expand_as(masks).clone()
    return Batch(images.to(device=device, dtype=dtype), torch.zeros(n, dtype=torch.long, device=device),
                 torch.arange(n, device=device), {"attack_mask": masks.to(device)})


def build(name: str, epochs: int = 4) -> InputAugment:
    """The augmentation at the end of its schedule (full strength), on CIFAR-10 defaults."""
    aug = build_augment(name, AugmentContext("cifar10", (32, 32), 10, MEAN, epochs=epochs))
    aug.set_epoch(epochs - 1, epochs)
    return aug


def row(params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {key: value[i : i + 1] for key, value in params.items()}


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_per_image_tensors_on_the_batch_device(name: str) -> None:
    batch = make_batch()
    params = build(name).sample(batch, gen(1))
    for key, value in params.items():
        assert isinstance(value, torch.Tensor), key
        assert value.shape[0] == len(batch) and value.device == batch.images.device, key


@pytest.mark.parametrize("name", NAMES)
def test_sampling_then_applying_replays_exactly(name: str) -> None:
    aug, batch = build(name), make_batch()
    params = aug.sample(batch, gen(2))
    saved = {key: value.clone() for key, value in params.items()}
    first = aug.apply(batch.images, params)
    assert torch.equal(aug.apply(batch.images, params), first)  # apply is a pure function of its inputs
    assert all(torch.equal(params[key], saved[key]) for key in saved)  # and leaves the parameters alone
    assert torch.equal(aug(batch, gen(2)).images, first)  # __call__ is sample then apply
    assert torch.equal(aug.apply(batch.images, aug.sample(batch, gen(2))), first)  # same generator state


@pytest.mark.parametrize("name", NAMES)
def test_batched_apply_equals_per_image(name: str) -> None:
    aug, batch = build(name), make_batch()
    params = aug.sample(batch, gen(3))
    out = aug.apply(batch.images, params)
    for i in range(len(batch)):
        assert torch.equal(aug.apply(batch.images[i : i + 1], row(params, i)), out[i : i + 1]), i


@pytest.mark.parametrize("name", NAMES)
def test_no_draw_is_shared_across_the_batch(name: str) -> None:
    if name == "none":
        pytest.skip("draws nothing")
    batch = make_batch(16, same=True)  # identical images and masks: only the draws can differ
    out = build(name)(batch, gen(4)).images
    assert not all(torch.equal(out[0], out[i]) for i in range(1, len(out)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_input_untouched_dtype_and_device_kept(name: str, dtype: torch.dtype, device: str) -> None:
    aug, batch = build(name), make_batch(dtype=dtype, device=device)
    images, masks = batch.images.clone(), batch.side["attack_mask"].clone()
    out = aug(batch, gen(5, device))
    assert torch.equal(batch.images, images) and torch.equal(batch.side["attack_mask"], masks)
    assert out.images.shape == images.shape and out.images.dtype == dtype and out.images.device == images.device
    assert out.images.min() >= 0 and out.images.max() <= 1
    if name != "none":
        assert not torch.equal(out.images, images)
    assert torch.equal(aug(batch, gen(5, device)).images, out.images)  # same seed, same output
    if name != "none":
        assert not torch.equal(aug(batch, gen(6, device)).images, out.images)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name: str, dtype: torch.dtype) -> None:
    aug = build(name)
    out = aug(make_batch(0, dtype=dtype), gen(7))
    assert out.images.shape == (0, 3, 32, 32) and out.images.dtype == dtype
    assert isinstance(aug.epoch_metrics(), dict)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_raise(name: str) -> None:
    with pytest.raises(TypeError):
        build_augment(name, AugmentContext("cifar10", (32, 32), 10, MEAN), definitely_not_an_option=1)
