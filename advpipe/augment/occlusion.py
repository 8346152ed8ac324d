"""Information-deletion baselines of the AdvMask paper's Table I, batched with per-sample parameters.

- ``cutout``: DeVries & Taylor, "Improved Regularization of CNNs with Cutout", arXiv:1708.04552.
- ``random-erasing``: Zhong et al., "Random Erasing Data Augmentation", AAAI 2020 (Alg. 1).
- ``hide-and-seek``: Singh & Lee, "Hide-and-Seek", ICCV 2017.
- ``gridmask``: Chen et al., "GridMask Data Augmentation", arXiv:2001.04086.

Each kernel is a ``sample_*`` function that draws every image's own parameters on the device with an
explicit generator, plus a pure function turning those parameters into a keep mask (or, for random
erasing, into the erased images). Occluded pixels take the dataset mean, which is zero after the
model's normalization, as in the reference implementations that occlude normalized tensors.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from advpipe.augment.base import AUGMENTS, AugmentContext, InputAugment, box_extent, occlude
from advpipe.data.batch import Batch
from advpipe.errors import AdvpipeError
from advpipe.rng import generator_for

#: datasets whose 32x32 defaults are the CIFAR-100 settings; every other dataset uses CIFAR-10's
_CIFAR100 = ("cifar100",)


def resolve_generator(generator: torch.Generator | None, device: torch.device | str | None) -> torch.Generator:
    """The given generator (checked to be on ``device``), or a fresh default-seeded one; never the global RNG."""
    return generator_for(device, generator)


def dataset_scale(ctx: AugmentContext) -> float:
    """Factor from 32x32 CIFAR pixel sizes to this context's image size (shorter side / 32)."""
    return min(ctx.image_size) / 32.0


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


