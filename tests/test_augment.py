"""Augmentation kernels: AdvMask's square sampler against its rules and a per-image reference, the
occlusion baselines, the point sources and the schedules. The conformance suite that every registered
augmentation passes is tests/test_augment_conformance.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import advpipe.augment  # noqa: F401  (registers every augmentation)
from advpipe.augment.advmask import (DEFAULT_MAX_CANDIDATES, SquareMasks, advmask_defaults, apply_squares,
                                     sample_squares, square_boxes, squares_to_keep)
from advpipe.augment.base import AugmentContext, build_augment
from advpipe.augment.occlusion import (boxes_keep, cutout_size, gridmask_defaults, gridmask_keep, hide_and_seek_keep,
                                       sample_cutout, sample_gridmask, sample_hide_and_seek, sample_random_erasing)
from advpipe.augment.points import harris_points, random_points
from advpipe.data.datasets import DatasetSplit
from advpipe.data.loader import DeviceLoader
from advpipe.errors import AdvpipeError

MEAN = (0.4914, 0.4822, 0.4465)
CIFAR = dict(l_range=(2, 15), p_range=(0.2, 0.4), o_max=0.1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blob_masks(n: int, seed: int, h: int = 32, w: int = 32, points: int = 100) -> torch.Tensor:
    """Attack-mask-like point sets: 2-4 Gaussian clusters plus 20% uniform points, up to ``points`` each."""
    g = gen(seed)
    k = 4
    centres = 4 + torch.rand(n, k, 2, generator=g) * torch.tensor([h - 8, w - 8])
    spread = 2 + 4 * torch.rand(n, k, 1, generator=g)
    which = torch.randint(0, k, (n, 2 * points), generator=g)[..., None]
    yx = centres.gather(1, which.expand(-1, -1, 2)) + spread.gather(1, which) * torch.randn(n, 2 * points, 2,
                                                                                            generator=g)
    uniform = torch.rand(n, 2 * points, 1, generator=g) < 0.2
    yx = torch.where(uniform, torch.rand(n, 2 * points, 2, generator=g) * torch.tensor([h, w]), yx).floor().long()
    inside = ((yx >= 0) & (yx < torch.tensor([h, w]))).all(-1)
    flat = (yx[..., 0].clamp(0, h - 1) * w + yx[..., 1].clamp(0, w - 1))
    masks = torch.zeros(n, h * w, dtype=torch.bool).scatter_(1, flat, inside)
    keys = torch.rand(n, h * w, generator=g).masked_fill_(~masks, 2.0)
    keep = torch.zeros_like(masks).scatter_(1, keys.argsort(1)[:, :points], True)
    return (masks & keep).view(n, h, w)


def mixed_masks() -> torch.Tensor:
    """A CPU batch mixing empty, single-point, sparse, clustered and full masks."""
    masks = torch.zeros(8, 32, 32, dtype=torch.bool)
    masks[1, 16, 16] = True  # one point cannot reach p_min
    masks[2:6] = blob_masks(4, seed=3)
    masks[6] = torch.rand(32, 32, generator=gen(1)) < 0.03
    masks[7] = True
    return masks


# ------------------------------------------------------------------------------- AdvMask square rules


def overlap(a: torch.Tensor, b: torch.Tensor) -> int:
    return max(0, int(min(a[2], b[2]) - max(a[0], b[0]))) * max(0, int(min(a[3], b[3]) - max(a[1], b[1])))


def check_rules(masks: torch.Tensor, out: SquareMasks, l_range, p_range, fallback: str) -> None:
    """Every rule of the sampler, recomputed from the returned squares."""
    b, h, w = masks.shape
    hw = h * w
    assert out.keep.shape == (b, h, w) and out.keep.dtype == torch.bool
    assert out.squares.dtype == torch.long and out.squares.shape[:2] == out.valid.shape
    assert ((out.p >= p_range[0]) & (out.p <= p_range[1])).all()
    frac = (~out.keep).flatten(1).float().mean(1)
    assert (frac <= p_range[1] + 1e-9).all()
    boxes = square_boxes(out.squares, h, w)
    for i in range(b):
        sq, bx = out.squares[i][out.valid[i]], boxes[i][out.valid[i]]
        if fallback != "random" or not out.fallback_used[i]:
            # squares sit on the image's own points (fallback images may use any pixel)
            assert all(masks[i, r, c] for r, c in sq[:, :2].tolist())
        assert ((sq[:, 2] >= l_range[0]) & (sq[:, 2] <= l_range[1])).all()
        area = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1])
        for a in range(len(bx)):
            for c in range(a):
                assert overlap(bx[a], bx[c]) <= float(out.o[i]) * min(int(area[a]), int(area[c])) + 1e-4
        if len(sq):
            # the loop stops as soon as the target is reached, so all but the last square fall short of it
            before = squares_to_keep(out.squares[i:i + 1, : len(sq) - 1], out.valid[i:i + 1, : len(sq) - 1], h, w)
            assert int((~before).sum()) < math.ceil(float(out.p[i]) * hw - 1e-6)
        if not out.fallback_used[i]:
            assert frac[i] >= p_range[0] - 1e-9
    if fallback == "random":
        assert torch.equal(out.keep, squares_to_keep(out.squares, out.valid, h, w))


def test_square_rules_on_mixed_cpu_batch():
    masks = mixed_masks()
    out = sample_squares(masks, generator=gen(0), **CIFAR)
    check_rules(masks, out, (2, 15), (0.2, 0.4), "random")
    assert out.fallback_used.tolist()[:2] == [True, True]  # no point / one point
    assert not out.fallback_used[2:].any()
    assert (out.valid.sum(1) > 0).all()


@pytest.mark.parametrize("settings", [dict(l_range=(5, 20), p_range=(0.06, 0.5), o_max=0.2),
                                      dict(l_range=(1, 3), p_range=(0.05, 0.1), o_max=0.0),
                                      dict(l_range=(10, 40), p_range=(0.3, 0.3), o_max=1.0)])
def test_square_rules_other_settings(settings):
    masks = torch.cat([blob_masks(6, seed=4, h=40, w=24), torch.zeros(1, 40, 24, dtype=torch.bool)])
    out = sample_squares(masks, generator=gen(1), max_candidates=32, **settings)
    check_rules(masks, out, settings["l_range"], settings["p_range"], "random")


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_kernel_equals_the_plain_sequential_scan_exactly(backend):
    """Replaying the generator's draws, each backend accepts exactly the squares a plain
    candidate-by-candidate scan over the Fisher-Yates visiting order accepts, in the same order."""
    masks = blob_masks(60, seed=21)
    k, (l_min, l_max), (p_min, p_max) = 48, (2, 15), (0.2, 0.4)
    out = sample_squares(masks, (l_min, l_max), (p_min, p_max), 0.1, gen(5), max_candidates=k, backend=backend)
    replay = gen(5)
    torch.rand(60, 2, generator=replay)  # p and o
    width = min(k, int(masks.flatten(1).sum(1).max()))
    draws = torch.rand(2, 60, width, generator=replay)  # the shuffle's uniforms, then the sides'
    sides = (draws[1] * (l_max - l_min + 1)).long().clamp(max=l_max - l_min) + l_min
    hw = 32 * 32
    checked = 0
    for i in range(60):
        if out.fallback_used[i]:
            continue
        points = masks[i].flatten().nonzero().squeeze(1).tolist()
        target, t_max, o = math.ceil(float(out.p[i]) * hw - 1e-6), math.floor(p_max * hw + 1e-6), float(out.o[i])
        cover, accepted = torch.zeros(32, 32, dtype=torch.bool), []  # accepted: (square, box, area)
        for j in range(min(width, len(points))):
            swap = min(j + math.floor(float(draws[0, i, j] * (len(points) - j))), len(points) - 1)
            points[j], points[swap] = points[swap], points[j]
            pix = points[j]
            square = torch.tensor([pix // 32, pix % 32, int(sides[i, j])])
            box = square_boxes(square, 32, 32)
            area = int((box[2] - box[0]) * (box[3] - box[1]))
            # integer overlaps: "<= o * min(area)" is "<= floor(o * min(area))"
            if any(overlap(box, b2) > math.floor(o * min(area, a2)) for _, b2, a2 in accepted):
                continue
            grown = cover.clone()
            grown[box[0]:box[2], box[1]:box[3]] = True
            if int(grown.sum()) > t_max:
                continue
            cover = grown
            accepted.append((square, box, area))
            if int(cover.sum()) >= target:
                break
        ours = out.squares[i][out.valid[i]]
        assert torch.equal(ours, torch.stack([a[0] for a in accepted]) if accepted else ours[:0]), i
        assert torch.equal(~cover, out.keep[i])
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("fallback", ["random", "skip", "gridmask"])
@pytest.mark.parametrize("settings", [CIFAR, dict(l_range=(5, 20), p_range=(0.06, 0.5), o_max=0.2),
                                      dict(l_range=(1, 3), p_range=(0.0, 1.0), o_max=1.0)])
def test_numba_and_torch_backends_agree_exactly(fallback, settings):
    """The compiled CPU scan and the batched torch rounds consume the same draws: identical outputs."""
    masks = torch.cat([mixed_masks(), blob_masks(24, seed=9), torch.rand(8, 32, 32, generator=gen(2)) < 0.3])
    a = sample_squares(masks, generator=gen(11), fallback=fallback, backend="torch", **settings)
    b = sample_squares(masks, generator=gen(11), fallback=fallback, backend="numba", **settings)
    for field in ("keep", "squares", "valid", "fallback_used", "p", "o"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    # the keep mask is exactly what the small parameters describe (the squares, and the fallback grid)
    keep = squares_to_keep(b.squares, b.valid, 32, 32)
    assert torch.equal(b.keep, keep & gridmask_keep(b.grid, 32, 32) if fallback == "gridmask" else keep)
    assert (b.grid is not None) == (fallback == "gridmask")


def test_squares_to_keep_paints_clipped_squares():
    squares = torch.tensor([[[0, 0, 4], [10, 9, 3], [31, 31, 5]]])
    keep = squares_to_keep(squares, torch.tensor([[True, True, False]]), 32, 32)
    expected = torch.ones(32, 32, dtype=torch.bool)
    expected[0:2, 0:2] = False  # side 4 on (0,0): rows/cols -2..1, clipped
    expected[9:12, 8:11] = False  # odd side: centred
    assert torch.equal(keep[0], expected)
    # even side: the point is the lower-right pixel of the central 2x2 block
    assert square_boxes(torch.tensor([10, 10, 4]), 32, 32).tolist() == [8, 8, 12, 12]


def test_same_seed_same_squares_other_seed_differs():
    masks = blob_masks(16, seed=5)
    a, b = (sample_squares(masks, generator=gen(7), **CIFAR) for _ in range(2))
    c = sample_squares(masks, generator=gen(8), **CIFAR)
    for field in ("keep", "squares", "valid", "fallback_used", "p", "o"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.keep, c.keep)


def test_fallback_modes():
    masks = mixed_masks()
    skip = sample_squares(masks, generator=gen(2), fallback="skip", **CIFAR)
    assert skip.keep[:2].all() and not skip.valid[:2].any()
    check_rules(masks, skip, (2, 15), (0.2, 0.4), "skip")
    grid = sample_squares(masks, generator=gen(2), fallback="gridmask", **CIFAR)
    assert not grid.valid[:2].any()
    removed = (~grid.keep[:2]).flatten(1).float().mean(1)
    assert ((removed > 0.1) & (removed < 0.6)).all()  # GridMask ratio 0.4 removes about 1-(1-0.4)^2 of the unit
    # images that did not fall back are identical across fallback modes given the same generator
    assert torch.equal(grid.keep[2:], skip.keep[2:])
    with pytest.raises(AdvpipeError):
        sample_squares(masks, generator=gen(2), fallback="nope", **CIFAR)


def test_candidate_cap_bounds_the_candidates():
    masks = torch.ones(4, 32, 32, dtype=torch.bool)
    out = sample_squares(masks, (2, 2), (0.9, 0.9), 0.0, gen(3), max_candidates=10)
    # ten 2x2 squares at most, far from the 0.9 target, so every image falls back (and stays short)
    assert (out.valid.sum(1) <= 10).all() and out.fallback_used.all()


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_empty_batch_and_bad_parameters(backend):
    out = sample_squares(torch.zeros(0, 32, 32, dtype=torch.bool), generator=gen(0), backend=backend, **CIFAR)
    assert out.keep.shape == (0, 32, 32) and out.squares.shape[0] == 0
    with pytest.raises(AdvpipeError, match="backend"):
        sample_squares(mixed_masks(), generator=gen(0), backend="fortran", **CIFAR)
    for bad in (dict(l_range=(0, 3)), dict(l_range=(5, 3)), dict(p_range=(0.5, 0.2)), dict(o_max=1.5),
                dict(l_range=(2.5, 4))):
        with pytest.raises(AdvpipeError):
            sample_squares(mixed_masks(), generator=gen(0), **{**CIFAR, **bad})


def test_apply_squares_fills_mean_and_keeps_the_rest():
    images = torch.rand(8, 3, 32, 32, generator=gen(4))
    out = sample_squares(mixed_masks(), generator=gen(4), **CIFAR)
    result = apply_squares(images, out, MEAN)
    hidden = ~out.keep[:, None].expand_as(images)
    assert torch.equal(result[~hidden], images[~hidden])
    assert torch.allclose(result.permute(1, 0, 2, 3)[hidden.permute(1, 0, 2, 3)].view(3, -1),
                          torch.tensor(MEAN)[:, None].expand(3, int(hidden[:, 0].sum())))


# --------------------------------------------------------------- distributional agreement with a reference


def reference_squares(mask: np.ndarray, l_range, p_range, o_max: float, k_max: int,
                      rng: np.random.Generator) -> tuple[float, int]:
    """The rules of Sec. III-B as a plain per-image loop; returns (masked fraction, accepted squares)."""
    h, w = mask.shape
    p, o = rng.uniform(*p_range), rng.uniform(0, o_max)
    t_max, target = math.floor(p_range[1] * h * w + 1e-6), math.ceil(p * h * w - 1e-6)

    def run(points: np.ndarray) -> tuple[np.ndarray, list]:
        cover, accepted, covered = np.zeros((h, w), bool), [], 0
        for r, c in points[rng.permutation(len(points))[:k_max]]:
            if covered >= target:
                break
            side = rng.integers(l_range[0], l_range[1] + 1)
            y0, x0 = r - side // 2, c - side // 2
            box = (max(y0, 0), max(x0, 0), min(y0 + side, h), min(x0 + side, w))
            area = (box[2] - box[0]) * (box[3] - box[1])
            inters = [max(0, min(box[2], a[2]) - max(box[0], a[0])) * max(0, min(box[3], a[3]) - max(box[1], a[1]))
                      for a in accepted]
            if any(i > o * min(area, a[4]) for i, a in zip(inters, accepted)):
                continue
            new = area - int(cover[box[0]:box[2], box[1]:box[3]].sum())
            if covered + new > t_max:
                continue
            covered += new
            cover[box[0]:box[2], box[1]:box[3]] = True
            accepted.append((*box, area))
        return cover, accepted

    points = np.argwhere(mask)
    cover, accepted = run(points)
    if len(points) == 0 or cover.sum() < math.ceil(p_range[0] * h * w - 1e-6):
        cover, accepted = run(np.argwhere(np.ones_like(mask)))
    return float(cover.mean()), len(accepted)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance between the empirical distributions of a and b."""
    grid = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


