"""The nine corruptions added to reach the full CIFAR-10-C, checked against NumPy/SciPy references.

Each reference below re-implements the formula of CIFAR-10-C's ``make_cifar_c.py`` per image in
NumPy/SciPy (loops where the reference loops), fed with the random draws our sampler made, and
is compared with the batched torch kernel at every severity. Where the reference calls OpenCV
or ImageMagick, the reference here re-implements the documented algorithm (OpenCV's Canny,
distance transform and histogram equalisation; ImageMagick's motion-blur kernel) independently
of the torch code: raster-scan loops instead of tensor ops. ``docs/evaluation.md`` gives the
remaining differences from the original libraries and their measured size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from advpipe.data.datasets import load_dataset
from advpipe.eval.corruptions import CORRUPTIONS, SEVERITIES
from advpipe.eval.corruptions_spatter import canny, chamfer_distance, equalize_hist
from advpipe.eval.corruptions_textures import FROST_TEXTURES, frost_textures, plasma_fractal, plasma_uniforms

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Four real CIFAR-10 test images in float64."""
    return load_dataset("embedded", "test", limit=4).images.double() / 255


def _draw(name: str, x: torch.Tensor, severity: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    c = CORRUPTIONS.get(name)
    params = c.sample(x, severity, torch.Generator().manual_seed(seed))
    return c.apply(x, severity, params), {k: v.numpy() for k, v in params.items()}


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy().copy()


def _blur(img: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian(multichannel=True): spatial axes only."""
    s = (sigma, sigma, 0) if img.ndim == 3 else sigma
    return ndimage.gaussian_filter(img, sigma=s, mode=mode, truncate=truncate)


def _clipped_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    h = img.shape[0]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    out = ndimage.zoom(img[top:top + ch, top:top + ch], (factor, factor, 1), order=1)
    trim = (out.shape[0] - h) // 2
    return out[trim:trim + h, trim:trim + h]


def _motion(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick MotionBlurImage: one-sided Gaussian of width 2 ceil(radius) + 1, edge pixels."""
    width = 2 * math.ceil(radius) + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
    k /= k.sum()
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    a = math.radians(angle)
    for i in range(width):
        dx, dy = math.ceil(i * math.cos(a) - 0.5), math.ceil(i * math.sin(a) - 0.5)
        rows = np.clip(np.arange(h) + dy, 0, h - 1)
        cols = np.clip(np.arange(w) + dx, 0, w - 1)
        out += k[i] * img[rows][:, cols]
    return out


def _check(ours: torch.Tensor, ref: np.ndarray, atol: float = 1e-7) -> None:
    ref_t = torch.from_numpy(np.clip(ref, 0, 1)).permute(2, 0, 1)
    assert torch.allclose(ours, ref_t, atol=atol), f"max diff {(ours - ref_t).abs().max().item():.3g}"


# --------------------------------------------------------------------------- noise and blur


@pytest.mark.parametrize("severity", SEVERITIES)
def test_speckle_noise(severity: int, images: torch.Tensor) -> None:
    out, p = _draw("speckle-noise", images, severity)
    c = [0.06, 0.1, 0.12, 0.16, 0.2][severity - 1]
    for i in range(len(images)):
        x = _hwc(images[i])
        _check(out[i], x + x * np.transpose(p["noise"][i], (1, 2, 0)) * c)


def test_numpy_view_swap_is_a_copy() -> None:
    # The reference's glass blur "swaps" x[h, w], x[h', w'] = x[h', w'], x[h, w] on NumPy views:
    # the source keeps its value and the destination gets a copy of it.
    a = np.arange(12).reshape(2, 2, 3)
    a[0, 0], a[1, 1] = a[1, 1], a[0, 0]
    assert a[0, 0].tolist() == [9, 10, 11] and a[1, 1].tolist() == [9, 10, 11]


@pytest.mark.parametrize("severity", SEVERITIES)
def test_glass_blur(severity: int, images: torch.Tensor) -> None:
    out, p = _draw("glass-blur", images, severity)
    sigma, delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][severity - 1]
    for i in range(len(images)):
        x = _blur(_hwc(images[i]), sigma)
        for it in range(iterations):  # the reference's sequential scan, one pixel at a time
            for hi, h in enumerate(range(32 - delta, delta, -1)):
                for wi, w in enumerate(range(32 - delta, delta, -1)):
                    dx, dy = p["shifts"][i, it, hi, wi]
                    x[h, w] = x[h + dy, w + dx].copy()
        _check(out[i], _blur(x, sigma))
    assert set(np.unique(p["shifts"])) <= {-1, 0}  # randint(-1, 1)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_motion_blur(severity: int, images: torch.Tensor) -> None:
    out, p = _draw("motion-blur", images, severity)
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
    assert np.all((p["degrees"] >= -45) & (p["degrees"] < 45))
    for i in range(len(images)):
        _check(out[i], _motion(_hwc(images[i]), radius, sigma, float(p["degrees"][i])))


def test_motion_blur_trails_along_its_angle() -> None:
    x = torch.zeros(1, 1, 17, 17, dtype=torch.float64)
    x[0, 0, 8, 12] = 1.0
    from advpipe.eval.corruptions_base import motion_blur

    flat = motion_blur(x, 6, 2.0, torch.tensor([0.0]))[0, 0]
    # at angle 0 each output pixel averages the pixels to its right: the dot smears leftwards along row 8
    assert flat[8, 12] > flat[8, 10] > flat[8, 6] > 0 and flat[8, 13] == 0 and flat[7].abs().sum() == 0


@pytest.mark.parametrize("severity", SEVERITIES)
def test_zoom_blur(severity: int, images: torch.Tensor) -> None:
    out, _ = _draw("zoom-blur", images, severity)
    stop = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    for i in range(len(images)):
        x = _hwc(images[i])
        factors = np.arange(1, stop, 0.01)
        acc = sum(_clipped_zoom(x, z) for z in factors)
        _check(out[i], (x + acc) / (len(factors) + 1))


# --------------------------------------------------------------------------- weather


@pytest.mark.parametrize("severity", SEVERITIES)
def test_snow(severity: int, images: torch.Tensor) -> None:
    out, p = _draw("snow", images, severity)
    loc, scale, zoom, thr, radius, sigma, blend = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][severity - 1]
    assert np.all((p["degrees"] >= -135) & (p["degrees"] < -45))
    assert abs(p["layer"].mean() - loc) < 0.05 and abs(p["layer"].std() - scale) < 0.05
    for i in range(len(images)):
        x = _hwc(images[i])
        layer = _clipped_zoom(p["layer"][i, 0][..., None], zoom)
        layer[layer < thr] = 0
        layer = _motion(np.clip(layer, 0, 1), radius, sigma, float(p["degrees"][i]))
        grey = x @ np.array([0.299, 0.587, 0.114])
        x = blend * x + (1 - blend) * np.maximum(x, grey[..., None] * 1.5 + 0.5)
        _check(out[i], x + layer + np.rot90(layer, k=2))


