"""Precompute stage: run the AdvMask sparse attack over a dataset split into a mask store.

The store (docs/mask-store.md) is cut into chunks of ``chunk_size`` samples; one chunk is one unit
of work. :func:`precompute_masks` plans the pending chunks and hands each chunk index to exactly one
call of :func:`run_chunk`: either in this process (``workers=0``) or as one task on a
dask.distributed cluster (a local one it starts, or an existing scheduler); the running itself is
:func:`advpipe.pipeline.chunks.run_store`, shared with the library's precompute from objects. The task writes its
chunk straight into the store through the picklable writer, so a killed run loses only the chunks
in flight and the next run with the same configuration continues with the rest.

Reproducibility: every chunk draws its attack randomness from a generator seeded by (seed, chunk
index), never by worker, so the store does not depend on how many workers ran it or in which order
(on the same device type and thread count; float reductions differ between CPU thread counts and
between CPU and GPU). The batch size is part of the recorded attack configuration because the
attack's encoder is shared by the images of a batch (``encoder_scope="batch"``).

See docs/precompute.md for the command, how the model is found, and cluster setup.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advpipe.attacks.encoders import check_linear_fits
from advpipe.attacks.sparse import SparseAttackConfig
from advpipe.data.datasets import DatasetSplit, dataset_family, drawn_from, load_dataset
from advpipe.errors import AdvpipeError
from advpipe.models.checkpoint import Checkpoint, load_checkpoint
from advpipe.pipeline.chunks import (
    ChunkOutcome,
    ChunkTask,
    PrecomputeResult,
    StoreRun,
    attack_chunk,
    finished_chunk,
    run_store,
)
from advpipe.pipeline.precompute_config import (
    PrecomputeConfig,
    attack_config,
    check_config,
    default_store_path,
    find_checkpoint,
    resolve_precision,
)
from advpipe.pipeline.writer import MaskStoreWriter
from advpipe.devices import resolve_device
from advpipe.files import sha256_file

__all__ = ["ChunkJob", "precompute_masks", "run_chunk"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ChunkJob:
    """What a worker needs to attack any chunk of one run (pickled to every task)."""

    checkpoint: str
    checkpoint_sha256: str
    data: str
    split: str
    data_dir: str | None
    limit: int | None
    image_size: int
    fingerprint: str
    attack: SparseAttackConfig
    batch_size: int
    seed: int
    device: str


# --------------------------------------------------------------------------- worker side

# One model and one dataset per worker process, reused by every task the worker runs.
_MODEL_CACHE: dict[tuple[str, str], nn.Module] = {}
_DATA_CACHE: dict[tuple[Any, ...], DatasetSplit] = {}


def _data_key(job: ChunkJob) -> tuple[Any, ...]:
    return (job.data, job.split, job.data_dir, job.limit, job.image_size, job.fingerprint)


def _dataset(job: ChunkJob) -> DatasetSplit:
    key = _data_key(job)
    ds = _DATA_CACHE.get(key)
    if ds is None:
        ds = load_dataset(job.data, job.split, data_dir=job.data_dir, limit=job.limit, image_size=job.image_size)
        # A worker on another machine may see other files under the same path.
        if ds.fingerprint != job.fingerprint:
            raise AdvpipeError(
                f"this worker's {job.data}/{job.split} data (fingerprint {ds.fingerprint}) differs from the "
                f"run's ({job.fingerprint}); every worker must see the same data"
            )
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = ds
    return ds


def _model(job: ChunkJob, device: torch.device) -> nn.Module:
    from advpipe.models.build import model_from_checkpoint

    key = (job.checkpoint_sha256, str(device))
    model = _MODEL_CACHE.get(key)
    if model is None:
        if sha256_file(job.checkpoint) != job.checkpoint_sha256:
            raise AdvpipeError(f"checkpoint {job.checkpoint} changed since the run started (sha256 differs)")
        model = model_from_checkpoint(load_checkpoint(job.checkpoint), source=job.checkpoint)
        model = model.to(device).eval().requires_grad_(False)
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model
    return model


def run_chunk(job: ChunkJob, writer: MaskStoreWriter, index: int) -> ChunkOutcome:
    """Attack the samples of chunk ``index`` and write them into the store (one call per chunk, any process).

    Loads the model and dataset once per process (cached by checkpoint sha256 and device, and by
    the data's identity), seeds the attack's generator from (seed, index) and walks the chunk in
    batches of ``job.batch_size``. Stored labels are the labels the attack used: the true label,
    or the target of a targeted attack. The store refuses a chunk that is already done.
    """
    started = time.perf_counter()
    if (done := finished_chunk(writer, index, started)) is not None:
        return done
    device = resolve_device(job.device)
    ds = _dataset(job)
    model = _model(job, device)
    start, stop = writer.chunk_bounds(index)
    return attack_chunk(writer, index, model, ds.load_images(range(start, stop)), ds.labels[start:stop], job.attack,
                        batch_size=job.batch_size, seed=job.seed, device=device, started=started)


# --------------------------------------------------------------------------- the run


def _clean_accuracy(ckpt: Checkpoint, cfg: PrecomputeConfig, path: Path) -> float:
    """The checkpoint's recorded test accuracy, or (if missing) its accuracy measured on the test split."""
    acc = ckpt.metrics.get("test_acc")
    if isinstance(acc, (int, float)) and not isinstance(acc, bool) and 0.0 <= acc <= 1.0:
        return float(acc)
    from advpipe.data.loader import DeviceLoader
    from advpipe.models.accuracy import evaluate_accuracy
    from advpipe.models.build import model_from_checkpoint

    log.info("%s records no test accuracy; measuring it on %s/test", path, cfg.data)
    device = resolve_device(cfg.device)
    test = load_dataset(cfg.data, "test", data_dir=cfg.data_dir, image_size=ckpt.image_size)
    model = model_from_checkpoint(ckpt, source=str(path)).to(device).eval()
    # workers=0: no DataLoader processes are forked once zarr's event-loop thread may be running.
    loader = DeviceLoader(test, batch_size=max(cfg.batch_size, 256), device=device, train=False, workers=0)
    return float(evaluate_accuracy(model, loader, test.num_classes, description="clean accuracy", total=len(loader))["top1"])


def _check_fits(ckpt: Checkpoint, ds: DatasetSplit, path: Path, cfg: PrecomputeConfig, warnings: list[str]) -> None:
    if cfg.model is not None and ckpt.arch != cfg.model:
        raise AdvpipeError(f"{path} is a {ckpt.arch} checkpoint, but model is {cfg.model}", fields=("model",))
    if dataset_family(ckpt.dataset) != dataset_family(cfg.data):
        raise AdvpipeError(f"{path} was trained on {ckpt.dataset}, not on {cfg.data}; pass data {ckpt.dataset} "
                           "or a checkpoint trained on this dataset", fields=("data",))
    if ds.num_classes != ckpt.num_classes:
        raise AdvpipeError(f"{path} predicts {ckpt.num_classes} classes but {cfg.data} has {ds.num_classes}")
    if ds.image_shape[-1] != ckpt.image_size:
        raise AdvpipeError(f"{path} expects {ckpt.image_size}px images but {cfg.data} has {ds.image_shape[-1]}px")
    pretrained = ckpt.fingerprint.startswith("pretrained:")  # a pretrained_victim: its training data is unknown
    if cfg.split == "train" and cfg.limit is None and not pretrained and not drawn_from(ds, ckpt.fingerprint):
        # Legitimate when the model was trained with --limit (a prefix of the data); the store
        # records both fingerprints, so the difference stays visible.
        warnings.append(f"the checkpoint was trained on {ckpt.dataset} data with fingerprint {ckpt.fingerprint}, "
                        f"not on this train split ({ds.fingerprint}); was it trained with --limit?")


def _provenance(cfg: PrecomputeConfig, ckpt: Checkpoint, sha: str, accuracy: float, ds: DatasetSplit,
                attack: SparseAttackConfig) -> dict[str, Any]:
    return {
        "dataset": {"name": cfg.data, "split": cfg.split, "fingerprint": ds.fingerprint},
        "model": {"arch": ckpt.arch, "checkpoint_sha256": sha, "clean_accuracy": accuracy},
        "attack": {
            "name": "advmask",
            **attack.to_dict(),
            "batch_size": cfg.batch_size,
            # The store's model section has no slot for it; the victim's own training data is pinned
            # by the checkpoint sha256 anyway, so recording it here never blocks a resume.
            "victim_train_data": {"name": ckpt.dataset, "fingerprint": ckpt.fingerprint},
        },
        "seed": cfg.seed,
    }


def precompute_masks(cfg: PrecomputeConfig) -> PrecomputeResult:
    """Attack every pending chunk of the store ``cfg`` describes, then finalize it and return its summary.

    Refuses (AdvpipeError) bad settings, a missing or unfitting checkpoint, a store made for another
    configuration (unless ``overwrite``) and a store another process is writing. Re-running after
    an interruption resumes; re-running on a complete store with the same configuration just
    returns its summary.
    """
    check_config(cfg)
    attack = attack_config(cfg)
    if cfg.scheduler is None:
        resolve_device(cfg.device)  # fail early; with --scheduler the device is the workers' business
    ckpt_path = find_checkpoint(cfg).absolute()
    ckpt = load_checkpoint(ckpt_path)
    ds = load_dataset(cfg.data, cfg.split, data_dir=cfg.data_dir, limit=cfg.limit, image_size=ckpt.image_size)
    warnings: list[str] = []
    _check_fits(ckpt, ds, ckpt_path, cfg, warnings)
    for message in warnings:
        log.warning(message)
    attack = attack.resolve(tuple(ds.image_shape), dataset=cfg.data)  # record concrete values, not "auto"
    if attack.encoder == "linear" and cfg.scheduler is None:  # before the clean pass, not after it
        check_linear_fits(tuple(ds.image_shape), min(cfg.batch_size, cfg.chunk_size, len(ds)), attack.encoder_scope,
                          resolve_device(cfg.device))
    path = Path(cfg.out) if cfg.out else default_store_path(cfg, ckpt.arch, attack)
    path = path.absolute()
    attack = dataclasses.replace(attack, autocast_dtype=resolve_precision(cfg, path))
    sha = sha256_file(ckpt_path)
    provenance = _provenance(cfg, ckpt, sha, _clean_accuracy(ckpt, cfg, ckpt_path), ds, attack)
    job = ChunkJob(checkpoint=str(ckpt_path), checkpoint_sha256=sha, data=cfg.data, split=cfg.split,
                   data_dir=str(Path(cfg.data_dir).absolute()) if cfg.data_dir else None, limit=cfg.limit,
                   image_size=ckpt.image_size, fingerprint=ds.fingerprint, attack=attack,
                   batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device)

    def make_task(device: str, in_process: bool) -> ChunkTask:
        if in_process:
            _DATA_CACHE.clear()
            _DATA_CACHE[_data_key(job)] = ds  # reuse the split already in memory
        return functools.partial(run_chunk, dataclasses.replace(job, device=device))

    run = StoreRun(path, len(ds), tuple(ds.image_shape), cfg.chunk_size, provenance, overwrite=cfg.overwrite,
                   workers=cfg.workers, scheduler=cfg.scheduler, device=cfg.device)
    return run_store(run, make_task, warnings)
