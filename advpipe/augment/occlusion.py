"""Information-deletion baselines of the AdvMask paper's Table I, batched with per-sample parameters.

- ``cutout``: DeVries & Taylor, "Improved Regularization of CNNs with Cutout", arXiv:1708.04552.
- ``random-erasing``: Zhong et al., "Random Erasing Data Augmentation", AAAI 2020 (Alg. 1).
- ``hide-and-seek``: Singh & Lee, "Hide-and-Seek", ICCV 2017.
- ``gridmask``: Chen et al., "GridMask Data Augmentation", arXiv:2001.04086.

Each kernel is a ``sample_*`` function that draws every image's own small parameters (boxes, patch
bits, grid offsets) on the device with an explicit generator, plus a pure function turning those
parameters into a keep mask (or, for random erasing, into the erased images). Each class is both the
``--aug`` augmentation and the public object (``advpipe.Cutout()``...). Occluded pixels take the
dataset mean, which is zero after the model's normalization, as in the reference implementations
that occlude normalized tensors.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from advpipe.augment.base import AUGMENTS, InputAugment, Occlusion, box_extent
from advpipe.errors import AdvpipeError
from advpipe.rng import generator_for

#: datasets whose 32x32 defaults are the CIFAR-100 settings; every other dataset uses CIFAR-10's
_CIFAR100 = ("cifar100",)


def dataset_scale(image_size: Sequence[int]) -> float:
    """Factor from 32x32 CIFAR pixel sizes to an (H, W) image size (shorter side / 32)."""
    return min(image_size) / 32.0


def scaled(value: float, scale: float, minimum: int = 1) -> int:
    """Round a CIFAR pixel size to another image size, never below ``minimum``."""
    return max(minimum, int(round(value * scale)))


def boxes_keep(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Return the (B,H,W) keep mask that is False inside each image's (row0, col0, row1, col1) box."""
    in_r, in_c = box_extent(boxes, height, width)
    return ~(in_r[:, :, None] & in_c[:, None, :])


def _uniform_int(low: torch.Tensor | int, high: torch.Tensor | int, shape: tuple[int, ...],
                 generator: torch.Generator | None, device: torch.device | str | None) -> torch.Tensor:
    """Integers uniform on [low, high] (inclusive, per element when tensors), as long."""
    u = torch.rand(shape, generator=generator, device=device)
    span = torch.as_tensor(high, device=u.device) - torch.as_tensor(low, device=u.device) + 1
    return (torch.as_tensor(low, device=u.device) + (u * span).floor().long().clamp(max=span - 1)).long()


# ---------------------------------------------------------------------------------------------- cutout


