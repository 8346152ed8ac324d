"""A validation split held out of the training split: fixed by seed, fingerprinted.

The held-out samples keep their dataset indices, so per-sample side data (attack masks) still
lines up; the loader is simply restricted to the remaining indices (``DeviceLoader(indices=...)``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from advpipe.rng import epoch_seed
from advpipe.errors import AdvpipeError

#: the random stream of the validation draw, apart from the loader's and the augmentations' streams
_VAL_STREAM = 97
#: the fixed seed of the per-epoch test subset: every run and seed is monitored on the same images
_TEST_SUBSET_SEED = 20261207


@dataclass(frozen=True)
class HoldOut:
    """Training and validation dataset indices (sorted) and a fingerprint naming the split."""

    train: torch.Tensor
    val: torch.Tensor
    fingerprint: str


def hold_out(n: int, val_size: int, seed: int, data_fingerprint: str) -> HoldOut:
    """Hold ``val_size`` of ``n`` samples out, drawn by ``seed``; the fingerprint covers the data and the draw."""
    if not 0 < val_size < n:
        raise AdvpipeError(f"val_size must be between 1 and {n - 1} (the training split has {n} samples), "
                           f"got {val_size}")
    gen = torch.Generator().manual_seed(epoch_seed(seed, 0, stream=_VAL_STREAM))
    perm = torch.randperm(n, generator=gen)
    val, train = perm[:val_size].sort().values, perm[val_size:].sort().values
    h = hashlib.sha256(f"advpipe-val1|{data_fingerprint}|{n}|".encode())
    h.update(val.numpy().astype("<i8").tobytes())
    return HoldOut(train, val, "sha256:" + h.hexdigest())


def fixed_test_subset(n: int, size: int | None) -> torch.Tensor | None:
    """A fixed random subset of ``size`` of ``n`` test indices (sorted), the same for every run; None for all."""
    if not size or size >= n:
        return None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_TEST_SUBSET_SEED))
    return perm[:size].sort().values
