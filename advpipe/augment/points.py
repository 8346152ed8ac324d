"""Point sources for AdvMask and its ablations (AdvMask paper, Sec. V-B, Tables V and VI).

All return a (B,H,W) bool mask of points on the images' device:

- :func:`attack_points`: the sparse-attack points of the images' ``attack_mask`` side data (AdvMask itself, AAPM);
- :func:`random_points`: points drawn uniformly without replacement over the image (RP);
- :func:`harris_points`: the strongest Harris corners, computed on the device with Sobel convolutions (CP).

CP's corners belong to the image, not to the training crop: :func:`corner_source` is a loader side
source that finds them on the stored (un-padded, un-cropped) images, and the loader then crops and
flips them with the images, as it does the attack masks. On the cropped image the black padding's
edges would add strong corners of their own.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from advpipe.data.loader import FromImages
from advpipe.errors import AdvpipeError
from advpipe.rng import generator_for

#: ITU-R BT.601 luma weights, used to turn RGB into the grey image corner detection works on
_LUMA = (0.299, 0.587, 0.114)


def attack_points(images: torch.Tensor, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Return ``side["attack_mask"]`` as (B,H,W) bool, checking it is there and matches the (B,C,H,W) images."""
    mask = side.get("attack_mask")
    if mask is None:
        raise AdvpipeError("this augmentation needs attack masks: run `advpipe masks` for the dataset first or "
                           "choose another aug (Python API: build it with masks=STORE and pass the images' dataset "
                           "indices, or pass attack_masks=(B,H,W))", fields=("aug",))
    b, _, h, w = images.shape
    if tuple(mask.shape) != (b, h, w):
        raise AdvpipeError(f"attack masks have shape {tuple(mask.shape)}, expected {(b, h, w)} for these images")
    return mask.bool()


def random_points(batch_size: int, height: int, width: int, num_points: int, *,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Draw ``num_points`` distinct pixels per image uniformly at random; return a (B,H,W) bool mask."""
    n = height * width
    generator = generator_for(device, generator)
    if num_points >= n:
        return torch.ones(batch_size, height, width, dtype=torch.bool, device=device)
    keys = torch.rand(batch_size, n, generator=generator, device=device)
    idx = keys.topk(max(num_points, 0), dim=1, largest=False).indices
    out = torch.zeros(batch_size, n, dtype=torch.bool, device=keys.device)
    return out.scatter_(1, idx, True).view(batch_size, height, width)


def harris_response(images: torch.Tensor, k: float = 0.04) -> torch.Tensor:
    """Harris corner response det(M) - k trace(M)^2 of (B,C,H,W) images, as (B,H,W) (Harris & Stephens 1988).

    Gradients are 3x3 Sobel filters of the luma image, the structure tensor M is smoothed with a 3x3
    binomial window; borders are replicated so edges of the image are not mistaken for corners.
    """
    x = images.float()
    if x.shape[1] == 3:
        x = torch.einsum("bchw,c->bhw", x, x.new_tensor(_LUMA))[:, None]
    else:
        x = x.mean(1, keepdim=True)
    sobel = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    grads = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.stack([sobel, sobel.T])[:, None])
    gx, gy = grads[:, 0], grads[:, 1]
    tensor = torch.stack([gx * gx, gy * gy, gx * gy], 1)
    binom = x.new_tensor([1.0, 2.0, 1.0])
    window = (binom[:, None] * binom[None, :] / 16).expand(3, 1, 3, 3)
    sxx, syy, sxy = F.conv2d(F.pad(tensor, (1, 1, 1, 1), mode="replicate"), window, groups=3).unbind(1)
    return sxx * syy - sxy * sxy - k * (sxx + syy) ** 2


def harris_points(images: torch.Tensor, num_points: int, *, k: float = 0.04, quality: float = 0.01) -> torch.Tensor:
    """Return the (B,H,W) bool mask of the ``num_points`` strongest Harris corners per image.

    A corner is a 3x3 local maximum of :func:`harris_response` above ``quality`` times the image's
    strongest response (OpenCV's ``goodFeaturesToTrack`` rule); flat images yield no points.
    """
    b, _, h, w = images.shape
    resp = harris_response(images, k)
    peak = resp.flatten(1).amax(1).clamp(min=0) if b else resp.new_zeros(0)
    is_max = resp == F.max_pool2d(resp[:, None], 3, stride=1, padding=1)[:, 0]
    good = is_max & (resp > quality * peak[:, None, None]) & (resp > 0)
    score = resp.masked_fill(~good, -torch.inf).flatten(1)
    vals, idx = score.topk(min(num_points, h * w), dim=1)
    out = torch.zeros(b, h * w, dtype=torch.bool, device=images.device)
    return out.scatter_(1, idx, vals > -torch.inf).view(b, h, w)


def corner_source(num_points: int) -> FromImages:
    """A loader side source: the ``num_points`` strongest Harris corners of each stored uint8 image, as (B,H,W) bool."""
    def corners(images: torch.Tensor) -> torch.Tensor:
        return harris_points(images.float() / 255, num_points)

    return FromImages(corners)
