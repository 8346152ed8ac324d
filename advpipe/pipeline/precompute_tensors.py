"""The precompute stage on objects: your ``nn.Module`` and your dataset, into the same mask store.

``advpipe precompute-masks`` finds its victim and data by name
(:mod:`advpipe.pipeline.precompute`). :func:`precompute_masks` here takes them as objects and
runs them through the same runner (:mod:`advpipe.pipeline.precompute_runner`): the same chunk task,
store format and provenance, one chunk per task in this process or on dask, the same per-chunk seeds,
and resume. Run it again with the same model, data and settings to continue an interrupted run.

Identity for resume and provenance: the model is named by a sha256 over its ``state_dict``
(parameter and buffer names, dtypes, shapes and bytes), the data by
:func:`advpipe.data.user.fingerprint_tensors`. A changed weight or image is another configuration.

Example::

    result = precompute_masks(model, (images, labels), "masks/mine.zarr",
                              attack=SparseAttackConfig(steps=200, lambda_rule="adaptive"))
    result.summary["asr"]
"""

from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from advpipe.attacks.sparse_config import SparseAttackConfig
from advpipe.data.user import as_tensors, fingerprint_tensors
from advpipe.devices import resolve_device
from advpipe.errors import AdvpipeError
from advpipe.models.normalize import unwrap
from advpipe.pipeline.precompute_config import DEFAULT_BATCH_SIZE, check_run_options
from advpipe.pipeline.precompute_runner import ChunkTask, PrecomputeResult, StoreRun, measure_accuracy, run_store
from advpipe.pipeline.writer import DEFAULT_CHUNK_SIZE

__all__ = ["model_sha256", "precompute_masks"]


def model_sha256(model: nn.Module) -> str:
    """A hex sha256 over ``model.state_dict()``: names, dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def precompute_masks(model: nn.Module, data: Dataset | Sequence[Any], out: str | Path, *,
                     attack: SparseAttackConfig | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, workers: int | None = 0, scheduler: str | None = None,
                     device: str = "auto", seed: int = 0, overwrite: bool = False, name: str = "custom",
                     split: str = "train", arch: str | None = None,
                     clean_accuracy: float | None = None) -> PrecomputeResult:
    """Run the AdvMask sparse attack of ``model`` over ``data`` into the mask store at ``out``; resumable.

    ``model`` maps (B,C,H,W) images in [0,1] to logits (normalization inside it). ``data`` is a
    map-style dataset whose items start with ``(image, label)`` or a pair ``(images, labels)``
    (see :func:`advpipe.data.user.as_tensors`); it is read into memory once, and sample ``i`` of it
    gets mask ``i``. ``attack`` defaults to ``SparseAttackConfig()`` (its ``autocast_dtype`` sets
    the precision). ``workers=0`` runs in this process; a positive number or None (one per GPU)
    starts a local dask cluster; ``scheduler`` uses an existing one (the model and data are sent
    to every worker once). ``name``/``split`` label the data in the provenance (a paper dataset's
    ``name`` also picks its ``alpha_max``: :data:`~advpipe.attacks.sparse_config.PAPER_ALPHA_MAX`),
    ``arch`` the model (default: its class name, inside a :class:`~advpipe.models.normalize.Normalized`);
    ``clean_accuracy`` is recorded as given, else measured on ``data``.
    A store made for another configuration is refused unless ``overwrite``.
    """
    if not isinstance(model, nn.Module):
        raise AdvpipeError(f"model must be a torch.nn.Module mapping [0,1] images to logits, "
                           f"got {type(model).__name__}")
    attack = SparseAttackConfig() if attack is None else attack
    if not isinstance(attack, SparseAttackConfig):
        raise AdvpipeError(f"attack must be a SparseAttackConfig, got {type(attack).__name__}")
    check_run_options(batch_size, chunk_size, workers, scheduler, seed)
    if clean_accuracy is not None and not 0.0 <= clean_accuracy <= 1.0:
        raise AdvpipeError(f"clean_accuracy must be a fraction in [0, 1], got {clean_accuracy!r}")
    if scheduler is None:
        resolve_device(device)  # fail early; with a scheduler the device is the workers' business
    images, labels = as_tensors(data)
    image_shape = tuple(images.shape[1:])
    attack = attack.resolve(image_shape, dataset=name)  # record concrete values, not "auto"
    sha = model_sha256(model)
    victim = functools.partial(copy.deepcopy, model)  # the caller's model keeps its device, mode and flags
    if clean_accuracy is None:
        clean_accuracy = measure_accuracy(victim, (images, labels), batch_size=max(batch_size, 256),
                                          device="cpu" if scheduler else device)
    provenance = {
        "dataset": {"name": name, "split": split, "fingerprint": fingerprint_tensors(images, labels)},
        "model": {"arch": arch or type(unwrap(model)).__name__, "checkpoint_sha256": sha,
                  "clean_accuracy": clean_accuracy},
        "attack": {"name": "advmask", **attack.to_dict(), "batch_size": batch_size},
        "seed": seed,
    }

    def make_task(task_device: str, in_process: bool) -> ChunkTask:
        return ChunkTask(victim, (images, labels), attack, batch_size=batch_size, seed=seed, device=task_device)

    run = StoreRun(Path(out).absolute(), len(images), image_shape, chunk_size, provenance, overwrite=overwrite,
                   workers=workers, scheduler=scheduler, device=device)
    return run_store(run, make_task)