def _plasma(uniforms: list[np.ndarray], mapsize: int, decay: float) -> np.ndarray:
    """CIFAR-10-C's diamond-square, the draws taken from ``uniforms`` in the order they are needed."""
    m = np.zeros((mapsize, mapsize))
    step, wibble, draws = mapsize, 100.0, iter(uniforms)
    while step >= 2:
        s2 = step // 2
        corners = m[0::step, 0::step]
        sq = corners + np.roll(corners, -1, axis=0)
        sq += np.roll(sq, -1, axis=1)
        m[s2::step, s2::step] = sq / 4 + wibble * wibble * next(draws)
        dr, ul = m[s2::step, s2::step], m[0::step, 0::step]
        m[0::step, s2::step] = (dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)) / 4 + wibble**2 * next(draws)
        m[s2::step, 0::step] = (dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)) / 4 + wibble**2 * next(draws)
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / m.max()


@pytest.mark.parametrize("decay", [3.0, 2.5, 2.0, 1.75])
def test_plasma_fractal(decay: float) -> None:
    uniforms = plasma_uniforms(3, 32, torch.Generator().manual_seed(1), torch.zeros(0, dtype=torch.float64))
    ours = plasma_fractal(uniforms, 32, decay)
    for b in range(3):
        ref = _plasma([u[b].numpy() for u in uniforms], 32, decay)
        assert np.allclose(ours[b].numpy(), ref, atol=1e-12)
    assert ours.amin() == 0 and ours.amax() == 1


