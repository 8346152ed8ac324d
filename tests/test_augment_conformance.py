"""Conformance of every registered input augmentation, torchvision-style (``check_kernel``).

One parametrized suite over ``AUGMENTS.names()``, so a newly registered augmentation is covered
without touching this file. The shared contract (docs/augmentations.md, "Sample, then apply"):

- ``sample(images, side=..., generator=...)`` draws every image's own parameters as batched tensors
  (leading dimension B) on the images' device, from the explicit generator only. The draws come in
  batch-shaped tensors from one generator, so a row's parameters depend on the generator state and
  on its position in the batch; the per-image guarantee is therefore about applying them:
- ``apply(images, params)`` is pure: applying the whole batch equals applying each image with its
  own slice of the parameters, applying twice replays exactly, ``__call__`` is exactly
  ``apply(images, sample(images, side=side, generator=generator))``, and neither touches its inputs;
- dtype (float32, float64, bfloat16) and device are kept, values stay in [0,1], empty batches work.

Augmentations that need attack masks get tiny random ones built here.
``none`` draws nothing, so the parameter checks leave it out; its own test checks that it returns
its input unchanged and draws nothing from the generator.
"""

from __future__ import annotations

import pytest
import torch

import advpipe.augment  # noqa: F401  (registers every augmentation)
from advpipe.augment.base import AUGMENTS, AugmentContext, InputAugment, build_augment
from advpipe.data.batch import Batch

MEAN = (0.4914, 0.4822, 0.4465)
NAMES = AUGMENTS.names()
#: every augmentation that draws parameters; ``none`` draws nothing and has its own test below, so no
#: loop over parameters in the suite is empty
SAMPLED = [name for name in NAMES if name != "none"]
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


def sample(aug: InputAugment, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw parameters for a batch's images and side data, as the training loop does."""
    return aug.sample(batch.images, side=batch.side, generator=generator)


def call(aug: InputAugment, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch's images, as the training loop does."""
    return aug(batch.images, side=batch.side, generator=generator)


def row(params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {key: value[i : i + 1] for key, value in params.items()}


def test_none_draws_nothing_and_returns_its_input_unchanged() -> None:
    aug, batch = build("none"), make_batch()
    images = batch.images.clone()
    g = gen(1)
    state = g.get_state()
    assert sample(aug, batch, g) == {}
    assert torch.equal(g.get_state(), state)  # not one number drawn from the generator
    out = call(aug, batch, g)
    assert torch.equal(out, images) and torch.equal(batch.images, images)
    assert torch.equal(aug.apply(batch.images, {}), images)
    assert aug.epoch_metrics() == {}


@pytest.mark.parametrize("name", SAMPLED)
def test_parameters_are_per_image_tensors_on_the_batch_device(name: str) -> None:
    batch = make_batch()
    params = sample(build(name), batch, gen(1))
    assert params, "an augmentation that draws nothing must be the identity"
    for key, value in params.items():
        assert isinstance(value, torch.Tensor), key
        assert value.shape[0] == len(batch) and value.device == batch.images.device, key


@pytest.mark.parametrize("name", SAMPLED)
def test_sampling_then_applying_replays_exactly(name: str) -> None:
    aug, batch = build(name), make_batch()
    params = sample(aug, batch, gen(2))
    saved = {key: value.clone() for key, value in params.items()}
    assert saved
    first = aug.apply(batch.images, params)
    assert torch.equal(aug.apply(batch.images, params), first)  # apply is a pure function of its inputs
    assert all(torch.equal(params[key], saved[key]) for key in saved)  # and leaves the parameters alone
    assert torch.equal(call(aug, batch, gen(2)), first)  # __call__ is sample then apply
    assert torch.equal(aug.apply(batch.images, sample(aug, batch, gen(2))), first)  # same generator state


@pytest.mark.parametrize("name", SAMPLED)
def test_batched_apply_equals_per_image(name: str) -> None:
    aug, batch = build(name), make_batch()
    params = sample(aug, batch, gen(3))
    out = aug.apply(batch.images, params)
    for i in range(len(batch)):
        assert torch.equal(aug.apply(batch.images[i : i + 1], row(params, i)), out[i : i + 1]), i


@pytest.mark.parametrize("name", SAMPLED)
def test_no_draw_is_shared_across_the_batch(name: str) -> None:
    batch = make_batch(16, same=True)  # identical images and masks: only the draws can differ
    out = call(build(name), batch, gen(4))
    assert not all(torch.equal(out[0], out[i]) for i in range(1, len(out)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_input_untouched_dtype_and_device_kept(name: str, dtype: torch.dtype, device: str) -> None:
    aug, batch = build(name), make_batch(dtype=dtype, device=device)
    images, masks = batch.images.clone(), batch.side["attack_mask"].clone()
    out = call(aug, batch, gen(5, device))
    assert torch.equal(batch.images, images) and torch.equal(batch.side["attack_mask"], masks)
    assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
    assert out.min() >= 0 and out.max() <= 1
    if name != "none":
        assert not torch.equal(out, images)
    assert torch.equal(call(aug, batch, gen(5, device)), out)  # same seed, same output
    if name != "none":
        assert not torch.equal(call(aug, batch, gen(6, device)), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name: str, dtype: torch.dtype) -> None:
    aug = build(name)
    out = call(aug, make_batch(0, dtype=dtype), gen(7))
    assert out.shape == (0, 3, 32, 32) and out.dtype == dtype
    assert isinstance(aug.epoch_metrics(), dict)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_raise(name: str) -> None:
    with pytest.raises(TypeError):
        build_augment(name, AugmentContext("cifar10", (32, 32), 10, MEAN), definitely_not_an_option=1)
