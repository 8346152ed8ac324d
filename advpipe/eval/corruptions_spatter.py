"""CIFAR-10-C's ``spatter``: water drops (severities 1-3) or mud (4-5), batched on the device.

The water branch of ``make_cifar_c.py`` runs a chain of OpenCV operations on an 8-bit "liquid"
layer; each has a torch re-implementation here with OpenCV's semantics:

* :func:`canny`: ``cv2.Canny(img, 50, 150)`` with a 3x3 Sobel (replicated borders), the L1
  gradient magnitude, OpenCV's fixed-point direction test (tan 22.5 = 13573 / 2^15), non-maximum
  suppression against zero outside the image, and 8-connected hysteresis;
* :func:`chamfer_distance`: ``cv2.distanceTransform(DIST_L2, 5)``, the 5x5 chamfer metric
  (1, 1.4, 2.1969) to the nearest zero pixel, outside pixels never zero;
* :func:`equalize_hist`: ``cv2.equalizeHist`` (the LUT ``round(cdf' * 255 / (N - h[first]))``);
* box blurs and the emboss ``filter2D`` with reflect-101 borders and uint8 saturation.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from advpipe.eval.corruptions_base import Params, correlate2d, gaussian_filter, normal

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_EMBOSS = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
_BOX = torch.full((3, 3), 1.0 / 9.0)
#: OpenCV's Canny direction constant: round(tan(22.5 deg) * 2^15)
_TG22 = 13573
_CHAMFER = (1.0, 1.4, 2.1969)  # OpenCV's DIST_L2 5x5 mask: axial, diagonal, knight move
WATER = (175 / 255, 238 / 255, 238 / 255)
MUD = (63 / 255, 42 / 255, 20 / 255)


def canny(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Edges (bool, B,1,H,W) of 8-bit images given as floats 0..255, with OpenCV's Canny rules."""
    img = image.double()
    gx = correlate2d(img, _SOBEL_X.double(), "replicate").round().long()
    gy = correlate2d(img, _SOBEL_X.T.double(), "replicate").round().long()
    mag = gx.abs() + gy.abs()
    padded = F.pad(mag, (1, 1, 1, 1))  # magnitudes outside the image are 0

    def at(dy: int, dx: int) -> torch.Tensor:
        h, w = mag.shape[-2:]
        return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ax, ay = gx.abs(), gy.abs() << 15
    tg22 = ax * _TG22
    tg67 = tg22 + (ax << 16)
    horizontal = ay < tg22
    vertical = ~horizontal & (ay > tg67)
    diagonal = ~horizontal & ~vertical
    same_sign = (gx ^ gy) >= 0
    keep = horizontal & (mag > at(0, -1)) & (mag >= at(0, 1))
    keep |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    # s = 1 when the signs agree: compare with (y-1, x-1) and (y+1, x+1), else (y-1, x+1) and (y+1, x-1)
    keep |= diagonal & same_sign & (mag > at(-1, -1)) & (mag > at(1, 1))
    keep |= diagonal & ~same_sign & (mag > at(-1, 1)) & (mag > at(1, -1))
    candidate = keep & (mag > int(low))
    edges = candidate & (mag > int(high))
    while True:  # hysteresis: weak candidates 8-connected to an edge become edges
        grown = candidate & (F.max_pool2d(edges.double(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def chamfer_distance(zero: torch.Tensor, cap: float) -> torch.Tensor:
    """5x5 chamfer distance (B,1,H,W) to the nearest ``zero`` pixel, exact up to ``cap`` and capped there."""
    a, b, c = _CHAMFER
    # axial neighbours cost a, diagonal ones b, knight moves c; (0, +-2) and (+-2, +-2) are not in the mask
    steps = [(dy, dx, a if abs(dy) + abs(dx) == 1 else b if abs(dy) == abs(dx) else c)
             for dy in range(-2, 3) for dx in range(-2, 3)
             if (abs(dy), abs(dx)) in {(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)}]
    h, w = zero.shape[-2:]
    dist = torch.where(zero, 0.0, float("inf")).double()
    # Every chamfer step costs at least 1, so cap + 1 sweeps give every distance up to cap exactly.
    for _ in range(int(cap) + 1):
        padded = F.pad(dist, (2, 2, 2, 2), value=float("inf"))
        new = dist
        for dy, dx, cost in steps:
            new = torch.minimum(new, padded[..., 2 + dy: 2 + dy + h, 2 + dx: 2 + dx + w] + cost)
        if torch.equal(new, dist):
            break
        dist = new
    return dist.clamp(max=cap)


def equalize_hist(image: torch.Tensor) -> torch.Tensor:
    """``cv2.equalizeHist`` per image of (B,1,H,W) integer-valued floats 0..255."""
    b = image.shape[0]
    values = image.long().flatten(1)
    hist = torch.zeros(b, 256, dtype=torch.long, device=image.device).scatter_add_(1, values, torch.ones_like(values))
    total = values.shape[1]
    first = (hist > 0).long().argmax(1, keepdim=True)
    first_count = hist.gather(1, first)
    scale = (255.0 / (total - first_count).clamp(min=1).float())
    lut = (hist.cumsum(1) - first_count).float().mul(scale).round().clamp(0, 255)
    lut = torch.where(torch.arange(256, device=image.device)[None] <= first, torch.zeros_like(lut), lut)
    lut = torch.where(first_count == total, first.float().expand_as(lut), lut)
    return lut.gather(1, values).view_as(image).to(image.dtype)


def sample_spatter(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """The liquid layer N(loc, scale^2), one value per pixel."""
    b, _, h, w = x.shape
    return {"liquid": normal((b, 1, h, w), p["loc"], p["scale"], g, x)}


def water_mask(liquid: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """The water branch's mask in [0, intensity]: liquid times its embossed, equalised edge distance."""
    layer = (liquid * 255).clamp(0, 255).floor()  # (liquid_layer * 255).astype(np.uint8)
    edges = canny(layer, 50, 150)
    dist = chamfer_distance(edges, 20.0)  # 255 - Canny is zero on the edges
    # cv2.blur (sum, then times 1/9), then astype(np.uint8); the epsilon keeps exact integers whole
    dist = (correlate2d(dist, torch.ones(3, 3, dtype=torch.float64), "reflect") / 9 + 1e-9).floor()
    dist = equalize_hist(dist)
    dist = correlate2d(dist, _EMBOSS.double(), "reflect").clamp(0, 255)  # filter2D into CV_8U
    dist = correlate2d(dist, _BOX.double(), "reflect").round()  # cv2.blur on uint8 rounds
    m = layer * dist
    peak = m.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, m / peak.clamp(min=1e-12), torch.zeros_like(m)) * p["intensity"]


def mud_mask(liquid: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """The mud branch's mask: the blurred drop region, zero where under 0.8."""
    m = gaussian_filter((liquid > p["threshold"]).to(liquid.dtype), p["intensity"], mode="nearest")
    return torch.where(m < 0.8, torch.zeros_like(m), m)


def apply_spatter(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Water drops tinted pale turquoise added to the image, or opaque-ish mud (CIFAR-10-C ``spatter``)."""
    liquid = gaussian_filter(r["liquid"].double(), p["sigma"], mode="nearest")
    liquid = torch.where(liquid < p["threshold"], torch.zeros_like(liquid), liquid)
    if p["mud"]:
        m = mud_mask(liquid, p).to(x.dtype)
        return x * (1 - m) + _tint(MUD, x) * m
    return x + water_mask(liquid, p).to(x.dtype) * _tint(WATER, x)


def _tint(color: tuple[float, float, float], x: torch.Tensor) -> torch.Tensor:
    """The colour as (1,C,1,1): per channel on RGB images, its mean on other channel counts."""
    values = list(color) if x.shape[1] == 3 else [sum(color) / 3] * x.shape[1]
    return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