def sample_cutout(batch_size: int, height: int, width: int, size: int, *, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Draw one ``size`` x ``size`` square per image, centre uniform over the image, clipped (Cutout Sec. 3).

    Returns ``boxes`` (B,4) long (row0, col0, row1, col1), end-exclusive; the square covers
    ``centre - size//2 .. centre - size//2 + size - 1`` before clipping.
    """
    generator = generator_for(device, generator)
    centre = _uniform_int(0, torch.tensor([height - 1, width - 1]), (batch_size, 2), generator, device)
    start = centre - size // 2
    lim = torch.tensor([height, width], device=centre.device)
    lo = torch.minimum(start.clamp(min=0), lim)
    hi = torch.minimum((start + size).clamp(min=0), lim)
    return {"boxes": torch.cat([lo, hi], 1)}


class Cutout(Occlusion):
    """Cutout (DeVries & Taylor 2017): one ``size`` x ``size`` square per image at a uniform centre, clipped.

    ``size`` defaults to 16 on CIFAR-10, 8 on CIFAR-100, scaled to ``image_size`` (see :func:`cutout_size`).
    """

    def __init__(self, size: int | None = None, **common: Any) -> None:
        super().__init__(**common)
        self.size = cutout_size(self.dataset, self.image_size) if size is None else int(size)
        if self.size < 1:
            raise AdvpipeError(f"cutout: size must be >= 1, got {size}")

    def make_params(self, images: torch.Tensor, side: Mapping[str, torch.Tensor],
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw each image's square: ``boxes`` (B,4)."""
        b, _, h, w = images.shape
        return sample_cutout(b, h, w, self.size, generator=generator, device=images.device)

    def keep(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """False inside each image's square."""
        return boxes_keep(params["boxes"], height, width)


def cutout_size(dataset: str, image_size: Sequence[int]) -> int:
    """Default Cutout side: 16 on CIFAR-10-like data, 8 on CIFAR-100, scaled to the (H, W) image size."""
    return scaled(8 if dataset in _CIFAR100 else 16, dataset_scale(image_size))


AUGMENTS.register("cutout", Cutout)


# -------------------------------------------------------------------------------------- random erasing


def sample_random_erasing(batch_size: int, height: int, width: int, *, prob: float = 0.5,
                          area: Sequence[float] = (0.02, 0.4), aspect: Sequence[float] = (0.3, 1 / 0.3),
                          attempts: int = 10, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Draw Random Erasing rectangles (Zhong et al., Alg. 1), a separate one per image.

    With probability ``prob`` an image is erased: target area ``S_e ~ U[area]`` times the image
    area, aspect ``r_e ~ U[aspect]``, ``h = round(sqrt(S_e r_e))``, ``w = round(sqrt(S_e / r_e))``;
    the rectangle must fit strictly inside the image (``h < H``, ``w < W``, as in the reference
    code). Instead of their open-ended retry loop every image gets ``attempts`` vectorized draws and
    keeps its first that fits; images with none skip erasing. The top-left corner is uniform over
    the valid positions. Returns ``boxes`` (B,4) and ``erase`` (B,) bool.
    """
    generator = generator_for(device, generator)
    u = torch.rand(batch_size, attempts, 2, generator=generator, device=device)
    target = (area[0] + (area[1] - area[0]) * u[..., 0]) * (height * width)
    ratio = aspect[0] + (aspect[1] - aspect[0]) * u[..., 1]
    hs = torch.sqrt(target * ratio).round().long()
    ws = torch.sqrt(target / ratio).round().long()
    fits = (hs < height) & (ws < width) & (hs > 0) & (ws > 0)
    first = fits.to(torch.uint8).argmax(1)  # argmax, not max(dim), which spawns threads on tiny inputs
    found = fits.gather(1, first[:, None]).squeeze(1)
    h = hs.gather(1, first[:, None]).squeeze(1)
    w = ws.gather(1, first[:, None]).squeeze(1)
    top = _uniform_int(0, (height - h).clamp(min=0), (batch_size,), generator, device)
    left = _uniform_int(0, (width - w).clamp(min=0), (batch_size,), generator, device)
    erase = found & (torch.rand(batch_size, generator=generator, device=device) < prob)
    return {"boxes": torch.stack([top, left, top + h, left + w], 1), "erase": erase}


class RandomErasing(InputAugment):
    """Random Erasing (Zhong et al., AAAI 2020, Alg. 1): with probability ``prob`` one random rectangle per image.

    Target area ``U[area]`` of the image, aspect ``U[aspect]``; ``fill="random"`` (per-pixel noise
    in [0,1), the paper: drawn as the parameter ``fill`` (B,C,H,W)) or ``"mean"``. Unlike
    torchvision's (one rectangle per batch), every image draws its own.
    """

    def __init__(self, prob: float = 0.5, *, area: Sequence[float] = (0.02, 0.4),
                 aspect: Sequence[float] = (0.3, 1 / 0.3), attempts: int = 10, fill: str = "random",
                 **common: Any) -> None:
        super().__init__(**common)
        self.area, self.aspect = _pair(area, "random-erasing: area"), _pair(aspect, "random-erasing: aspect")
        if not 0 <= prob <= 1 or not 0 < self.area[0] <= self.area[1] <= 1 or not 0 < self.aspect[0] <= self.aspect[1]:
            raise AdvpipeError(f"random-erasing: bad prob/area/aspect {prob!r}, {area!r}, {aspect!r}")
        if fill not in ("random", "mean") or int(attempts) < 1:
            raise AdvpipeError(f"random-erasing: fill must be 'random' or 'mean' and attempts >= 1, "
                               f"got {fill!r}, {attempts!r}")
        self.prob, self.attempts, self.fill = float(prob), int(attempts), fill

    def make_params(self, images: torch.Tensor, side: Mapping[str, torch.Tensor],
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw each image's rectangle and whether it is erased, and for ``fill="random"`` the noise."""
        b, c, h, w = images.shape
        params = sample_random_erasing(b, h, w, prob=self.prob, area=self.area, aspect=self.aspect,
                                       attempts=self.attempts, generator=generator, device=images.device)
        if self.fill == "random":
            params["fill"] = torch.rand(b, c, h, w, generator=generator, device=images.device).to(images.dtype)
        return params

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Replace the erased rectangles by their fill values."""
        inside = ~boxes_keep(params["boxes"], images.shape[-2], images.shape[-1]) & params["erase"][:, None, None]
        fill = params["fill"].to(images.dtype) if self.fill == "random" else \
            torch.as_tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return torch.where(inside[:, None], fill, images)


AUGMENTS.register("random-erasing", RandomErasing)


# --------------------------------------------------------------------------------------- hide-and-seek


def sample_hide_and_seek(batch_size: int, height: int, width: int, grid_sizes: Sequence[int] = (0, 4, 8, 16),
                         hide_prob: float = 0.5, *, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Draw Hide-and-Seek parameters (Singh & Lee, Sec. 3.1): a patch size per image and a hide bit per patch.

    ``size`` (B,) long is drawn uniformly from ``grid_sizes`` (0 = hide nothing); the image is cut
    into ``size`` x ``size`` patches from the top-left (border patches may be smaller) and each is
    hidden with probability ``hide_prob``. ``hidden`` (B,R,C) bool holds the bits on the grid of the
    smallest non-zero size, so one tensor serves every image (coarser grids use its top-left part).
    """
    generator = generator_for(device, generator)
    choices = torch.as_tensor(list(grid_sizes), dtype=torch.long, device=device)
    size = choices[_uniform_int(0, len(grid_sizes) - 1, (batch_size,), generator, device)]
    finest = min([s for s in grid_sizes if s > 0], default=max(height, width))
    shape = (batch_size, math.ceil(height / finest), math.ceil(width / finest))
    hidden = torch.rand(shape, generator=generator, device=device) < hide_prob
    return {"size": size, "hidden": hidden}


def hide_and_seek_keep(params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Turn Hide-and-Seek parameters into a (B,H,W) keep mask."""
    size, hidden = params["size"], params["hidden"]
    b, n_rows, n_cols = hidden.shape
    # size 0 hides nothing; map it to one huge patch so its indices stay in range
    s = torch.where(size > 0, size, height + width)[:, None]
    rows = torch.arange(height, device=size.device)[None] // s  # (B,H): patch row of each pixel row
    cols = torch.arange(width, device=size.device)[None] // s
    idx = (rows[:, :, None] * n_cols + cols[:, None, :]).reshape(b, height * width)
    hide = hidden.reshape(b, n_rows * n_cols).gather(1, idx).view(b, height, width)
    return ~(hide & (size > 0)[:, None, None])


class HideAndSeek(Occlusion):
    """Hide-and-Seek (Singh & Lee, ICCV 2017): a grid of patches per image, each hidden with ``hide_prob``.

    The patch size is drawn per image from ``grid_sizes`` (default {0, 4, 8, 16} on 32x32, scaled
    to ``image_size``; 0 hides nothing).
    """

    def __init__(self, grid_sizes: Sequence[int] | None = None, *, hide_prob: float = 0.5, **common: Any) -> None:
        super().__init__(**common)
        if grid_sizes is None:
            grid_sizes = (0,) + tuple(scaled(s, dataset_scale(self.image_size)) for s in (4, 8, 16))
        self.grid_sizes = tuple(int(s) for s in grid_sizes)
        if not self.grid_sizes or min(self.grid_sizes) < 0 or not 0 <= hide_prob <= 1:
            raise AdvpipeError(f"hide-and-seek: need non-negative grid sizes and 0 <= hide_prob <= 1, got "
                               f"{grid_sizes!r}, {hide_prob!r}")
        self.hide_prob = float(hide_prob)

    def make_params(self, images: torch.Tensor, side: Mapping[str, torch.Tensor],
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw each image's patch size and hide bits."""
        b, _, h, w = images.shape
        return sample_hide_and_seek(b, h, w, self.grid_sizes, self.hide_prob, generator=generator,
                                    device=images.device)

    def keep(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """False on hidden patches."""
        return hide_and_seek_keep(params, height, width)


AUGMENTS.register("hide-and-seek", HideAndSeek)


# -------------------------------------------------------------------------------------------- gridmask


def gridmask_defaults(height: int, width: int) -> dict[str, Any]:
    """GridMask's CIFAR settings (d in [24, 32], ratio 0.4, no rotation) scaled to an image size."""
    scale = min(height, width) / 32.0
    return {"d_range": (scaled(24, scale, 2), scaled(32, scale, 2)), "ratio": 0.4, "rotate": 1}


def sample_gridmask(batch_size: int, height: int, width: int, *, d_range: Sequence[int], ratio: float,
                    rotate: int, prob: float = 1.0, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Draw GridMask parameters (Chen et al., Sec. 3): unit size, grid offset, rotation and whether to apply.

    ``d`` (B,) ~ U{d_min..d_max}; ``offset`` (B,2) ~ U{0..d-1} shifts the grid; ``angle`` (B,) in
    radians ~ U{0..rotate-1} degrees (their ``rotate=1`` means none); ``use`` (B,) ~ Bernoulli(prob).
    ``ratio`` is carried as ``ratio`` (B,) for :func:`gridmask_keep`.
    """
    generator = generator_for(device, generator)
    d = _uniform_int(int(d_range[0]), int(d_range[1]), (batch_size,), generator, device)
    offset = (torch.rand(batch_size, 2, generator=generator, device=d.device) * d[:, None]).floor().long()
    degrees = _uniform_int(0, max(int(rotate), 1) - 1, (batch_size,), generator, device)
    use = torch.rand(batch_size, generator=generator, device=d.device) < prob
    return {"d": d, "offset": offset, "angle": degrees.float() * (math.pi / 180), "use": use,
            "ratio": torch.full((batch_size,), float(ratio), device=d.device)}


def gridmask_off(batch_size: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """GridMask parameters that remove nothing (``use`` False), with the dtypes of :func:`sample_gridmask`'s."""
    zeros = torch.zeros(batch_size, device=device)
    return {"d": torch.ones(batch_size, dtype=torch.long, device=device),
            "offset": torch.zeros(batch_size, 2, dtype=torch.long, device=device), "angle": zeros,
            "use": torch.zeros(batch_size, dtype=torch.bool, device=device), "ratio": zeros}


def gridmask_keep(params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Turn GridMask parameters into a (B,H,W) keep mask (their ``mode=1``: squares of side d - l removed).

    In each ``d`` x ``d`` unit the kept part is an L-shaped band of width ``l = round(ratio * d)``;
    a pixel is removed when both its (rotated, offset) row and column fall outside the band.
    """
    d, offset, angle, use = params["d"], params["offset"], params["angle"], params["use"]
    band = (params["ratio"] * d + 0.5).floor().long()
    dev = d.device
    y = torch.arange(height, device=dev, dtype=torch.float32) - (height - 1) / 2
    x = torch.arange(width, device=dev, dtype=torch.float32) - (width - 1) / 2
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    # rotate pixel centres about the image centre; nearest-neighbour sampling as PIL's rotate does
    yy = (cos * y[None, :, None] - sin * x[None, None, :] + (height - 1) / 2).floor().long()
    xx = (sin * y[None, :, None] + cos * x[None, None, :] + (width - 1) / 2).floor().long()
    dd = d[:, None, None]
    out_r = torch.remainder(yy - offset[:, 0, None, None], dd) >= band[:, None, None]
    out_c = torch.remainder(xx - offset[:, 1, None, None], dd) >= band[:, None, None]
    return ~(out_r & out_c & use[:, None, None])


def linear_ramp(maximum: float, epoch: int, warmup: int) -> float:
    """Schedule value for 0-based ``epoch``: ``maximum * min(1, (epoch + 1) / warmup)`` (``maximum`` if warmup <= 0)."""
    return maximum * min(1.0, (epoch + 1) / warmup) if warmup > 0 else maximum


class GridMask(Occlusion):
    """GridMask (Chen et al. 2020) with its CIFAR settings and probability ramp (call :meth:`set_epoch`).

    Unit ``d ~ U{d}`` (default 24-32 on 32x32, scaled to ``image_size``), kept ``ratio`` 0.4,
    applied with probability ``prob * min(1, (e + 1) / warmup)`` in epoch ``e`` (GridMask's
    ``set_prob``; ``warmup_epochs`` defaults to the whole run).
    """

    def __init__(self, d: Sequence[int] | None = None, *, ratio: float = 0.4, rotate: int = 1, prob: float = 0.8,
                 warmup_epochs: int | None = None, **common: Any) -> None:
        super().__init__(**common)
        self.d_range = _pair(d, "gridmask: d", cast=int) if d is not None else \
            gridmask_defaults(*self.image_size)["d_range"]
        if not 2 <= self.d_range[0] <= self.d_range[1] or not 0 < ratio < 1 or not 0 <= prob <= 1 or int(rotate) < 1:
            raise AdvpipeError(f"gridmask: need 2 <= d_min <= d_max, 0 < ratio < 1, 0 <= prob <= 1, rotate >= 1; got "
                               f"d={d!r}, ratio={ratio!r}, prob={prob!r}, rotate={rotate!r}")
        if warmup_epochs is not None and int(warmup_epochs) < 0:
            raise AdvpipeError(f"gridmask: warmup_epochs must be >= 0, got {warmup_epochs!r}")
        self.ratio, self.rotate, self.prob_max = float(ratio), int(rotate), float(prob)
        self.warmup_epochs = None if warmup_epochs is None else int(warmup_epochs)
        self.set_epoch(0, 1)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """GridMask's ``set_prob`` schedule: the probability grows linearly to ``prob`` over the warmup epochs."""
        self.prob = linear_ramp(self.prob_max, epoch, self.warmup_epochs if self.warmup_epochs is not None else epochs)

    def make_params(self, images: torch.Tensor, side: Mapping[str, torch.Tensor],
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw each image's grid."""
        b, _, h, w = images.shape
        return sample_gridmask(b, h, w, d_range=self.d_range, ratio=self.ratio, rotate=self.rotate, prob=self.prob,
                               generator=generator, device=images.device)

    def keep(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """False on the removed squares of the images that got GridMask."""
        return gridmask_keep(params, height, width)


AUGMENTS.register("gridmask", GridMask)


def _pair(value: Any, what: str, cast: type = float) -> tuple[Any, Any]:
    """Parse a (min, max) pair from a sequence, raising a user error otherwise."""
    try:
        lo, hi = (cast(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise AdvpipeError(f"{what} must be a pair (min, max), got {value!r}") from exc
    if lo > hi:
        raise AdvpipeError(f"{what} must have min <= max, got {value!r}")
    return lo, hi
