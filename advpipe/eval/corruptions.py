"""Common corruptions on (B,C,H,W) [0,1] batches, on the batch's device, with 5 severities each.

Twenty-three corruptions, registered in :data:`CORRUPTIONS`:

* the 15 standard corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), whose mean
  accuracy is the benchmark's headline (and RobustBench's): gaussian / shot / impulse noise,
  defocus / glass / motion / zoom blur, snow, frost, fog, brightness, contrast, elastic transform,
  pixelate and JPEG (:data:`STANDARD_CORRUPTIONS`);
* its 4 extra ones: speckle noise, gaussian blur, spatter and saturate (:data:`EXTRA_CORRUPTIONS`);
* the four corruptions M-TLAT adds to ImageNet-C (m-tlat.txt Sec. 4.1): occlusion by a grey
  square, rotation, translation and colour shift (:data:`MTLAT_CORRUPTIONS`).

The CIFAR-10-C ones use ``make_cifar_c.py``'s 32x32 severity constants; ``docs/evaluation.md``
lists every level and the remaining differences from the reference. The kernels live in
``corruptions_noise``, ``_blur``, ``_weather``, ``_spatter``, ``_digital`` and ``_mtlat``. Each
corruption is a pair ``sample(x, severity, generator) -> params`` (the random draws, as tensors on
``x``'s device) and a pure ``apply(x, severity, params)``, so a draw can be replayed and checked.
Inputs are never modified in place; outputs keep shape, dtype and device and lie in [0,1].

Example::

    g = torch.Generator(device=x.device).manual_seed(0)
    x_c = corrupt(x, "gaussian-noise", 3, generator=g)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from advpipe.errors import AdvpipeError
from advpipe.eval import corruptions_blur as blur
from advpipe.eval import corruptions_digital as digital
from advpipe.eval import corruptions_mtlat as mtlat
from advpipe.eval import corruptions_noise as noise
from advpipe.eval import corruptions_spatter as spatter
from advpipe.eval import corruptions_weather as weather
from advpipe.eval.corruptions_base import Applier, Params, Sampler, check_images, generator_for
from advpipe.registry import Registry

SEVERITIES = (1, 2, 3, 4, 5)

#: CIFAR-10-C's 15 corruptions, in the benchmark's order: the mean over these is the headline
STANDARD_CORRUPTIONS = ("gaussian-noise", "shot-noise", "impulse-noise", "defocus-blur", "glass-blur", "motion-blur",
                        "zoom-blur", "snow", "frost", "fog", "brightness", "contrast", "elastic-transform",
                        "pixelate", "jpeg")
#: CIFAR-10-C's four extra corruptions (released beside the 15, not in the headline mean)
EXTRA_CORRUPTIONS = ("speckle-noise", "gaussian-blur", "spatter", "saturate")
#: M-TLAT's additional corruptions (m-tlat.txt Sec. 4.1)
MTLAT_CORRUPTIONS = ("occlusion", "rotation", "translation", "color-shift")
#: the display and evaluation order
ALL_CORRUPTIONS = STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS + MTLAT_CORRUPTIONS
#: the official release's file stem (``<stem>.npy``) of every CIFAR-10-C / CIFAR-100-C corruption
CIFAR_C_FILES = {name: name.replace("-", "_") for name in STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS}
CIFAR_C_FILES["jpeg"] = "jpeg_compression"
#: group names accepted by ``--corruptions`` besides ``all`` and ``none``
GROUPS = {"standard": STANDARD_CORRUPTIONS, "cifar-c": STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS}
_ALIASES = {"jpeg-compression": "jpeg", "elastic": "elastic-transform", "colour-shift": "color-shift"}


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

    @property
    def standard(self) -> bool:
        """Whether it is one of CIFAR-10-C's 15 headline corruptions."""
        return self.name in STANDARD_CORRUPTIONS

    def sample(self, x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> Params:
        """Draw this corruption's random parameters for the batch ``x`` (empty if deterministic)."""
        level = self.level(severity)
        if self.sample_fn is None:
            return {}
        return self.sample_fn(x, level, generator_for(x.device, generator))

    def apply(self, x: torch.Tensor, severity: int, params: Params) -> torch.Tensor:
        """Corrupt ``x`` with already sampled ``params``."""
        check_images(x)
        if x.shape[0] == 0:
            return x.clone()
        out = self.apply_fn(x, self.level(severity), params)
        return out.clamp_(0.0, 1.0).to(x.dtype)

    def __call__(self, x: torch.Tensor, severity: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample and apply in one go."""
        check_images(x)
        return self.apply(x, severity, self.sample(x, severity, generator))


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def corrupt(x: torch.Tensor, name: str, severity: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the registered corruption ``name`` at ``severity`` (1-5) to a (B,C,H,W) [0,1] batch."""
    return CORRUPTIONS.get(canonical_name(name))(x, severity, generator=generator)


def canonical_name(name: str) -> str:
    """Normalise a user-given corruption name (case, ``_`` for ``-``, the release's file names)."""
    text = str(name).strip().lower().replace("_", "-")
    return _ALIASES.get(text, text)


def parse_corruption_list(text: str | Iterable[str] | None) -> list[str]:
    """Parse ``all``, ``standard``, ``cifar-c``, ``none`` or a comma list of names (unknown ones raise)."""
    if text is None:
        return []
    items = [text] if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = canonical_name(part)
            if not part or part == "none":
                continue
            if part == "all":
                expanded = list(ALL_CORRUPTIONS)
            elif part in GROUPS:
                expanded = list(GROUPS[part])
            else:
                expanded = [CORRUPTIONS.get(part).name]
            names.extend(n for n in expanded if n not in names)
    order = list(ALL_CORRUPTIONS)
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


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
            except ValueError as exc:
                raise AdvpipeError(f"invalid severities {text!r}; use a range like 1-5, a list like 1,3,5 "
                                   "or one level", fields=("severities",)) from exc
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v not in SEVERITIES for v in values):
        raise AdvpipeError(f"invalid severities {text!r}; levels are 1 to 5 (e.g. 1-5, 1,3,5 or 3)",
                           fields=("severities",))
    return tuple(sorted(set(values)))


# --------------------------------------------------------------------------- registration

_C10C = "CIFAR-10-C (Hendrycks & Dietterich 2019), 32x32 parameters"
_MTLAT = "M-TLAT Sec. 4.1 range split into 5 levels, scaled from 224 px to 32 px"


def _levels(key: str, values: Iterable[Any], **fixed: Any) -> tuple[dict[str, Any], ...]:
    return tuple({key: v, **fixed} for v in values)


def _table(keys: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> tuple[dict[str, Any], ...]:
    return tuple(dict(zip(keys, row)) for row in rows)


def _register(name: str, family: str, source: str, levels: tuple[Mapping[str, Any], ...], apply_fn: Applier,
              sample_fn: Sampler | None = None) -> None:
    CORRUPTIONS.register(name, Corruption(name, family, source, levels, apply_fn, sample_fn))


# noise
_register("gaussian-noise", "noise", _C10C, _levels("sigma", (0.04, 0.06, 0.08, 0.09, 0.10)),
          noise.apply_gaussian_noise, noise.sample_normal)
_register("shot-noise", "noise", _C10C, _levels("photons", (500, 250, 100, 75, 50)), noise.apply_shot,
          noise.sample_shot)
_register("impulse-noise", "noise", _C10C, _levels("amount", (0.01, 0.02, 0.03, 0.05, 0.07)),
          noise.apply_impulse, noise.sample_impulse)
_register("speckle-noise", "noise", _C10C, _levels("sigma", (0.06, 0.1, 0.12, 0.16, 0.2)),
          noise.apply_speckle, noise.sample_normal)
# blur
_register("defocus-blur", "blur", _C10C,
          _table(("radius", "alias_blur"), ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))),
          blur.apply_defocus)
