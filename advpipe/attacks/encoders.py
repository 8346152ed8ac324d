"""Perturbation encoders H of the AdvMask sparse attack (advmask.txt Sec. III-A a, Eq. 3).

An encoder maps a batch of perturbations ``delta`` (B,C,H,W) to per-pixel mask logits (B,1,H,W);
the attack turns them into a mask with ``sigmoid(alpha * H(delta))``. Two encoders follow the
paper: a fully connected layer ``W in R^{(whc) x (wh)}`` for small images and a U-Net for large
ones. Each encoder is built for one attack call and comes in two scopes:

* ``"batch"``: one encoder shared by every image of the batch (the paper's setting; cheap).
* ``"image"``: an independent encoder per image, so an image's mask does not depend on its
  batch-mates (linear only: B weight matrices applied with one ``baddbmm``).

Parameters are initialised from the caller's ``torch.Generator`` (never the global RNG), so the
same seed gives the same encoder and hence the same masks.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.errors import AdvpipeError
from advpipe.registry import Registry

#: builder(image_shape (C,H,W), batch_size, scope, options, generator, device) -> encoder module
EncoderBuilder = Callable[[tuple[int, int, int], int, str, dict, torch.Generator, torch.device], nn.Module]

ENCODERS: Registry[EncoderBuilder] = Registry("sparse-attack encoder")

#: U-Net backbone used when none is given; see docs/attack.md for the speed measurement.
DEFAULT_UNET_BACKBONE = "mobilenet_v2"


class LinearEncoder(nn.Module):
    """Fully connected encoder ``H(delta) = W vec(delta) + b`` (advmask.txt Sec. III-A a).

    ``scope="batch"`` holds one (C*H*W -> H*W) layer; ``scope="image"`` holds ``batch_size`` of
    them as (B, C*H*W, H*W) weights, applied per image with ``baddbmm``.
    """

    def __init__(self, image_shape: tuple[int, int, int], batch_size: int, scope: str,
                 generator: torch.Generator, device: torch.device) -> None:
        """Create and initialise the weights (PyTorch's nn.Linear bounds) from ``generator``."""
        super().__init__()
        c, h, w = image_shape
        fan_in, out = c * h * w, h * w
        self.image_shape = image_shape
        self.scope = scope
        lead = () if scope == "batch" else (batch_size,)
        # nn.Linear's default init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        weight = torch.empty(*lead, fan_in, out, device=device).uniform_(-bound, bound, generator=generator)
        bias = torch.empty(*lead, out, device=device).uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        """Map (B,C,H,W) perturbations to (B,1,H,W) mask logits."""
        b = delta.shape[0]
        _, h, w = self.image_shape
        flat = delta.reshape(b, -1)
        if self.scope == "batch":
            out = torch.addmm(self.bias, flat, self.weight)
        else:
            if b != self.weight.shape[0]:
                raise ValueError(f"per-image encoder built for {self.weight.shape[0]} images, got {b}")
            out = torch.baddbmm(self.bias.unsqueeze(1), flat.unsqueeze(1), self.weight).squeeze(1)
        return out.view(b, 1, h, w)


class UNetEncoder(nn.Module):
    """U-Net encoder (advmask.txt Sec. III-A a; Ronneberger et al., 2015) via segmentation_models_pytorch.

    Built with ``encoder_weights=None`` (never downloads). The input is zero-padded to a multiple
    of 32 (smp's U-Net halves the resolution five times) and the output cropped back. BatchNorm
    runs in train mode, i.e. on the statistics of the current batch of perturbations, except in
    a layer whose input holds a single value per channel (batch 1 with a 1x1 feature map: the
    deepest stage of a 32x32 input), which has no batch statistics; that layer normalises with its
    running statistics instead (see :class:`SingleValueSafeBatchNorm`), so any batch size works.
    """

    def __init__(self, image_shape: tuple[int, int, int], backbone: str,
                 generator: torch.Generator, device: torch.device) -> None:
        """Build the U-Net on the meta device, then materialise and initialise it from ``generator``."""
        super().__init__()
        import segmentation_models_pytorch as smp

        c, h, w = image_shape
        self.image_shape = image_shape
        try:
            # Building on "meta" allocates nothing and draws nothing from the global RNG.
            with torch.device("meta"):
                net = smp.Unet(backbone, encoder_weights=None, in_channels=c, classes=1)
        except KeyError as exc:
            raise AdvpipeError(
                f"unknown U-Net backbone {backbone!r}; see segmentation_models_pytorch.encoders.get_encoder_names()"
            ) from exc
        single_value_safe(net)
        net.to_empty(device=device)
        init_from_generator(net, generator)
        self.net = net
        self.pad = ((-w) % 32, (-h) % 32)

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        """Map (B,C,H,W) perturbations to (B,1,H,W) mask logits."""
        _, h, w = self.image_shape
        pw, ph = self.pad
        if pw or ph:
            delta = F.pad(delta, (0, pw, 0, ph))
        out = self.net(delta)
        return out[..., :h, :w]


class SingleValueSafeBatchNorm:
    """Mixin for BatchNorm classes: in train mode, an input with one value per channel uses the running statistics.

    Batch statistics of a single value do not exist (PyTorch raises "Expected more than 1 value
    per channel"). Such a layer sees one value per channel on every call of an attack run (the
    batch and image sizes are fixed), so its running statistics never leave their initial
    mean 0 / variance 1 and it acts as the affine map ``weight * x / sqrt(1 + eps) + bias``: the
    values and their gradients pass through, unnormalised. Every other input is normalised by its
    batch statistics exactly as before, so batches of two or more images are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch statistics, or the running ones for a single value per channel."""
        if self.training and x.numel() == x.shape[1]:
            self.training = False
            try:
                return super().forward(x)  # type: ignore[misc]
            finally:
                self.training = True
        return super().forward(x)  # type: ignore[misc]


_SAFE_NORMS: dict[type, type] = {}


def single_value_safe(module: nn.Module) -> nn.Module:
    """Give every BatchNorm of ``module`` the :class:`SingleValueSafeBatchNorm` behaviour (in place); return it."""
    for sub in module.modules():
        cls = type(sub)
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not isinstance(sub, SingleValueSafeBatchNorm):
            if cls not in _SAFE_NORMS:
                name = f"SingleValueSafe{cls.__name__}"
                _SAFE_NORMS[cls] = type(name, (SingleValueSafeBatchNorm, cls), {"__module__": __name__})
                globals().setdefault(name, _SAFE_NORMS[cls])  # importable by name, so pickling works
            sub.__class__ = _SAFE_NORMS[cls]
    return module


def init_from_generator(module: nn.Module, generator: torch.Generator) -> None:
    """(Re)initialise every parameter and buffer of ``module`` with PyTorch's defaults, drawn from ``generator``.

    Convolutions and linear layers get nn.Conv2d/nn.Linear's default (kaiming-uniform, a=sqrt(5);
    bias U(+-1/sqrt(fan_in))); normalisation layers get weight 1, bias 0 and fresh running stats.
    Any other parameterised module raises, so a new layer type cannot silently stay uninitialised.
    """
    with torch.no_grad():
        for sub in module.modules():
            own = list(sub.parameters(recurse=False))
            if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)):
                nn.init.kaiming_uniform_(sub.weight, a=math.sqrt(5), generator=generator)
                if sub.bias is not None:
                    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(sub.weight)
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(sub.bias, -bound, bound, generator=generator)
            elif isinstance(sub, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                sub.reset_parameters()
            elif own:
                raise TypeError(f"init_from_generator does not know how to initialise {type(sub).__name__}")


#: bytes per linear-encoder parameter during an attack: the fp32 weight, its gradient and Adam's two moments
LINEAR_BYTES_PER_PARAM = 16


def linear_encoder_bytes(image_shape: tuple[int, int, int], batch_size: int, scope: str = "batch") -> int:
    """Bytes the linear encoder holds during an attack: (C*H*W + 1) x H*W parameters (per image with scope image)."""
    c, h, w = image_shape
    copies = batch_size if scope == "image" else 1
    return (c * h * w + 1) * h * w * copies * LINEAR_BYTES_PER_PARAM


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: CUDA's free memory, Linux's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_linear_fits(image_shape: tuple[int, int, int], batch_size: int, scope: str, device: torch.device) -> None:
    """Refuse a linear encoder whose weights, gradient and Adam state exceed the memory free on ``device``.

    At 3x224x224 it has 7.6G parameters (121 GB during an attack); allocating it would fail or
    wake the out-of-memory killer only after the victim's clean pass.
    """
    need = linear_encoder_bytes(image_shape, batch_size, scope)
    free = free_memory_bytes(torch.device(device))
    if free is not None and need > free:
        c, h, w = image_shape
        params = need // LINEAR_BYTES_PER_PARAM
        raise AdvpipeError(
            f"encoder linear for {c}x{h}x{w} images needs {params / 1e9:.2f}G parameters, {need / 2**30:.1f} GiB "
            f"with their gradient and Adam state, more than the {free / 2**30:.1f} GiB free on {device}; use encoder "
            f"unet (the default above 32x32)" + (" or encoder_scope batch" if scope == "image" else ""),
            fields=("encoder",))


def _build_linear(image_shape: tuple[int, int, int], batch_size: int, scope: str, options: dict,
                  generator: torch.Generator, device: torch.device) -> nn.Module:
    if options:
        raise TypeError(f"linear encoder takes no options, got {sorted(options)}")
    check_linear_fits(image_shape, batch_size, scope, device)
    return LinearEncoder(image_shape, batch_size, scope, generator, device)


def _build_unet(image_shape: tuple[int, int, int], batch_size: int, scope: str, options: dict,
                generator: torch.Generator, device: torch.device) -> nn.Module:
    options = dict(options)
    backbone = options.pop("backbone", DEFAULT_UNET_BACKBONE)
    if options:
        raise TypeError(f"unknown U-Net encoder options {sorted(options)}; known: backbone")
    if scope != "batch":
        # B copies of a 6.6M-parameter U-Net plus Adam state do not fit a useful batch; see docs/attack.md.
        raise AdvpipeError(
            "encoder_scope='image' is supported for the linear encoder only; use encoder_scope='batch' with unet"
        )
    return UNetEncoder(image_shape, backbone, generator, device)


ENCODERS.register("linear", _build_linear)
ENCODERS.register("unet", _build_unet)


def build_encoder(name: str, image_shape: tuple[int, int, int], batch_size: int, *, scope: str = "batch",
                  options: dict | None = None, generator: torch.Generator, device: torch.device) -> nn.Module:
    """Build encoder ``name`` for (C,H,W) images, initialised from ``generator`` on ``device``."""
    if scope not in ("batch", "image"):
        raise AdvpipeError(f"unknown encoder_scope {scope!r}; choose one of: batch, image")
    return ENCODERS.get(name)(image_shape, batch_size, scope, dict(options or {}), generator, device)
