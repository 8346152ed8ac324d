"""Precompute stage: run the AdvMask sparse attack over a dataset split into a mask store.

The store (docs/mask-store.md) is cut into chunks of ``chunk_size`` samples; one chunk is one unit
of work. :func:`precompute_masks` plans the pending chunks and hands each chunk index to exactly one
call of the chunk task (:class:`~advpipe.pipeline.precompute_runner.ChunkTask`): either in this process
(``workers=0``) or as one task on a dask.distributed cluster (a local one it starts, or an existing
scheduler); the running itself is :func:`advpipe.pipeline.precompute_runner.run_store`, shared with the
library's precompute from tensors. The task writes its chunk straight into the store through the
picklable writer, so a killed run loses only the chunks in flight and the next run with the same
configuration continues with the rest.

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
from pathlib import Path
from typing import Any

from torch import nn

from advpipe.attacks.encoders import check_linear_fits
from advpipe.attacks.sparse_config import SparseAttackConfig
from advpipe.data.datasets import DatasetSplit, dataset_family, drawn_from, load_dataset
from advpipe.devices import resolve_device
from advpipe.errors import AdvpipeError
from advpipe.files import sha256_file
from advpipe.models.build import model_from_checkpoint
from advpipe.models.checkpoint import Checkpoint, load_checkpoint
from advpipe.pipeline.precompute_config import (PrecomputeConfig, attack_config, check_config, default_store_path,
                                                find_checkpoint, pretrained_victim, resolve_precision)
from advpipe.pipeline.precompute_runner import ChunkTask, PrecomputeResult, StoreRun, measure_accuracy, run_store

__all__ = ["checkpoint_victim", "precompute_masks", "worker_split"]

log = logging.getLogger(__name__)


def checkpoint_victim(path: str, sha256: str) -> nn.Module:
    """The model of the checkpoint at ``path``; AdvpipeError if the file changed since the run started."""
    if sha256_file(path) != sha256:
        raise AdvpipeError(f"checkpoint {path} changed since the run started (sha256 differs)")
    return model_from_checkpoint(load_checkpoint(path), source=path)


def worker_split(name: str, split: str, data_dir: str | None, limit: int | None, image_size: int,
                 fingerprint: str) -> DatasetSplit:
    """Load the run's split on a worker; AdvpipeError unless it has the run's ``fingerprint``."""
    ds = load_dataset(name, split, data_dir=data_dir, limit=limit, image_size=image_size)
    # A worker on another machine may see other files under the same path.
    if ds.fingerprint != fingerprint:
        raise AdvpipeError(f"this worker's {name}/{split} data (fingerprint {ds.fingerprint}) differs from the "
                           f"run's ({fingerprint}); every worker must see the same data")
    return ds


def _clean_accuracy(ckpt: Checkpoint, cfg: PrecomputeConfig, path: Path) -> float:
    """The checkpoint's recorded test accuracy, or (if missing) its accuracy measured on the test split."""
    acc = ckpt.metrics.get("test_acc")
    if isinstance(acc, (int, float)) and not isinstance(acc, bool) and 0.0 <= acc <= 1.0:
        return float(acc)
    log.info("%s records no test accuracy; measuring it on %s/test", path, cfg.data)
    test = load_dataset(cfg.data, "test", data_dir=cfg.data_dir, image_size=ckpt.image_size)
    return measure_accuracy(functools.partial(model_from_checkpoint, ckpt, source=str(path)), test,
                            batch_size=max(cfg.batch_size, 256), device=cfg.device)


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
    ckpt_path = (pretrained_victim(cfg) if cfg.pretrained is not None
                 else find_checkpoint(cfg.data, cfg.model, cfg.checkpoint)).absolute()
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
    victim = functools.partial(checkpoint_victim, str(ckpt_path), sha)
    data_dir = str(Path(cfg.data_dir).absolute()) if cfg.data_dir else None

    def make_task(device: str, in_process: bool) -> ChunkTask:
        # in this process, the split already in memory; on a worker, the same split loaded there
        data = ds if in_process else functools.partial(worker_split, cfg.data, cfg.split, data_dir, cfg.limit,
                                                       ckpt.image_size, ds.fingerprint)
        return ChunkTask(victim, data, attack, batch_size=cfg.batch_size, seed=cfg.seed, device=device)

    run = StoreRun(path, len(ds), tuple(ds.image_shape), cfg.chunk_size, provenance, overwrite=cfg.overwrite,
                   workers=cfg.workers, scheduler=cfg.scheduler, device=cfg.device)
    return run_store(run, make_task, warnings)
