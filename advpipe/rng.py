"""Randomness: one place for generators and for the seeds derived from a run's seed.

Everything random in advpipe draws from an explicit ``torch.Generator``, never the global RNG.
:func:`generator_for` is the one way to take a caller's generator or make a default one. The
three seed derivations each serve a record that must stay reproducible, so each keeps its formula:

* :func:`epoch_seed`: training (data order, augmentation draws) per epoch and stream;
* :func:`stream_seed`: evaluation, one stream per perturbation, independent of which others run;
* :func:`chunk_seed`: precompute, one stream per store chunk, so a store never depends on the
  workers that wrote it (changing it would make every existing store fail ``verify --recompute``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_MAX = 2**63 - 1


def check_generator(generator: torch.Generator, device: torch.device | str) -> None:
    """Raise ValueError unless ``generator`` lives on ``device`` (an unindexed device matches any index)."""
    device = torch.device(device)
    gen_device = torch.device(generator.device)
    same = gen_device.type == device.type and (
        gen_device.index is None or device.index is None or gen_device.index == device.index
    )
    if not same:
        raise ValueError(f"generator is on {gen_device} but the tensors are on {device}")


def generator_for(device: torch.device | str | None, generator: torch.Generator | None = None) -> torch.Generator:
    """The caller's generator (checked to be on ``device``), or a fresh one with PyTorch's default seed."""
    device = torch.device(device if device is not None else "cpu")
    if generator is None:
        return torch.Generator(device=device)
    check_generator(generator, device)
    return generator


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """Derive a distinct, stable 63-bit seed for one epoch and one random stream."""
    return (seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % _MAX


def stream_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed for one perturbation, independent of which others run and their order."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % _MAX


def chunk_seed(seed: int, index: int) -> int:
    """The 63-bit seed of chunk ``index``: a hash of (seed, index), so it never depends on the worker."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & _MAX
