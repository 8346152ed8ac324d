"""Devices: resolve a ``--device`` name and tell whether a device computes bfloat16 natively."""

from __future__ import annotations

import torch

from advpipe.errors import AdvpipeError

__all__ = ["fast_bf16", "resolve_device"]


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name``: ``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    # meta, xla, ... parse but cannot train or evaluate (meta tensors hold no data)
    if device is None or device.type not in ("cpu", "cuda"):
        raise AdvpipeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdvpipeError(f"device {name!r} requested but CUDA is not available; use device cpu or auto",
                           fields=("device",))
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA GPUs since Ampere; CPUs with AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False