@pytest.mark.parametrize("severity", SEVERITIES)
def test_fog(severity: int, images: torch.Tensor) -> None:
    out, p = _draw("fog", images, severity)
    amount = [0.2, 0.5, 0.75, 1, 1.5][severity - 1]
    for i in range(len(images)):
        x = _hwc(images[i])
        peak = x.max()
        _check(out[i], (x + amount * p["plasma"][i, 0][..., None]) * peak / (peak + amount))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_frost(severity: int, images: torch.Tensor) -> None:
    out, p = _draw("frost", images, severity)
    a, b = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
    textures = frost_textures(32, 32, torch.device("cpu"), torch.float64).numpy()
    for i in range(len(images)):
        t, top, left = int(p["texture"][i]), int(p["top"][i]), int(p["left"][i])
        crop = textures[t][:, top:top + 32, left:left + 32].transpose(1, 2, 0)
        _check(out[i], a * _hwc(images[i]) + b * crop)


def test_frost_textures_are_deterministic_distinct_and_frost_like() -> None:
    t = frost_textures(32, 32, torch.device("cpu"), torch.float32)
    assert t.shape == (FROST_TEXTURES, 3, 128, 128) and t.min() >= 0 and t.max() <= 1
    from advpipe.eval.corruptions_textures import _frost_texture

    assert np.array_equal(_frost_texture(2, 128), t[2].numpy())  # rebuilt from its seed: the same pixels
    flat = t.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(FROST_TEXTURES) * 1e9).min() > 1.0  # five different textures
    for tex in t:
        assert 0.25 < tex.mean() < 0.65 and tex.std() > 0.1  # a bright, structured layer
        assert tex[2].mean() > tex[0].mean()  # bluish, like ice


# --------------------------------------------------------------------------- elastic transform


@pytest.mark.parametrize("severity", SEVERITIES)
def test_elastic_transform(severity: int, images: torch.Tensor) -> None:
    out, p = _draw("elastic-transform", images, severity)
    alpha, sigma, affine = (np.array([(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                                      (0.1, 0.03, 0.03)][severity - 1]) * 32)
    assert np.abs(p["jitter"]).max() <= affine
    pts1 = np.array([[26.0, 26.0], [26.0, 6.0], [6.0, 6.0]])  # centre 16 +- 32 // 3, as (x, y)
    ys, xs = np.mgrid[0:32, 0:32].astype(np.float64)
    for i in range(len(images)):
        pts2 = pts1 + p["jitter"][i]
        forward = np.linalg.solve(np.c_[pts1, np.ones(3)], pts2).T  # cv2.getAffineTransform
        inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))
        src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
        src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
        x = _hwc(images[i])
        # cv2.warpAffine(INTER_LINEAR, BORDER_REFLECT_101) = map_coordinates(order=1, mode="mirror")
        warped = np.stack([ndimage.map_coordinates(x[..., c], [src_y, src_x], order=1, mode="mirror")
                           for c in range(3)], -1)
        dx = _blur(p["dx"][i], sigma, mode="reflect", truncate=3) * alpha if sigma > 0 else 0 * p["dx"][i]
        dy = _blur(p["dy"][i], sigma, mode="reflect", truncate=3) * alpha if sigma > 0 else 0 * p["dy"][i]
        ref = np.stack([ndimage.map_coordinates(warped[..., c], [ys + dy, xs + dx], order=1, mode="reflect")
                        for c in range(3)], -1)
        _check(out[i], ref, atol=1e-6)


# --------------------------------------------------------------------------- spatter and its OpenCV pieces


