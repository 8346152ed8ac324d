"""Re-run the attack for a few chunks of a mask store from its own recorded configuration, and compare.

A store's provenance records everything its masks were made from: the dataset (name, split,
fingerprint, n), the checkpoint's sha256, every attack hyperparameter (with the batch size and the
autocast precision) and the seed. Every chunk draws its randomness from a generator seeded by
(seed, chunk index) (:func:`advpipe.rng.chunk_seed`), so re-attacking a chunk with the
same checkpoint and data reproduces its masks: bit for bit on the same device type with the same
thread count, and nearly so otherwise (float reductions differ between thread counts). A store
whose masks were swapped, rewritten or forged does not survive this, whatever its checksums and
manifest say. It is the only check that does not rely on trusting whoever wrote the store, but it
costs a real attack per chunk, so :func:`recompute_chunks` checks ``k`` randomly chosen chunks.

See docs/mask-store.md ("verify --recompute") for what this proves and its limits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advpipe.attacks.sparse_config import SparseAttackConfig
from advpipe.data.datasets import DatasetSplit
from advpipe.errors import AdvpipeError
from advpipe.models.checkpoint import load_checkpoint
from advpipe.pipeline.precompute_config import find_checkpoint
from advpipe.pipeline.precompute_runner import attack_images
from advpipe.pipeline.report import load_store_data
from advpipe.pipeline.codecs import sample_hash
from advpipe.pipeline.reader import MaskStore
from advpipe.progress import track
from advpipe.devices import resolve_device

__all__ = ["ChunkAgreement", "DEFAULT_MIN_AGREEMENT", "check_agreement", "recompute_chunks", "recorded_attack"]

#: the least Jaccard index (masks) and label agreement a recomputed chunk must reach when it is not
#: identical: an honest recompute with another thread count agrees on far more (docs/mask-store.md),
#: masks swapped between chunks or rewritten agree on far less
DEFAULT_MIN_AGREEMENT = 0.9
#: provenance keys of the attack section that are not SparseAttackConfig fields
_RUN_KEYS = ("name", "batch_size", "victim_train_data")


@dataclass(frozen=True)
class ChunkAgreement:
    """How a recomputed chunk compares with the stored one.

    ``jaccard`` is |stored ∩ recomputed| / |stored ∪ recomputed| over all mask pixels of the chunk
    (1.0 when both are empty); ``images_equal`` counts images whose masks are identical;
    ``labels_equal`` counts images whose stored label (the true label, or the attack's target)
    equals the recomputed one.
    """

    index: int
    start: int
    stop: int
    exact: bool
    jaccard: float
    images_equal: int
    labels_equal: int

    @property
    def n(self) -> int:
        """Number of images in the chunk."""
        return self.stop - self.start

    def passes(self, min_agreement: float = DEFAULT_MIN_AGREEMENT) -> bool:
        """Exact, or masks and labels agreeing on at least ``min_agreement``."""
        return self.exact or (self.jaccard >= min_agreement and self.labels_equal >= min_agreement * self.n)

    def describe(self) -> str:
        """One phrase: the chunk, its samples and how well it agrees."""
        where = f"chunk {self.index} (samples {self.start}-{self.stop - 1})"
        if self.exact:
            return f"{where}: identical"
        return (f"{where}: masks agree on {self.jaccard:.3f} of their pixels (Jaccard), {self.images_equal} of "
                f"{self.n} masks and {self.labels_equal} of {self.n} labels identical")


def recorded_attack(provenance: dict[str, Any]) -> tuple[SparseAttackConfig, int]:
    """The attack config and batch size a store records (its ``attack`` section); AdvpipeError if unusable."""
    attack = dict(provenance["attack"])
    if attack.get("name") != "advmask":
        raise AdvpipeError(f"the store records attack {str(attack.get('name'))[:40]!r}; only 'advmask' stores can "
                           "be recomputed")
    batch_size = attack.get("batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AdvpipeError(f"the store records no usable attack batch_size (got {batch_size!r:.40})")
    values = {k: v for k, v in attack.items() if k not in _RUN_KEYS}
    return SparseAttackConfig.from_dict(values, name="stored attack"), batch_size


def _chunk_data(store: MaskStore, data_dir: str | Path | None) -> DatasetSplit:
    ds = load_store_data(store, data_dir=None if data_dir is None else str(data_dir))
    recorded = store.provenance["dataset"]
    if len(ds) != store.n or ds.fingerprint != recorded["fingerprint"]:
        raise AdvpipeError(f"the {recorded['name']}/{recorded['split']} data found here ({len(ds)} samples, "
                           f"fingerprint {ds.fingerprint}) is not the store's ({store.n} samples, fingerprint "
                           f"{recorded['fingerprint']}); point data_dir at the data the store was made from")
    return ds


def _agreement(index: int, start: int, stop: int, stored: np.ndarray, labels: np.ndarray,
               out: dict[str, torch.Tensor]) -> ChunkAgreement:
    masks, new_labels = out["masks"].numpy().astype(bool), out["labels"].numpy()
    union = int((stored | masks).sum())
    jaccard = int((stored & masks).sum()) / union if union else 1.0
    same_images = int((stored == masks).reshape(len(masks), -1).all(1).sum())
    same_labels = int((labels == new_labels).sum())
    exact = same_images == len(masks) and same_labels == len(masks)
    return ChunkAgreement(index, start, stop, exact, jaccard, same_images, same_labels)


def recompute_chunks(store: MaskStore, k: int, *, checkpoint: str | Path | None = None,
                     data_dir: str | Path | None = None, device: str = "auto",
                     rng: random.Random | None = None) -> list[ChunkAgreement]:
    """Re-attack ``k`` randomly chosen chunks of a complete ``store`` and compare them with the stored ones.

    The attack, batch size, seed and precision come from the store's provenance; the checkpoint is
    found by its recorded sha256 (:func:`~advpipe.pipeline.precompute_config.find_checkpoint`) and the
    data by its recorded name, split and fingerprint under ``data_dir``. The chunks are drawn with
    ``rng`` (default: the operating system's randomness, so whoever wrote the store cannot know which
    ones). Returns one :class:`ChunkAgreement` per chunk, in index order; :func:`check_agreement` judges them.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise AdvpipeError(f"the number of chunks to recompute must be a positive integer, got {k!r}")
    if not store.complete:
        raise AdvpipeError("the store is not complete; only a finished store can be recomputed")
    prov = store.provenance
    attack, batch_size = recorded_attack(prov)
    ckpt_path = find_checkpoint(prov["dataset"]["name"], prov["model"]["arch"], checkpoint,
                                sha256=prov["model"]["checkpoint_sha256"])
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.image_size != store.image_shape[1]:
        raise AdvpipeError(f"the checkpoint expects {ckpt.image_size}px images, the store holds "
                           f"{store.image_shape[1]}px masks")
    from advpipe.models.build import model_from_checkpoint

    ds = _chunk_data(store, data_dir)
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt, source=str(ckpt_path)).to(dev).eval().requires_grad_(False)
    chosen = sorted((rng or random.SystemRandom()).sample(range(store.n_chunks), min(k, store.n_chunks)))
    stored_labels, stored_hashes = store.labels(), store.sample_hashes()
    results = []
    for index in track(chosen, "recomputing chunks"):
        start, stop = index * store.chunk_size, min((index + 1) * store.chunk_size, store.n)
        images = ds.load_images(range(start, stop))
        if not np.array_equal(sample_hash(images.numpy(), layout="NCHW"), stored_hashes[start:stop]):
            raise AdvpipeError(f"chunk {index}: the store's per-sample hashes do not match the data's images")
        out = attack_images(model, images, ds.labels[start:stop], attack, batch_size=batch_size,
                            seed=prov["seed"], index=index, device=dev)
        results.append(_agreement(index, start, stop, store.read_masks(start, stop), stored_labels[start:stop], out))
    return results