@pytest.mark.parametrize("k_max,n", [(64, 800), (12, 600)])
def test_matches_per_image_reference_in_distribution(k_max, n):
    masks = blob_masks(n, seed=10 + k_max)
    masks[:30] = False  # some images go through the random fallback
    out = sample_squares(masks, generator=gen(k_max), max_candidates=k_max, **CIFAR)
    ours_frac = out.masked_fraction().numpy()
    ours_count = out.valid.sum(1).numpy()
    rng = np.random.default_rng(k_max)
    ref = np.array([reference_squares(m, (2, 15), (0.2, 0.4), 0.1, k_max, rng) for m in masks.numpy()])
    # the 0.1% critical two-sample KS distance is 1.95 * sqrt(2 / n): 0.098 for 800, 0.113 for 600
    critical = 1.95 * math.sqrt(2 / n)
    assert ks_statistic(ours_frac, ref[:, 0]) < critical
    assert ks_statistic(ours_count, ref[:, 1]) < critical
    assert abs(ours_frac.mean() - ref[:, 0].mean()) < 4 * ref[:, 0].std() * math.sqrt(2 / n)


# ------------------------------------------------------------------------------------- occlusion kernels


def test_cutout_square_size_and_clipping():
    params = sample_cutout(500, 32, 32, 16, generator=gen(0))
    boxes = params["boxes"]
    sides = boxes[:, 2:] - boxes[:, :2]
    assert ((sides >= 8) & (sides <= 16)).all() and (sides == 16).all(1).any()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 32).all()
    assert len({tuple(b) for b in boxes.tolist()}) > 100  # a separate square per image
    keep = boxes_keep(boxes, 32, 32)
    assert torch.equal((~keep).flatten(1).sum(1), sides.prod(1))
    assert (cutout_size("cifar10", (32, 32)), cutout_size("cifar100", (32, 32)), cutout_size("folder", (64, 64))) == \
        (16, 8, 32)


