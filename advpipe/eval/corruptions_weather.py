"""Weather corruptions of CIFAR-10-C: snow, frost and fog (spatter is in ``corruptions_spatter``).

Formulas of ``make_cifar_c.py`` with its 32x32 constants, batched on the device. Snow's motion
blur re-implements ImageMagick's (:func:`advpipe.eval.corruptions_base.motion_blur`); frost uses
procedural textures instead of the reference's photographs (:mod:`advpipe.eval.corruptions_textures`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from advpipe.eval.corruptions_base import Params, grey, motion_blur, normal, separable, uniform, zoom_matrix
from advpipe.eval.corruptions_textures import (
    FROST_TEXTURES,
    frost_size,
    frost_textures,
    plasma_fractal,
    plasma_size,
    plasma_uniforms,
)

# --------------------------------------------------------------------------- snow


def sample_snow(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """The snow layer N(loc, scale^2) per pixel and the blur angle per sample, uniform in [-135, -45)."""
    b, _, h, w = x.shape
    return {"layer": normal((b, 1, h, w), p["loc"], p["scale"], g, x),
            "degrees": uniform((b,), -135.0, -45.0, g, x).double()}


def snow_layer(layer: torch.Tensor, p: Mapping[str, Any], degrees: torch.Tensor) -> torch.Tensor:
    """Zoom the noise layer in, drop values under the threshold, clip to [0, 1], motion-blur it."""
    h, w = layer.shape[-2:]
    layer = separable(layer, zoom_matrix(h, p["zoom"]), zoom_matrix(w, p["zoom"]))
    layer = torch.where(layer < p["threshold"], torch.zeros_like(layer), layer).clamp(0, 1)
    return motion_blur(layer, p["radius"], p["sigma"], degrees)


def apply_snow(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Whiten the image towards ``1.5 grey + 0.5``, then add the flakes and their 180-degree rotation."""
    flakes = snow_layer(r["layer"].to(x.dtype), p, r["degrees"])
    blend = p["blend"]
    x = blend * x + (1 - blend) * torch.maximum(x, grey(x) * 1.5 + 0.5)
    return x + flakes + torch.rot90(flakes, 2, dims=(2, 3))


# --------------------------------------------------------------------------- frost


def sample_frost(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """Which texture, and the top-left corner of the crop, per sample."""
    b, _, h, w = x.shape
    size = frost_size(h, w)
    return {"texture": torch.randint(0, FROST_TEXTURES, (b,), generator=g, device=x.device),
            "top": torch.randint(0, size - h, (b,), generator=g, device=x.device),
            "left": torch.randint(0, size - w, (b,), generator=g, device=x.device)}


def apply_frost(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """``image_weight * x + frost_weight * crop`` of a frost texture (CIFAR-10-C ``frost``)."""
    b, c, h, w = x.shape
    textures = frost_textures(h, w, x.device, x.dtype)
    rows = r["top"][:, None] + torch.arange(h, device=x.device)[None]  # (B, H)
    cols = r["left"][:, None] + torch.arange(w, device=x.device)[None]  # (B, W)
    crops = textures[r["texture"][:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)
    crops = crops.permute(0, 3, 1, 2)
    if c != 3:
        crops = crops.mean(1, keepdim=True).expand(b, c, h, w)
    return p["image_weight"] * x + p["frost_weight"] * crops


# --------------------------------------------------------------------------- fog


def sample_fog(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """One plasma-fractal map per sample (the level's wibble decay), cropped to the image."""
    b, _, h, w = x.shape
    size = plasma_size(h, w)
    uniforms = plasma_uniforms(b, size, g, x if x.dtype == torch.float64 else x.float())
    return {"plasma": plasma_fractal(uniforms, size, p["decay"])[:, None, :h, :w].to(x.dtype)}


def apply_fog(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """``(x + a * plasma) * max / (max + a)``, ``max`` the image's largest value (CIFAR-10-C ``fog``)."""
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    a = p["amount"]
    return (x + a * r["plasma"]) * peak / (peak + a)