def _version_note(provenance: dict[str, Any] | None) -> str:
    """Which recorded library versions differ from this process's (floats, and so masks, may differ with them)."""
    from advpipe.pipeline.provenance import versions

    recorded = (provenance or {}).get("versions")
    if not isinstance(recorded, dict):
        return ""
    here = versions()
    changed = [f"{name} {str(recorded[name])[:20]} (here {here[name]})" for name in sorted(here)
               if name in recorded and recorded[name] != here[name]]
    return f"; the store was made with {', '.join(changed)}" if changed else ""


def check_agreement(results: list[ChunkAgreement], min_agreement: float = DEFAULT_MIN_AGREEMENT,
                    provenance: dict[str, Any] | None = None) -> None:
    """Raise AdvpipeError (one line, naming the chunks) if any recomputed chunk disagrees with the store.

    With the store's ``provenance``, the line also names recorded library versions that differ here.
    """
    bad = [r for r in results if not r.passes(min_agreement)]
    if bad:
        more = f" (and {len(bad) - 1} more of the {len(results)} recomputed)" if len(bad) > 1 else ""
        raise AdvpipeError(f"recomputed masks disagree with the store: {bad[0].describe()}{more}; an honest "
                           f"recompute on the store's device type and thread count agrees on at least "
                           f"{min_agreement:g}{_version_note(provenance)}")