def test_random_erasing_follows_zhong_et_al():
    params = sample_random_erasing(2000, 32, 32, generator=gen(1))
    boxes, erase = params["boxes"], params["erase"]
    assert abs(erase.float().mean().item() - 0.5) < 0.05
    h, w = (boxes[:, 2] - boxes[:, 0]).float(), (boxes[:, 3] - boxes[:, 1]).float()
    e = erase
    assert ((h[e] < 32) & (w[e] < 32) & (boxes[e, :2] >= 0).all(1) & (boxes[e, 2:] <= 32).all(1)).all()
    area = h[e] * w[e] / 1024
    assert area.min() > 0.01 and area.max() < 0.45  # 0.02-0.4 up to rounding of h and w
    assert ((h[e] / w[e]) > 0.2).all() and ((h[e] / w[e]) < 5).all()
    assert len({tuple(b) for b in boxes[e].tolist()}) > 500
    images = torch.rand(4, 3, 32, 32, generator=gen(2))
    aug = build_augment("random-erasing", AugmentContext("cifar10", (32, 32), 10, MEAN), prob=1.0)
    p = aug.sample(images, generator=gen(3))
    out = aug.apply(images, p)
    inside = ~boxes_keep(p["boxes"], 32, 32)[:, None].expand_as(images)
    assert torch.equal(out[inside], p["fill"][inside]) and torch.equal(out[~inside], images[~inside])
    # fill="mean" draws no noise: the parameters stay small and the generator moves on less
    mean = build_augment("random-erasing", AugmentContext("cifar10", (32, 32), 10, MEAN), prob=1.0, fill="mean")
    g_mean, g_noise = gen(3), gen(3)
    q = mean.sample(images, generator=g_mean)
    aug.sample(images, generator=g_noise)
    assert set(q) == {"boxes", "erase"} and torch.equal(q["boxes"], p["boxes"])
    assert not torch.equal(g_mean.get_state(), g_noise.get_state())
    assert torch.equal(mean.apply(images, q)[inside], torch.tensor(MEAN)[None, :, None, None].expand_as(images)[inside])


