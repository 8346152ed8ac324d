"""Precision: the autocast context of a ``--precision`` value, shared by training, evaluation and precompute."""

from __future__ import annotations

import contextlib
import logging

import torch

from advpipe.devices import fast_bf16

__all__ = ["autocast_context", "effective_precision"]

log = logging.getLogger(__name__)


def effective_precision(device: torch.device, precision: str) -> str:
    """The precision that ``precision`` means on ``device`` (auto = fp16 on CUDA, fp32 elsewhere).

    bf16 asked for on a device that only emulates it (a CPU without AVX-512 BF16 or AMX) is kept, with a
    warning: there it runs about 10x slower than fp32 (benchmarks/README.md, "CPUs without native bf16").
    """
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cpu" and not fast_bf16(device):
        log.warning("bf16 on this CPU is emulated (no AVX-512 BF16 or AMX): expect it to run about 10x slower "
                    "than fp32; --precision auto or fp32 is faster here")
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` (auto = fp16 on CUDA, fp32 on CPU); a no-op for fp32."""
    if precision == "auto":
        precision = effective_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