def _canny(img: np.ndarray, low: int, high: int) -> np.ndarray:
    """OpenCV's Canny (aperture 3, L1 gradient) as per-pixel loops and a hysteresis stack."""
    h, w = img.shape
    p = np.pad(img.astype(np.int64), 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.abs(gx) + np.abs(gy)
    m_pad = np.pad(mag, 1)
    state = np.ones((h, w), dtype=int)  # 1 = no edge, 0 = weak candidate, 2 = edge
    stack = []
    for i in range(h):
        for j in range(w):
            m = mag[i, j]
            if m <= low:
                continue
            ax, ay = abs(int(gx[i, j])), abs(int(gy[i, j])) << 15
            tg22 = ax * 13573
            if ay < tg22:
                ok = m > m_pad[i + 1, j] and m >= m_pad[i + 1, j + 2]
            elif ay > tg22 + (ax << 16):
                ok = m > m_pad[i, j + 1] and m >= m_pad[i + 2, j + 1]
            else:
                s = -1 if (int(gx[i, j]) ^ int(gy[i, j])) < 0 else 1
                ok = m > m_pad[i, j + 1 - s] and m > m_pad[i + 2, j + 1 + s]
            if ok:
                state[i, j] = 2 if m > high else 0
                if m > high:
                    stack.append((i, j))
    while stack:
        i, j = stack.pop()
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                a, b = i + di, j + dj
                if 0 <= a < h and 0 <= b < w and state[a, b] == 0:
                    state[a, b] = 2
                    stack.append((a, b))
    return state == 2


def _chamfer(zero: np.ndarray) -> np.ndarray:
    """OpenCV's two-pass 5x5 chamfer distance transform (DIST_L2, mask 5: 1, 1.4, 2.1969)."""
    a, b, c = 1.0, 1.4, 2.1969
    forward = [(-2, -1, c), (-2, 1, c), (-1, -2, c), (-1, -1, b), (-1, 0, a), (-1, 1, b), (-1, 2, c), (0, -1, a)]
    h, w = zero.shape
    d = np.where(zero, 0.0, np.inf)
    for mask, rows, cols in ((forward, range(h), range(w)),
                             ([(-dy, -dx, wt) for dy, dx, wt in forward], range(h - 1, -1, -1), range(w - 1, -1, -1))):
        for i in rows:
            for j in cols:
                for dy, dx, wt in mask:
                    if 0 <= i + dy < h and 0 <= j + dx < w:
                        d[i, j] = min(d[i, j], d[i + dy, j + dx] + wt)
    return d


def _equalize(img: np.ndarray) -> np.ndarray:
    hist = np.bincount(img.astype(int).ravel(), minlength=256)
    first = int(np.nonzero(hist)[0][0])
    if hist[first] == img.size:
        return np.full_like(img, first)
    scale = np.float32(255.0 / (img.size - hist[first]))
    lut = np.zeros(256)
    total = 0
    for j in range(first + 1, 256):
        total += hist[j]
        lut[j] = np.round(np.float32(total) * scale)
    return lut[img.astype(int)]


def test_canny_finds_a_step_edge_and_matches_the_loop_version() -> None:
    step = np.zeros((16, 16))
    step[:, 8:] = 200
    edges = canny(torch.from_numpy(step)[None, None], 50, 150)[0, 0].numpy()
    assert edges[:, 7].all() ^ edges[:, 8].all() and edges.sum() == 16  # one column, on the step
    rng = np.random.default_rng(0)
    for _ in range(3):
        img = np.floor(ndimage.gaussian_filter(rng.uniform(0, 255, (32, 32)), 1.0))
        ours = canny(torch.from_numpy(img)[None, None], 50, 150)[0, 0].numpy()
        assert np.array_equal(ours, _canny(img, 50, 150))


def test_chamfer_distance_and_equalize_hist_match_the_loop_versions() -> None:
    rng = np.random.default_rng(1)
    zero = rng.uniform(size=(2, 32, 32)) < 0.01
    ours = chamfer_distance(torch.from_numpy(zero)[:, None], 20.0)[:, 0].numpy()
    for b in range(2):
        assert np.allclose(ours[b], np.minimum(_chamfer(zero[b]), 20.0), atol=1e-9)
    img = np.floor(rng.uniform(0, 21, (2, 32, 32)))
    ours = equalize_hist(torch.from_numpy(img)[:, None])[:, 0].numpy()
    for b in range(2):
        assert np.array_equal(ours[b], _equalize(img[b]))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_spatter(severity: int, images: torch.Tensor) -> None:
    out, p = _draw("spatter", images, severity)
    loc, scale, sigma, thr, intensity, mud = [
        (0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)][severity - 1]
    box = np.ones((3, 3))
    for i in range(len(images)):
        x = _hwc(images[i])
        liquid = _blur(p["liquid"][i, 0], sigma)
        liquid[liquid < thr] = 0
        if mud:
            m = _blur((liquid > thr).astype(np.float64), intensity)
            m[m < 0.8] = 0
            ref = x * (1 - m[..., None]) + np.array([63, 42, 20]) / 255 * m[..., None]
        else:
            layer = np.floor(np.clip(liquid * 255, 0, 255))
            dist = np.minimum(_chamfer(_canny(layer, 50, 150)), 20.0)
            dist = np.floor(ndimage.correlate(dist, box, mode="mirror") / 9 + 1e-9)
            dist = _equalize(dist)
            dist = np.clip(ndimage.correlate(dist, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2.0]]), mode="mirror"),
                           0, 255)
            dist = np.round(ndimage.correlate(dist, box / 9, mode="mirror"))
            m = layer * dist
            m = m / m.max() * intensity if m.max() > 0 else m
            ref = x + m[..., None] * np.array([175, 238, 238]) / 255
        _check(out[i], ref, atol=1e-6)
