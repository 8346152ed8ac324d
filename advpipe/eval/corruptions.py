"""Common corruptions on (B,C,H,W) [0,1] batches, on the batch's device, with 5 severities each.

Fourteen corruptions, registered in :data:`CORRUPTIONS`:

* ten from CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), with that benchmark's 32x32 severity
  parameters: gaussian / shot / impulse noise, defocus / gaussian blur, contrast, brightness,
  saturate, JPEG and pixelate;
* the four corruptions M-TLAT adds to ImageNet-C (m-tlat.txt Sec. 4.1): occlusion by a grey
  square, rotation, translation and colour shift. The paper gives a severity *range* at 224 px;
  the five severities here split that range evenly and scale pixel sizes to the image side.

``docs/evaluation.md`` lists every severity's parameters. Each corruption is a pair
``sample(x, severity, generator) -> params`` (the random draws, as tensors on ``x``'s device) and a
pure ``apply(x, severity, params)``, so a draw can be replayed and checked. Inputs are never
modified in place; outputs keep shape, dtype and device and lie in [0,1].

Example::

    g = torch.Generator(device=x.device).manual_seed(0)
    x_c = corrupt(x, "gaussian-noise", 3, generator=g)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from advpipe.errors import AdvpipeError
from advpipe.registry import Registry

SEVERITIES = (1, 2, 3, 4, 5)
Params = dict[str, torch.Tensor]
Sampler = Callable[[torch.Tensor, Mapping[str, Any], torch.Generator], Params]
Applier = Callable[[torch.Tensor, Mapping[str, Any], Params], torch.Tensor]


@dataclass(frozen=True)
class Corruption:
    """A registered corruption: its five severity levels and its sample/apply pair."""

    name: str
    family: str
    source: str
    levels: tuple[Mapping[str, Any], ...]
    apply_fn: Applier
    sample_fn: Sampler | None = None

    def level(self, severity: int) -> Mapping[str, Any]:
        """The parameters of ``severity`` (1-5)."""
        if not (isinstance(severity, int) and 1 <= severity <= len(self.levels)):
            raise AdvpipeError(f"severity must be an integer from 1 to {len(self.levels)}, got {severity!r}")
        return self.levels[severity - 1]

    @property
    def random(self) -> bool:
        """Whether the corruption draws random numbers."""
        return self.sample_fn is not None

    def sample(self, x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> Params:
        """Draw this corruption's random parameters for the batch ``x`` (empty if deterministic)."""
        level = self.level(severity)
        if self.sample_fn is None:
            return {}
        return self.sample_fn(x, level, _generator_for(x.device, generator))

    def apply(self, x: torch.Tensor, severity: int, params: Params) -> torch.Tensor:
        """Corrupt ``x`` with already sampled ``params``."""
        _check_images(x)
        if x.shape[0] == 0:
            return x.clone()
        out = self.apply_fn(x, self.level(severity), params)
        return out.clamp_(0.0, 1.0).to(x.dtype)

    def __call__(self, x: torch.Tensor, severity: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample and apply in one go."""
        _check_images(x)
        return self.apply(x, severity, self.sample(x, severity, generator))


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def corrupt(x: torch.Tensor, name: str, severity: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the registered corruption ``name`` at ``severity`` (1-5) to a (B,C,H,W) [0,1] batch."""
    return CORRUPTIONS.get(canonical_name(name))(x, severity, generator=generator)


def canonical_name(name: str) -> str:
    """Normalise a user-given corruption name (case, ``_`` for ``-``)."""
    return str(name).strip().lower().replace("_", "-")


def parse_corruption_list(text: str | Iterable[str] | None) -> list[str]:
    """Parse ``all``, ``none`` or a comma list of names into registered names (unknown ones raise)."""
    if text is None:
        return []
    items = [text] if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = canonical_name(part)
            if not part or part == "none":
                continue
            expanded = CORRUPTIONS.names() if part == "all" else [CORRUPTIONS.get(part).name]
            names.extend(n for n in expanded if n not in names)
    return sorted(names, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))