def test_hide_and_seek_hides_whole_patches():
    params = sample_hide_and_seek(400, 32, 32, (0, 4, 8, 16), 0.5, generator=gen(4))
    keep = hide_and_seek_keep(params, 32, 32)
    for i in range(40):
        s = int(params["size"][i])
        if s == 0:
            assert keep[i].all()
            continue
        patches = keep[i].view(32 // s, s, 32 // s, s)
        assert (patches.all(3).all(1) | (~patches).all(3).all(1)).all()  # each patch all kept or all hidden
    sizes = params["size"].tolist()
    assert set(sizes) == {0, 4, 8, 16}
    hidden = (~keep[params["size"] > 0]).float().mean()
    assert abs(hidden.item() - 0.5) < 0.05


def test_gridmask_pattern_and_schedule():
    d = gridmask_defaults(32, 32)
    assert d == {"d_range": (24, 32), "ratio": 0.4, "rotate": 1}
    params = sample_gridmask(300, 32, 32, **d, generator=gen(5))
    keep = gridmask_keep(params, 32, 32)
    for i in range(20):
        dd, band = int(params["d"][i]), int(0.4 * int(params["d"][i]) + 0.5)
        oy, ox = params["offset"][i].tolist()
        rows = (torch.arange(32) - oy) % dd >= band
        cols = (torch.arange(32) - ox) % dd >= band
        assert torch.equal(keep[i], ~(rows[:, None] & cols[None, :]))
    rotated = gridmask_keep(sample_gridmask(50, 32, 32, d_range=(8, 12), ratio=0.5, rotate=360, generator=gen(6)),
                            32, 32)
    assert 0.15 < (~rotated).float().mean() < 0.35  # about (1-0.5)^2 removed whatever the angle
    aug = build_augment("gridmask", AugmentContext("cifar10", (32, 32), 10, MEAN, epochs=10))
    probs = []
    for e in range(10):
        aug.set_epoch(e, 10)
        probs.append(aug.prob)
    assert probs == pytest.approx([0.08 * (e + 1) for e in range(10)])


# --------------------------------------------------------------------------------------- point sources


def test_random_points_are_distinct_and_counted():
    pts = random_points(50, 32, 32, 100, generator=gen(7))
    assert (pts.flatten(1).sum(1) == 100).all()
    assert random_points(2, 4, 4, 20, generator=gen(7)).all()


def test_harris_points_find_the_corners_of_a_square():
    images = torch.zeros(2, 3, 32, 32)
    images[:, :, 8:24, 10:20] = 1.0
    pts = harris_points(images, 4)
    ys, xs = pts[0].nonzero().T.tolist()
    assert len(ys) == 4
    for y, x in zip(ys, xs):  # each detection within a pixel of one of the four corners
        assert min(abs(y - cy) + abs(x - cx) for cy in (8, 23) for cx in (10, 19)) <= 2
    assert not harris_points(torch.full((1, 3, 32, 32), 0.5), 10).any()  # flat image: no corners


def test_cp_corners_are_found_before_the_crop_and_follow_it():
    """The loader's black padding has strong corners of its own; CP must only see the image's (a bright square)."""
    n = 32
    images = torch.full((n, 3, 32, 32), 128, dtype=torch.uint8)
    images[:, :, 12:20, 10:18] = 230
    ds = DatasetSplit("synthetic", "train", torch.zeros(n, dtype=torch.long), ["a", "b"], MEAN, (0.25,) * 3,
                      (3, 32, 32), images=images)
    aug = build("advmask-cp")
    assert set(aug.own_side) == {"corner_mask"}
    batch = next(iter(DeviceLoader(ds, batch_size=n, seed=0, pad=4, flip=True, side=aug.own_side, workers=0)))
    points = aug.point_masks(batch.images, batch.side, torch.arange(n), gen(0))
    assert torch.equal(points, batch.side["corner_mask"])
    padding = (batch.images == 0).all(1)  # the image itself has no black pixel
    near_padding = torch.nn.functional.max_pool2d(padding[:, None].float(), 5, 1, 2)[:, 0] > 0  # within 2 px
    assert near_padding.any(2).any(1).float().mean() > 0.5  # most crops show some padding
    old = harris_points(batch.images, aug.num_points)  # corners of the cropped image: the old behaviour
    assert (old & near_padding).any()
    assert not (points & near_padding).any()
    for i in range(n):  # every corner sits on a corner of the square, wherever the crop and flip put it
        rows, cols = (batch.images[i, 0] > 0.85).nonzero().T
        corners = [(r, c) for r in (rows.min(), rows.max()) for c in (cols.min(), cols.max())]
        ys, xs = points[i].nonzero().T.tolist()
        assert len(ys) >= 4
        assert all(min(abs(y - r) + abs(x - c) for r, c in corners) <= 2 for y, x in zip(ys, xs))


# ---------------------------------------------------------------------- registered augmentations
# ---------------------------------------------------------------------- registered augmentations


def make_batch(n: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Images and their side data (``attack_mask``)."""
    images = torch.rand(n, 3, 32, 32, generator=gen(seed)).to(dtype)
    masks = blob_masks(n, seed=seed) if n else torch.zeros(0, 32, 32, dtype=torch.bool)
    return images, {"attack_mask": masks}


def build(name: str, epochs: int = 4) -> object:
    aug = build_augment(name, AugmentContext("cifar10", (32, 32), 10, MEAN, epochs=epochs))
    aug.set_epoch(epochs - 1, epochs)
    return aug


def test_advmask_needs_attack_masks():
    aug = build("advmask")
    assert aug.needs_side == ("attack_mask",)
    images, _ = make_batch(4)
    with pytest.raises(AdvpipeError, match="needs attack masks"):
        aug(images, generator=gen(0))
    with pytest.raises(AdvpipeError, match="attack masks have shape"):
        aug(images, attack_masks=torch.zeros(4, 16, 16, dtype=torch.bool), generator=gen(0))
    assert build("advmask-rp").needs_side == () and build("aapm").needs_side == ("attack_mask",)


def test_advmask_defaults_by_dataset():
    assert advmask_defaults("cifar10", (32, 32)) == ((2, 15), (0.2, 0.4), 0.1)
    assert advmask_defaults("synthetic", (32, 32)) == ((2, 15), (0.2, 0.4), 0.1)
    assert advmask_defaults("cifar100", (32, 32)) == ((5, 20), (0.06, 0.5), 0.2)
    assert advmask_defaults("folder", (64, 64)) == ((4, 30), (0.2, 0.4), 0.1)


def test_advmask_incremental_schedule():
    epochs, b = 5, 10
    images, side = make_batch(b, seed=1)
    g = gen(13)
    # the schedule is shared by AdvMask and its ablations; AAPM makes the many draws cheap
    aug = build_augment("aapm", AugmentContext("cifar10", (32, 32), 10, MEAN, epochs=epochs), prob_max=0.8,
                        warmup_epochs=4)
    for e in range(epochs):
        aug.set_epoch(e, epochs)
        want = 0.8 * min(1.0, (e + 1) / 4)
        counts = [int(aug.sample(images, side=side, generator=g)["selected"].sum()) for _ in range(100)]
        assert set(counts) <= {math.floor(want * b), math.ceil(want * b)}  # exact per batch, up to rounding
        assert aug.epoch_metrics()["fraction_augmented"] == 0.0  # sampling alone gathers no statistics
        for _ in range(100):
            aug(images, side=side, generator=g)  # a call does
        assert aug.epoch_metrics()["fraction_augmented"] == pytest.approx(want, abs=0.03)
        assert aug.epoch_metrics()["fraction_augmented"] == 0.0  # reset
    adv = build_augment("advmask", AugmentContext("cifar10", (32, 32), 10, MEAN, epochs=epochs), prob_max=0.8)
    adv.set_epoch(epochs - 1, epochs)
    params = [adv.sample(images, side=side, generator=g) for _ in range(4)]
    for p in params:
        adv(images, side=side, generator=g)
        keep = adv.keep(p, 32, 32)
        assert keep[~p["selected"]].all() and not p["valid"][~p["selected"]].any()
        assert not keep[p["selected"]].all(2).all(1).any()
        assert p["squares"].shape[:2] == p["valid"].shape and p["squares"].shape[1] <= DEFAULT_MAX_CANDIDATES
    metrics = adv.epoch_metrics()
    assert metrics["fraction_augmented"] == pytest.approx(0.8)
    assert 0.2 <= metrics["mean_masked_ratio"] <= 0.4 and metrics["fallback_rate"] < 0.2


def test_aapm_occludes_exactly_the_attack_points():
    aug = build_augment("aapm", AugmentContext("cifar10", (32, 32), 10, MEAN), prob_max=1.0)
    images, side = make_batch(6)
    params = aug.sample(images, side=side, generator=gen(0))
    assert params["selected"].all() and torch.equal(aug.keep(params, 32, 32), ~side["attack_mask"])


def test_box_extent_is_the_one_rasterizer_of_end_exclusive_boxes():
    from advpipe.augment.base import box_extent

    boxes = torch.tensor([[1, 2, 3, 5], [0, 0, 0, 4]])  # (row0, col0, row1, col1); the second is empty
    in_r, in_c = box_extent(boxes, 4, 6)
    covered = in_r[:, :, None] & in_c[:, None, :]
    expected = torch.zeros(2, 4, 6, dtype=torch.bool)
    expected[0, 1:3, 2:5] = True
    assert torch.equal(covered, expected)


@pytest.mark.parametrize("name, options", [
    ("advmask", {"prob_max": 1.0}), ("advmask", {"prob_max": 1.0, "fallback": "gridmask"}),
    ("advmask-rp", {"prob_max": 1.0}), ("advmask-cp", {"prob_max": 1.0}), ("cutout", {}), ("hide-and-seek", {}),
    ("gridmask", {})])
def test_parameters_are_small_not_image_sized_masks(name, options):
    """Boxes, patch bits, grid offsets and square lists: no (B,H,W) mask travels from sample to apply."""
    aug = build_augment(name, AugmentContext("cifar10", (32, 32), 10, MEAN), **options)
    images, side = make_batch(16)
    params = aug.sample(images, side=side, generator=gen(0))
    assert max(value[0].numel() for value in params.values()) < 32 * 32 // 4, {k: v.shape for k, v in params.items()}
    # a call is exactly: sample, then occlude with the keep mask those parameters describe
    out = aug(images, side=side, generator=gen(0))
    assert torch.equal(out, apply_squares(images, aug.keep(params, 32, 32), MEAN))
