"""The corruption suite's contract (every registered corruption), replay, lists, and the digital/geometric kernels."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch

from advpipe.data.datasets import load_dataset
from advpipe.errors import AdvpipeError
from advpipe.eval.corruptions import (
    ALL_CORRUPTIONS,
    CIFAR_C_FILES,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    MTLAT_CORRUPTIONS,
    STANDARD_CORRUPTIONS,
    corrupt,
    parse_corruption_list,
    parse_severities,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: corruptions whose reference levels do not change the image more at severity 5 than at 1: CIFAR-10-C's
#: elastic transform moves its random affine anchors by 8% of the side at severity 1 and 3% at 5
NOT_MONOTONE = {"elastic-transform"}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """32 real CIFAR-10 test images (the embedded subset) in [0,1]."""
    return load_dataset("embedded", "test", limit=32).images.float() / 255


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_corruption_contract(name: str, images: torch.Tensor) -> None:
    x = images.clone()
    diffs = []
    for severity in (1, 5):
        g = torch.Generator().manual_seed(severity)
        out = corrupt(x, name, severity, generator=g)
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert out.min() >= 0 and out.max() <= 1
        diffs.append((out - x).abs().mean().item())
    assert torch.equal(x, images), "input modified in place"
    assert diffs[0] > 0 and diffs[1] > 0
    if name not in NOT_MONOTONE:
        assert diffs[1] > diffs[0], f"severity 5 should change images more than severity 1: {diffs}"
    # float64 in, float64 out; empty batches pass through
    assert corrupt(x[:2].double(), name, 3, generator=torch.Generator().manual_seed(0)).dtype == torch.float64
    assert corrupt(x[:0], name, 3).shape == (0, *x.shape[1:])


@pytest.mark.parametrize("name", [n for n in ALL_CORRUPTIONS if CORRUPTIONS.get(n).random])
def test_random_corruptions_replay_from_generator_and_params(name: str, images: torch.Tensor) -> None:
    c = CORRUPTIONS.get(name)
    a = c(images, 3, generator=torch.Generator().manual_seed(7))
    b = c(images, 3, generator=torch.Generator().manual_seed(7))
    other = c(images, 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, other)
    params = c.sample(images, 3, torch.Generator().manual_seed(7))
    assert torch.equal(c.apply(images, 3, params), a)
    state = torch.get_rng_state()
    c(images, 3)  # without a generator: default-seeded, global RNG untouched
    assert torch.equal(state, torch.get_rng_state())


def _hsv_reference(img: torch.Tensor, fn) -> torch.Tensor:
    a = img.permute(1, 2, 0).double().numpy()
    out = np.array([[colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*px))) for px in row] for row in a])
    return torch.from_numpy(out).permute(2, 0, 1).clamp(0, 1)


@pytest.mark.parametrize("severity", [1, 2, 5])
def test_brightness_and_saturate_match_hsv_round_trip(severity: int, images: torch.Tensor) -> None:
    img = images[3].double()
    shift = CORRUPTIONS.get("brightness").level(severity)["shift"]
    ref = _hsv_reference(img, lambda h, s, v: (h, s, min(v + shift, 1.0)))
    assert torch.allclose(corrupt(img[None], "brightness", severity)[0], ref, atol=1e-9)
    lv = CORRUPTIONS.get("saturate").level(severity)
    ref = _hsv_reference(img, lambda h, s, v: (h, min(max(s * lv["scale"] + lv["offset"], 0.0), 1.0), v))
    assert torch.allclose(corrupt(img[None], "saturate", severity)[0], ref, atol=1e-9)


def test_gaussian_blur_matches_scipy(images: torch.Tensor) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    img = images[:2].double()
    for severity in (1, 5):
        sigma = CORRUPTIONS.get("gaussian-blur").level(severity)["sigma"]
        ref = np.stack([[ndimage.gaussian_filter(ch.numpy(), sigma=sigma, mode="nearest", truncate=4.0) for ch in im]
                        for im in img])
        assert torch.allclose(corrupt(img, "gaussian-blur", severity), torch.from_numpy(ref), atol=1e-9)


def test_pixelate_and_jpeg_match_pil(images: torch.Tensor) -> None:
    from PIL import Image

    uint8 = (images[:4] * 255).round().to(torch.uint8)
    for severity in (1, 5):
        factor = CORRUPTIONS.get("pixelate").level(severity)["factor"]
        quality = CORRUPTIONS.get("jpeg").level(severity)["quality"]
        for i, img in enumerate(uint8):
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())
            small = pil.resize((int(32 * factor), int(32 * factor)), Image.BOX).resize((32, 32), Image.BOX)
            ref = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).float() / 255
            # PIL rounds to uint8; we stay in float
            assert (corrupt(images[i: i + 1], "pixelate", severity)[0] - ref).abs().max() <= 1.01 / 255
            buf = io.BytesIO()
            pil.save(buf, "JPEG", quality=quality)
            ref = torch.from_numpy(np.asarray(Image.open(buf)).copy()).permute(2, 0, 1).float() / 255
            assert (corrupt(images[i: i + 1], "jpeg", severity)[0] - ref).abs().mean() <= 1 / 255


def test_geometric_corruptions_do_what_they_say(images: torch.Tensor) -> None:
    x = images[:8]
    g = torch.Generator().manual_seed(0)
    occ = CORRUPTIONS.get("occlusion")
    p = occ.sample(x, 5, g)
    out = occ.apply(x, 5, p)
    for b in range(len(x)):
        t, l, s = int(p["top"][b]), int(p["left"][b]), int(p["side"][b])
        assert s == 18
        assert torch.all(out[b, :, t:t + s, l:l + s] == 0.5)
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[t:t + s, l:l + s] = False
        assert torch.equal(out[b][:, outside], x[b][:, outside])
    tr = CORRUPTIONS.get("translation")
    p = tr.sample(x, 3, g)
    out = tr.apply(x, 3, p)
    for b in range(len(x)):
        dx, dy = int(p["dx"][b]), int(p["dy"][b])
        assert 5 <= (dx**2 + dy**2) ** 0.5 <= 7  # 6 px at severity 3, up to rounding
        shifted = torch.zeros_like(x[b])
        shifted[:, max(dy, 0): 32 + min(dy, 0), max(dx, 0): 32 + min(dx, 0)] = \
            x[b][:, max(-dy, 0): 32 + min(-dy, 0), max(-dx, 0): 32 + min(-dx, 0)]
        assert torch.allclose(out[b], shifted)
    cs = CORRUPTIONS.get("color-shift")
    p = cs.sample(x, 2, g)
    out = cs.apply(x, 2, p)
    changed = (out != x).flatten(2).any(2)
    assert torch.equal(changed.float().argmax(1), p["channel"]) and torch.all(changed.sum(1) == 1)
    rot = CORRUPTIONS.get("rotation")
    p = rot.sample(x, 4, g)
    assert set(p["degrees"].abs().tolist()) == {32.0}
    out = rot.apply(x, 4, p)
    assert torch.all(out[:, :, 0, 0] == 0)  # corners rotate out of the image and become black


def test_corruption_and_severity_lists() -> None:
    assert parse_corruption_list("all") == list(ALL_CORRUPTIONS) and len(ALL_CORRUPTIONS) == 23
    assert len(STANDARD_CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4 and len(MTLAT_CORRUPTIONS) == 4
    assert set(CORRUPTIONS.names()) == set(ALL_CORRUPTIONS)
    assert parse_corruption_list("standard") == list(STANDARD_CORRUPTIONS)
    assert parse_corruption_list("cifar-c") == list(STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS)
    assert parse_corruption_list("jpeg,Gaussian_Noise,jpeg") == ["gaussian-noise", "jpeg"]
    # the official release's file names are accepted as names
    assert parse_corruption_list("jpeg_compression,elastic_transform,fog") == ["fog", "elastic-transform", "jpeg"]
    assert sorted(CIFAR_C_FILES) == sorted(STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS)
    assert CIFAR_C_FILES["jpeg"] == "jpeg_compression" and CIFAR_C_FILES["glass-blur"] == "glass_blur"
    assert parse_corruption_list(None) == [] and parse_corruption_list("none") == []
    with pytest.raises(AdvpipeError, match="unknown corruption 'hail'.*choose one of"):
        parse_corruption_list("hail")
    assert parse_severities("1-5") == (1, 2, 3, 4, 5)
    assert parse_severities("5,1,3") == (1, 3, 5)
    assert parse_severities("2") == (2,)
    for bad in ("0-3", "6", "a", "3-1", "", "1,,2"):
        with pytest.raises(AdvpipeError, match="severities"):
            parse_severities(bad)