class _KeepAugment(InputAugment):
    """An augmentation whose parameters describe a keep mask; occluded pixels take the dataset mean."""

    def __init__(self, ctx: AugmentContext) -> None:
        self.mean = tuple(ctx.mean)

    def keep(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Turn sampled parameters into a (B,H,W) bool keep mask."""
        raise NotImplementedError

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fill the pixels the parameters occlude with the dataset mean."""
        return occlude(images, self.keep(params, images.shape[-2], images.shape[-1]), self.mean)


# ---------------------------------------------------------------------------------------------- cutout


def sample_cutout(batch_size: int, height: int, width: int, size: int, *, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Draw one ``size`` x ``size`` square per image, centre uniform over the image, clipped (Cutout Sec. 3).

    Returns ``boxes`` (B,4) long (row0, col0, row1, col1), end-exclusive; the square covers
    ``centre - size//2 .. centre - size//2 + size - 1`` before clipping.
    """
    generator = resolve_generator(generator, device)
    centre = _uniform_int(0, torch.tensor([height - 1, width - 1]), (batch_size, 2), generator, device)
    start = centre - size // 2
    lim = torch.tensor([height, width], device=centre.device)
    lo = torch.minimum(start.clamp(min=0), lim)
    hi = torch.minimum((start + size).clamp(min=0), lim)
    return {"boxes": torch.cat([lo, hi], 1)}


class Cutout(_KeepAugment):
    """Cutout: one square of side ``size`` per image at a uniformly random centre, clipped at the border."""

    def __init__(self, ctx: AugmentContext, size: int) -> None:
        super().__init__(ctx)
        self.size = size

    def sample(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw each image's square."""
        b, _, h, w = batch.images.shape
        return sample_cutout(b, h, w, self.size, generator=generator, device=batch.images.device)

    def keep(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """False inside each image's square."""
        return boxes_keep(params["boxes"], height, width)


def cutout_size(ctx: AugmentContext) -> int:
    """Default Cutout side: 16 on CIFAR-10-like data, 8 on CIFAR-100, scaled to the image size."""
    base = 8 if ctx.dataset in _CIFAR100 else 16
    return scaled(base, dataset_scale(ctx))


@AUGMENTS.register("cutout")
def _cutout(ctx: AugmentContext, *, size: int | None = None) -> InputAugment:
    """Build Cutout for ``ctx``; ``size`` defaults by dataset (see :func:`cutout_size`)."""
    size = cutout_size(ctx) if size is None else int(size)
    if size < 1:
        raise AdvpipeError(f"cutout: size must be >= 1, got {size}")
    return Cutout(ctx, size)


# -------------------------------------------------------------------------------------- random erasing


def sample_random_erasing(batch_size: int, channels: int, height: int, width: int, *, prob: float = 0.5,
                          area: Sequence[float] = (0.02, 0.4), aspect: Sequence[float] = (0.3, 1 / 0.3),
                          attempts: int = 10, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Draw Random Erasing parameters (Zhong et al., Alg. 1), a separate rectangle per image.

    With probability ``prob`` an image is erased: target area ``S_e ~ U[area]`` times the image
    area, aspect ``r_e ~ U[aspect]``, ``h = round(sqrt(S_e r_e))``, ``w = round(sqrt(S_e / r_e))``;
    the rectangle must fit strictly inside the image (``h < H``, ``w < W``, as in the reference
    code). Instead of their open-ended retry loop every image gets ``attempts`` vectorized draws and
    keeps its first that fits; images with none skip erasing. The top-left corner is uniform over
    the valid positions. Returns ``boxes`` (B,4), ``erase`` (B,) bool and ``fill`` (B,C,H,W)
    uniform random values in [0,1) (the paper's random-value fill).
    """
    generator = resolve_generator(generator, device)
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
    fill = torch.rand(batch_size, channels, height, width, generator=generator, device=device).to(dtype)
    return {"boxes": torch.stack([top, left, top + h, left + w], 1), "erase": erase, "fill": fill}


class RandomErasing(InputAugment):
    """Random Erasing: with probability ``prob`` replace one random rectangle per image by noise (or the mean)."""

    def __init__(self, ctx: AugmentContext, prob: float, area: tuple[float, float], aspect: tuple[float, float],
                 attempts: int, fill: str) -> None:
        self.mean = tuple(ctx.mean)
        self.prob, self.area, self.aspect, self.attempts, self.fill = prob, area, aspect, attempts, fill

    def sample(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw each image's rectangle, whether it is erased and its fill values."""
        b, c, h, w = batch.images.shape
        params = sample_random_erasing(b, c, h, w, prob=self.prob, area=self.area, aspect=self.aspect,
                                       attempts=self.attempts, generator=generator, device=batch.images.device,
                                       dtype=batch.images.dtype)
        if self.fill == "mean":
            params["fill"] = torch.as_tensor(self.mean, dtype=batch.images.dtype,
                                             device=batch.images.device).view(1, -1, 1, 1).expand(b, c, h, w)
        return params

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Replace the erased rectangles by their fill values."""
        inside = ~boxes_keep(params["boxes"], images.shape[-2], images.shape[-1]) & params["erase"][:, None, None]
        return torch.where(inside[:, None], params["fill"].to(images.dtype), images)


@AUGMENTS.register("random-erasing")
def _random_erasing(ctx: AugmentContext, *, prob: float = 0.5, area: Sequence[float] = (0.02, 0.4),
                    aspect: Sequence[float] = (0.3, 1 / 0.3), attempts: int = 10, fill: str = "random") -> InputAugment:
    """Build Random Erasing with Zhong et al.'s defaults (p 0.5, area 0.02-0.4, aspect 0.3-3.33, random fill)."""
    area_t = _pair(area, "random-erasing: area")
    aspect_t = _pair(aspect, "random-erasing: aspect")
    if not 0 <= prob <= 1 or not 0 < area_t[0] <= area_t[1] <= 1 or not 0 < aspect_t[0] <= aspect_t[1]:
        raise AdvpipeError(f"random-erasing: bad prob/area/aspect {prob!r}, {area!r}, {aspect!r}")
    if fill not in ("random", "mean") or int(attempts) < 1:
        raise AdvpipeError(f"random-erasing: fill must be 'random' or 'mean' and attempts >= 1, "
                           f"got {fill!r}, {attempts!r}")
    return RandomErasing(ctx, float(prob), area_t, aspect_t, int(attempts), fill)


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
    generator = resolve_generator(generator, device)
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


class HideAndSeek(_KeepAugment):
    """Hide-and-Seek: per image, a random patch size and every patch hidden with probability ``hide_prob``."""

    def __init__(self, ctx: AugmentContext, grid_sizes: tuple[int, ...], hide_prob: float) -> None:
        super().__init__(ctx)
        self.grid_sizes, self.hide_prob = grid_sizes, hide_prob

    def sample(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw each image's patch size and hide bits."""
        b, _, h, w = batch.images.shape
        return sample_hide_and_seek(b, h, w, self.grid_sizes, self.hide_prob, generator=generator,
                                    device=batch.images.device)

    def keep(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """False on hidden patches."""
        return hide_and_seek_keep(params, height, width)


@AUGMENTS.register("hide-and-seek")
def _hide_and_seek(ctx: AugmentContext, *, grid_sizes: Sequence[int] | None = None,
                   hide_prob: float = 0.5) -> InputAugment:
    """Build Hide-and-Seek; grid sizes default to {0,4,8,16} on 32x32, scaled to the image size."""
    if grid_sizes is None:
        scale = dataset_scale(ctx)
        grid_sizes = (0,) + tuple(scaled(s, scale) for s in (4, 8, 16))
    sizes = tuple(int(s) for s in grid_sizes)
    if not sizes or min(sizes) < 0 or not 0 <= hide_prob <= 1:
        raise AdvpipeError(f"hide-and-seek: need non-negative grid sizes and 0 <= hide_prob <= 1, got "
                           f"{grid_sizes!r}, {hide_prob!r}")
    return HideAndSeek(ctx, sizes, float(hide_prob))


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
    generator = resolve_generator(generator, device)
    d = _uniform_int(int(d_range[0]), int(d_range[1]), (batch_size,), generator, device)
    offset = (torch.rand(batch_size, 2, generator=generator, device=d.device) * d[:, None]).floor().long()
    degrees = _uniform_int(0, max(int(rotate), 1) - 1, (batch_size,), generator, device)
    use = torch.rand(batch_size, generator=generator, device=d.device) < prob
    return {"d": d, "offset": offset, "angle": degrees.float() * (math.pi / 180), "use": use,
            "ratio": torch.full((batch_size,), float(ratio), device=d.device)}


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


class GridMask(_KeepAugment):
    """GridMask with its probability schedule: epoch e applies it with ``prob * min(1, (e + 1) / warmup)``."""

    def __init__(self, ctx: AugmentContext, d_range: tuple[int, int], ratio: float, rotate: int, prob: float,
                 warmup_epochs: int | None) -> None:
        super().__init__(ctx)
        self.d_range, self.ratio, self.rotate, self.prob_max = d_range, ratio, rotate, prob
        self.warmup_epochs = warmup_epochs
        self.set_epoch(0, ctx.epochs)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """GridMask's ``set_prob`` schedule: the probability grows linearly to ``prob`` over the warmup epochs."""
        self.prob = linear_ramp(self.prob_max, epoch, self.warmup_epochs if self.warmup_epochs is not None else epochs)

    def sample(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw each image's grid."""
        b, _, h, w = batch.images.shape
        return sample_gridmask(b, h, w, d_range=self.d_range, ratio=self.ratio, rotate=self.rotate, prob=self.prob,
                               generator=generator, device=batch.images.device)

    def keep(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """False on the removed squares of the images that got GridMask."""
        return gridmask_keep(params, height, width)


@AUGMENTS.register("gridmask")
def _gridmask(ctx: AugmentContext, *, d: Sequence[int] | None = None, ratio: float = 0.4, rotate: int = 1,
              prob: float = 0.8, warmup_epochs: int | None = None) -> InputAugment:
    """Build GridMask with its CIFAR settings (d 24-32, ratio 0.4, prob 0.8 reached at the end of training)."""
    h, w = ctx.image_size
    d_range = _pair(d, "gridmask: d", cast=int) if d is not None else gridmask_defaults(h, w)["d_range"]
    if not 2 <= d_range[0] <= d_range[1] or not 0 < ratio < 1 or not 0 <= prob <= 1 or int(rotate) < 1:
        raise AdvpipeError(f"gridmask: need 2 <= d_min <= d_max, 0 < ratio < 1, 0 <= prob <= 1, rotate >= 1; got "
                           f"d={d!r}, ratio={ratio!r}, prob={prob!r}, rotate={rotate!r}")
    if warmup_epochs is not None and int(warmup_epochs) < 0:
        raise AdvpipeError(f"gridmask: warmup_epochs must be >= 0, got {warmup_epochs!r}")
    return GridMask(ctx, d_range, float(ratio), int(rotate), float(prob),
                    None if warmup_epochs is None else int(warmup_epochs))


def _pair(value: Any, what: str, cast: type = float) -> tuple[Any, Any]:
    """Parse a (min, max) pair from a sequence, raising a user error otherwise."""
    try:
        lo, hi = (cast(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise AdvpipeError(f"{what} must be a pair (min, max), got {value!r}") from exc
    if lo > hi:
        raise AdvpipeError(f"{what} must have min <= max, got {value!r}")
    return lo, hi
