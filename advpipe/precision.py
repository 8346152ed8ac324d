"""Precision: the autocast context of a ``--precision`` value, shared by training, evaluation and precompute."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_context"]


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` (auto = fp16 on CUDA, fp32 on CPU); a no-op for fp32."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