_register("glass-blur", "blur", _C10C,
          _table(("sigma", "delta", "iterations"), ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))),
          blur.apply_glass, blur.sample_glass)
_register("motion-blur", "blur", _C10C,
          _table(("radius", "sigma"), ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))),
          blur.apply_motion, blur.sample_motion)
_register("zoom-blur", "blur", _C10C, _levels("zoom_stop", (1.06, 1.11, 1.16, 1.21, 1.26), zoom_step=0.01),
          blur.apply_zoom)
_register("gaussian-blur", "blur", _C10C, _levels("sigma", (0.4, 0.6, 0.7, 0.8, 1.0)), blur.apply_gaussian_blur)
# weather
_register("snow", "weather", _C10C, _table(
    ("loc", "scale", "zoom", "threshold", "radius", "sigma", "blend"),
    ((0.1, 0.2, 1.0, 0.6, 8, 3, 0.95), (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
     (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))),
    weather.apply_snow, weather.sample_snow)
_register("frost", "weather", _C10C + "; procedural frost textures",
          _table(("image_weight", "frost_weight"), ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))),
          weather.apply_frost, weather.sample_frost)
_register("fog", "weather", _C10C,
          _table(("amount", "decay"), ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))),
          weather.apply_fog, weather.sample_fog)
_register("spatter", "weather", _C10C, _table(
    ("loc", "scale", "sigma", "threshold", "intensity", "mud"),
    ((0.62, 0.1, 0.7, 0.7, 0.5, False), (0.65, 0.1, 0.8, 0.7, 0.5, False), (0.65, 0.3, 1.0, 0.69, 0.5, False),
     (0.65, 0.1, 0.7, 0.69, 0.6, True), (0.65, 0.1, 0.5, 0.68, 0.6, True))),
    spatter.apply_spatter, spatter.sample_spatter)
# digital
_register("brightness", "digital", _C10C, _levels("shift", (0.05, 0.1, 0.15, 0.2, 0.3)), digital.apply_brightness)
_register("contrast", "digital", _C10C, _levels("factor", (0.75, 0.5, 0.4, 0.3, 0.15)), digital.apply_contrast)
_register("saturate", "digital", _C10C,
          _table(("scale", "offset"), ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))),
          digital.apply_saturate)
_register("elastic-transform", "digital", _C10C + "; alpha, sigma and affine are fractions of the image side",
          _table(("alpha", "sigma", "affine"),
                 ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))),
          digital.apply_elastic, digital.sample_elastic)
_register("jpeg", "digital", _C10C, _levels("quality", (80, 65, 58, 50, 40)), digital.apply_jpeg)
_register("pixelate", "digital", _C10C, _levels("factor", (0.95, 0.9, 0.85, 0.75, 0.65)), digital.apply_pixelate)
# M-TLAT
_register("occlusion", "m-tlat", _MTLAT, _levels("side", (9, 11, 13, 16, 18), fill=0.5),
          mtlat.apply_occlusion, mtlat.sample_occlusion)
_register("rotation", "m-tlat", _MTLAT, _levels("degrees", (8, 16, 24, 32, 40)), mtlat.apply_rotation,
          mtlat.sample_rotation)
_register("translation", "m-tlat", _MTLAT, _levels("pixels", (2, 4, 6, 7, 9)), mtlat.apply_translation,
          mtlat.sample_translation)
_register("color-shift", "m-tlat", _MTLAT, _levels("shift", (0.08, 0.135, 0.19, 0.245, 0.30)),
          mtlat.apply_color_shift, mtlat.sample_color_shift)

assert set(CORRUPTIONS.names()) == set(ALL_CORRUPTIONS)