def parse_severities(text: str | Iterable[int] | None) -> tuple[int, ...]:
    """Parse ``1-5``, ``1,3,5`` or ``3`` into sorted distinct severities (AdvpipeError if invalid)."""
    if text is None:
        return SEVERITIES
    if not isinstance(text, str):
        values = list(text)
    else:
        values = []
        for part in text.split(","):
            part = part.strip()
            lo, dash, hi = part.partition("-")
            try:
                if dash:
                    start, stop = int(lo), int(hi)
                    if start > stop:
                        raise ValueError
                    values.extend(range(start, stop + 1))
                else:
                    values.append(int(part))
            except ValueError:
                raise AdvpipeError(f"invalid --severities {text!r}; use a range like 1-5, a list like 1,3,5 "
                                   "or one level") from None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v not in SEVERITIES for v in values):
        raise AdvpipeError(f"invalid --severities {text!r}; levels are 1 to 5 (e.g. 1-5, 1,3,5 or 3)")
    return tuple(sorted(set(values)))


# --------------------------------------------------------------------------- helpers


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (B,C,H,W) batch, got {tuple(x.shape)} {x.dtype}")


def _generator_for(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator(device=device)
    if torch.device(generator.device).type != device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on {device}")
    return generator


def _depthwise(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Convolve every channel with the same 2-D ``kernel`` (odd sizes), padding with ``mode``."""
    kh, kw = kernel.shape
    c = x.shape[1]
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode=mode)
    weight = kernel.to(x.device, x.dtype).expand(c, 1, kh, kw)
    return F.conv2d(padded, weight, groups=c)


def _gaussian_1d(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-(t**2) / (2 * sigma**2))
    return w / w.sum()


def _value_saturation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV value V = max channel and saturation S = (V - min) / V (0 where V = 0), shape (B,1,H,W)."""
    v = x.amax(dim=1, keepdim=True)
    m = x.amin(dim=1, keepdim=True)
    s = torch.where(v > 0, (v - m) / v.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(v))
    return v, s


def _per_sample(x: torch.Tensor) -> tuple[int, torch.device]:
    return x.shape[0], x.device


# --------------------------------------------------------------------------- noise


def _sample_normal(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    return {"noise": torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)}


def _apply_gaussian_noise(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    return x + r["noise"] * p["sigma"]


def _sample_shot(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    # Poisson photon counts with rate x * c; the draw is the parameter (replayable).
    return {"counts": torch.poisson(x.float() * p["photons"], generator=g)}


def _apply_shot(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    return (r["counts"] / p["photons"]).to(x.dtype)


def _sample_impulse(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    # skimage's 's&p' mode: each *element* flips with probability amount, half to 1, half to 0.
    flip = torch.rand(x.shape, generator=g, device=x.device) < p["amount"]
    salt = torch.rand(x.shape, generator=g, device=x.device) < 0.5
    return {"flip": flip, "salt": salt}


def _apply_impulse(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    return torch.where(r["flip"], r["salt"].to(x.dtype), x)


# --------------------------------------------------------------------------- blur


def _defocus_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """CIFAR-10-C's defocus kernel: a normalised disk on a 17x17 grid, smoothed by a 3x3 Gaussian."""
    t = torch.arange(-8, 9, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).double()
    disk /= disk.sum()
    g = _gaussian_1d(alias_blur, 1)
    smooth = F.conv2d(disk[None, None], (g[:, None] * g[None, :])[None, None], padding=1)[0, 0]
    # Trim the all-zero border so the image convolution stays small (at most 5x5 here).
    nz = smooth.abs() > 0
    rows, cols = nz.any(1).nonzero(), nz.any(0).nonzero()
    half = int(max(8 - rows.min(), rows.max() - 8, 8 - cols.min(), cols.max() - 8))
    return smooth[8 - half: 9 + half, 8 - half: 9 + half]


def _apply_defocus(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    # cv2.filter2D's default border is BORDER_REFLECT_101, which is torch's "reflect".
    return _depthwise(x, _defocus_kernel(p["radius"], p["alias_blur"]), "reflect")


def _apply_gaussian_blur(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    # skimage.filters.gaussian: truncate 4 sigma, mode "nearest" (= replicate padding); separable.
    sigma = p["sigma"]
    w = _gaussian_1d(sigma, int(4.0 * sigma + 0.5))
    return _depthwise(_depthwise(x, w[None, :], "replicate"), w[:, None], "replicate")


# --------------------------------------------------------------------------- digital


def _apply_contrast(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * p["factor"] + means


def _apply_brightness(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    # HSV V += c with H, S fixed scales every channel by V'/V (black pixels become grey V'):
    # the same result as skimage's rgb2hsv -> hsv2rgb round trip, without the conversion.
    v, _ = _value_saturation(x)
    v_new = (v + p["shift"]).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(torch.finfo(x.dtype).tiny)), v_new.expand_as(x))


def _apply_saturate(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    # With H and V fixed, each channel is V - V*S*w(H), so S -> S' maps x to V - (V - x) * S'/S.
    v, s = _value_saturation(x)
    s_new = (s * p["scale"] + p["offset"]).clamp(0, 1)
    ratio = s_new / s.clamp_min(torch.finfo(x.dtype).tiny)
    coloured = v - (v - x) * ratio
    # Grey pixels (S = 0) have hue 0 in skimage, i.e. red: (V, V(1-S'), V(1-S')).
    red = torch.zeros(1, x.shape[1], 1, 1, dtype=x.dtype, device=x.device)
    red[:, 1:] = 1.0
    grey = v - v * s_new * red
    return torch.where(s > 0, coloured, grey)


def _apply_jpeg(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    if x.shape[1] not in (1, 3):
        raise AdvpipeError(f"jpeg needs 1 or 3 channels, got {x.shape[1]}")
    as_uint8 = x.detach().mul(255).round_().clamp_(0, 255).to("cpu", torch.uint8)
    decoded = _jpeg_round_trip(list(as_uint8), int(p["quality"]))
    return torch.stack(decoded).to(x.device, x.dtype).div_(255)


def _jpeg_round_trip(images: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
    """Encode and decode CPU uint8 (C,H,W) images as JPEG: torchvision's libjpeg, else Pillow's."""
    try:
        from torchvision.io import decode_jpeg, encode_jpeg
    except ImportError:  # torchvision deprecates its image codecs (0.29) in favour of torchcodec
        return [_pil_jpeg(img, quality) for img in images]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        # One list call codes the whole batch.
        return decode_jpeg(encode_jpeg(images, quality=quality))


def _pil_jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    array = img.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, "JPEG", quality=quality)
    with Image.open(buf) as decoded:
        out = np.asarray(decoded, dtype=np.uint8)
    return torch.from_numpy(out.copy()).reshape(array.shape).permute(2, 0, 1)


def _box_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of PIL's BOX resampling along one axis.

    PIL (Resample.c) centres output pixel i at (i + 0.5) * n_in / n_out and averages the input
    pixels whose centres lie within half a (scaled, at least 1) pixel of it.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        for j in range(lo, hi):
            t = (j - center + 0.5) / filterscale
            if -0.5 < t <= 0.5:
                w[i, j] = 1.0
        w[i] /= w[i].sum()
    return w


def _apply_pixelate(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    h, w = x.shape[-2:]
    sh, sw = max(int(h * p["factor"]), 1), max(int(w * p["factor"]), 1)
    rows = _box_resize_matrix(sh, h) @ _box_resize_matrix(h, sh)
    cols = _box_resize_matrix(sw, w) @ _box_resize_matrix(w, sw)
    rows, cols = rows.to(x.device, x.dtype), cols.to(x.device, x.dtype)
    return torch.einsum("ih,bchw,jw->bcij", rows, x, cols)


# --------------------------------------------------------------------------- M-TLAT extras


def _scaled(pixels_at_32: float, size: int) -> int:
    return max(1, round(pixels_at_32 * size / 32))


def _sample_occlusion(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    b, device = _per_sample(x)
    h, w = x.shape[-2:]
    side = min(_scaled(p["side"], min(h, w)), h, w)
    top = torch.randint(0, h - side + 1, (b,), generator=g, device=device)
    left = torch.randint(0, w - side + 1, (b,), generator=g, device=device)
    return {"top": top, "left": left, "side": torch.full((b,), side, device=device)}


def _apply_occlusion(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    top, left, side = (r[k][:, None, None] for k in ("top", "left", "side"))
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return torch.where(inside[:, None], torch.full_like(x, p["fill"]), x)


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample x with per-sample affine ``theta`` (B,2,3) in normalised coordinates, zeros outside."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _sample_rotation(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    b, device = _per_sample(x)
    sign = torch.randint(0, 2, (b,), generator=g, device=device) * 2 - 1
    return {"degrees": sign.to(torch.float32) * p["degrees"]}


def _apply_rotation(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    h, w = x.shape[-2:]
    a = torch.deg2rad(r["degrees"].to(torch.float32))
    cos, sin = torch.cos(a), torch.sin(a)
    # affine_grid maps output to input coordinates; normalised x and y have different pixel
    # scales on non-square images, hence the h/w factors.
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros_like(a)], 1),
                         torch.stack([sin * w / h, cos, torch.zeros_like(a)], 1)], 1)
    return _warp(x, theta, "bilinear")


def _sample_translation(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    b, device = _per_sample(x)
    distance = _scaled(p["pixels"], min(x.shape[-2:]))
    angle = torch.rand(b, generator=g, device=device) * (2 * math.pi)
    return {"dx": torch.round(distance * torch.cos(angle)).long(),
            "dy": torch.round(distance * torch.sin(angle)).long()}


def _apply_translation(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    h, w = x.shape[-2:]
    zeros = torch.zeros(x.shape[0], device=x.device)
    ones = torch.ones_like(zeros)
    # Whole-pixel shifts land exactly on source pixel centres, so nearest sampling is exact.
    tx = -2.0 * r["dx"].to(zeros.dtype) / w
    ty = -2.0 * r["dy"].to(zeros.dtype) / h
    theta = torch.stack([torch.stack([ones, zeros, tx], 1), torch.stack([zeros, ones, ty], 1)], 1)
    return _warp(x, theta, "nearest")


def _sample_color_shift(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    b, device = _per_sample(x)
    return {"channel": torch.randint(0, x.shape[1], (b,), generator=g, device=device)}


def _apply_color_shift(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    chosen = torch.arange(x.shape[1], device=x.device)[None, :] == r["channel"][:, None]
    return x + chosen[:, :, None, None].to(x.dtype) * p["shift"]


# --------------------------------------------------------------------------- registration

_C10C = "CIFAR-10-C (Hendrycks & Dietterich 2019), 32x32 parameters"
_MTLAT = "M-TLAT Sec. 4.1 range split into 5 levels, scaled from 224 px to 32 px"


def _levels(key: str, values: Iterable[Any], **fixed: Any) -> tuple[dict[str, Any], ...]:
    return tuple({key: v, **fixed} for v in values)


def _register(name: str, family: str, source: str, levels: tuple[Mapping[str, Any], ...], apply_fn: Applier,
              sample_fn: Sampler | None = None) -> None:
    CORRUPTIONS.register(name, Corruption(name, family, source, levels, apply_fn, sample_fn))


_register("gaussian-noise", "noise", _C10C, _levels("sigma", (0.04, 0.06, 0.08, 0.09, 0.10)),
          _apply_gaussian_noise, _sample_normal)
_register("shot-noise", "noise", _C10C, _levels("photons", (500, 250, 100, 75, 50)), _apply_shot, _sample_shot)
_register("impulse-noise", "noise", _C10C, _levels("amount", (0.01, 0.02, 0.03, 0.05, 0.07)),
          _apply_impulse, _sample_impulse)
_register("defocus-blur", "blur", _C10C,
          tuple({"radius": r, "alias_blur": a}
                for r, a in ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))),
          _apply_defocus)
_register("gaussian-blur", "blur", _C10C, _levels("sigma", (0.4, 0.6, 0.7, 0.8, 1.0)), _apply_gaussian_blur)
_register("contrast", "digital", _C10C, _levels("factor", (0.75, 0.5, 0.4, 0.3, 0.15)), _apply_contrast)
_register("brightness", "digital", _C10C, _levels("shift", (0.05, 0.1, 0.15, 0.2, 0.3)), _apply_brightness)
_register("saturate", "digital", _C10C,
          tuple({"scale": s, "offset": o} for s, o in ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))),
          _apply_saturate)
_register("jpeg", "digital", _C10C, _levels("quality", (80, 65, 58, 50, 40)), _apply_jpeg)
_register("pixelate", "digital", _C10C, _levels("factor", (0.95, 0.9, 0.85, 0.75, 0.65)), _apply_pixelate)
_register("occlusion", "m-tlat", _MTLAT, _levels("side", (9, 11, 13, 16, 18), fill=0.5),
          _apply_occlusion, _sample_occlusion)
_register("rotation", "m-tlat", _MTLAT, _levels("degrees", (8, 16, 24, 32, 40)), _apply_rotation, _sample_rotation)
_register("translation", "m-tlat", _MTLAT, _levels("pixels", (2, 4, 6, 7, 9)), _apply_translation, _sample_translation)
_register("color-shift", "m-tlat", _MTLAT, _levels("shift", (0.08, 0.135, 0.19, 0.245, 0.30)),
          _apply_color_shift, _sample_color_shift)

#: the display and evaluation order: CIFAR-10-C's order first, then the M-TLAT extras
_ORDER = ["gaussian-noise", "shot-noise", "impulse-noise", "defocus-blur", "gaussian-blur", "contrast", "brightness",
          "saturate", "jpeg", "pixelate", "occlusion", "rotation", "translation", "color-shift"]
ALL_CORRUPTIONS = tuple(_ORDER)
