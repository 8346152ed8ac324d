"""Digital corruptions of CIFAR-10-C: contrast, brightness, saturate, JPEG, pixelate, elastic transform.

Batched on the device except JPEG, which goes through libjpeg on the CPU (one call per batch).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
import torch

from advpipe.errors import AdvpipeError
from advpipe.eval.corruptions_base import Params, gaussian_filter, sample_grid, uniform, value_saturation

# --------------------------------------------------------------------------- colour


def apply_contrast(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """``(x - m) * factor + m`` with m the per-image, per-channel mean."""
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * p["factor"] + means


def apply_brightness(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """HSV ``V += shift`` with H and S kept, in closed form.

    Scaling every channel by V'/V (black pixels become grey V') is the same as skimage's
    rgb2hsv -> hsv2rgb round trip, without the conversion.
    """
    v, _ = value_saturation(x)
    v_new = (v + p["shift"]).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(torch.finfo(x.dtype).tiny)), v_new.expand_as(x))


def apply_saturate(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """HSV ``S <- clip(S * scale + offset)``: with H and V fixed, x maps to ``V - (V - x) * S'/S``."""
    v, s = value_saturation(x)
    s_new = (s * p["scale"] + p["offset"]).clamp(0, 1)
    ratio = s_new / s.clamp_min(torch.finfo(x.dtype).tiny)
    coloured = v - (v - x) * ratio
    # Grey pixels (S = 0) have hue 0 in skimage, i.e. red: (V, V(1-S'), V(1-S')).
    red = torch.zeros(1, x.shape[1], 1, 1, dtype=x.dtype, device=x.device)
    red[:, 1:] = 1.0
    grey = v - v * s_new * red
    return torch.where(s > 0, coloured, grey)


# --------------------------------------------------------------------------- JPEG and pixelate


def apply_jpeg(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Encode and decode at the level's quality (libjpeg via torchvision, Pillow as fallback)."""
    if x.shape[1] not in (1, 3):
        raise AdvpipeError(f"jpeg needs 1 or 3 channels, got {x.shape[1]}")
    as_uint8 = x.detach().mul(255).round_().clamp_(0, 255).to("cpu", torch.uint8)
    decoded = jpeg_round_trip(list(as_uint8), int(p["quality"]))
    return torch.stack(decoded).to(x.device, x.dtype).div_(255)


def jpeg_round_trip(images: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
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

    from PIL import Image

    array = img.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, "JPEG", quality=quality)
    with Image.open(buf) as decoded:
        out = np.asarray(decoded, dtype=np.uint8)
    return torch.from_numpy(out.copy()).reshape(array.shape).permute(2, 0, 1)


def box_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
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


def apply_pixelate(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """BOX resize to ``int(side * factor)`` and back (PIL's rule, as two separable matrices)."""
    h, w = x.shape[-2:]
    sh, sw = max(int(h * p["factor"]), 1), max(int(w * p["factor"]), 1)
    rows = box_resize_matrix(sh, h) @ box_resize_matrix(h, sh)
    cols = box_resize_matrix(sw, w) @ box_resize_matrix(w, sw)
    rows, cols = rows.to(x.device, x.dtype), cols.to(x.device, x.dtype)
    return torch.einsum("ih,bchw,jw->bcij", rows, x, cols)


# --------------------------------------------------------------------------- elastic transform


def elastic_points(h: int, w: int) -> np.ndarray:
    """The reference's three affine anchor points (x, y): centre +- a third of the side."""
    centre = np.array([w // 2, h // 2], dtype=np.float64)
    third = min(h, w) // 3
    return np.array([centre + third, [centre[0] + third, centre[1] - third], centre - third])


def sample_elastic(x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> Params:
    """The anchor jitter U(-affine, affine) (B,3,2) and the two U(-1, 1) displacement seeds (B,H,W)."""
    b, _, h, w = x.shape
    side = min(h, w)
    jitter = uniform((b, 3, 2), -p["affine"] * side, p["affine"] * side, g, x).double()
    return {"jitter": jitter, "dx": uniform((b, h, w), -1.0, 1.0, g, x), "dy": uniform((b, h, w), -1.0, 1.0, g, x)}


def affine_inverse(jitter: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B,2,3) maps from output to input pixel (x, y) of ``cv2.getAffineTransform(pts1, pts1 + jitter)``."""
    src = torch.as_tensor(elastic_points(h, w), dtype=torch.float64, device=jitter.device)
    dst = src[None] + jitter
    ones = torch.ones(*dst.shape[:2], 1, dtype=torch.float64, device=jitter.device)
    # The inverse of the forward map src -> dst is the affine map dst -> src: solve [dst 1] A = src.
    return torch.linalg.solve(torch.cat([dst, ones], 2), src[None].expand_as(dst)).transpose(1, 2)


def apply_elastic(x: torch.Tensor, p: Mapping[str, Any], r: Params) -> torch.Tensor:
    """Random affine warp (reflect-101 borders), then a smooth random displacement (reflect borders).

    CIFAR-10-C's ``elastic_transform``: ``cv2.warpAffine`` with the jittered anchor points, then
    ``map_coordinates(order=1, mode='reflect')`` at ``(row + dy, col + dx)`` where ``dx`` and
    ``dy`` are uniform noise blurred by a Gaussian (sigma, reflect, truncate 3) times alpha.
    Constants are multiples of the image side (32 for CIFAR-10-C).
    """
    b, c, h, w = x.shape
    side = min(h, w)
    inverse = affine_inverse(r["jitter"].to(x.device), h, w)  # (B,2,3): output (x, y, 1) -> input (x, y)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64),
                            torch.arange(w, device=x.device, dtype=torch.float64), indexing="ij")
    grid = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, h * w, 3)
    src = (grid @ inverse.transpose(1, 2)).reshape(b, h, w, 2)
    warped = sample_grid(x, src[..., 1], src[..., 0], "mirror")
    sigma, alpha = p["sigma"] * side, p["alpha"] * side
    dx = gaussian_filter(r["dx"].to(torch.float64)[:, None], sigma, mode="reflect", truncate=3.0)[:, 0] * alpha
    dy = gaussian_filter(r["dy"].to(torch.float64)[:, None], sigma, mode="reflect", truncate=3.0)[:, 0] * alpha
    return sample_grid(warped, ys[None] + dy, xs[None] + dx, "reflect")
