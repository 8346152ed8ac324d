"""The precompute stage on objects: your ``nn.Module`` and your dataset, into the same mask store.

``advpipe precompute-masks`` finds its victim and data by name
(:mod:`advpipe.pipeline.precompute`). :func:`precompute_masks` here takes them as objects and
runs them through the same machinery (:func:`advpipe.pipeline.chunks.run_store`): the same store
format and provenance, one chunk per task in this process or on dask, the same per-chunk seeds,
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
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from advpipe.attacks.sparse import SparseAttackConfig
from advpipe.data.batch import Batch
from advpipe.data.user import as_tensors, fingerprint_tensors
from advpipe.errors import AdvpipeError
from advpipe.models.accuracy import evaluate_accuracy
from advpipe.models.normalize import unwrap
from advpipe.pipeline.chunks import (
    ChunkOutcome,
    PrecomputeResult,
    StoreRun,
    attack_chunk,
    finished_chunk,
    run_store,
)
from advpipe.pipeline.precompute_config import DEFAULT_BATCH_SIZE, check_run_options
from advpipe.pipeline.writer import DEFAULT_CHUNK_SIZE, MaskStoreWriter
from advpipe.devices import resolve_device

__all__ = ["PrecomputeResult", "TensorChunkTask", "model_sha256", "precompute_masks"]

log = logging.getLogger(__name__)


def model_sha256(model: nn.Module) -> str:
    """A hex sha256 over ``model.state_dict()``: names, dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TensorChunkTask:
    """A chunk task over in-memory tensors (picklable, so dask sends it to each worker once).

    The model is copied before it is moved to the device and put in eval mode, so the caller's
    model keeps its device, mode and ``requires_grad`` flags.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: SparseAttackConfig,
                 *, batch_size: int, seed: int, device: str) -> None:
        """Hold what every chunk needs; nothing runs until the task is called."""
        self.model, self.images, self.labels, self.attack = model, images, labels, attack
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self._ready: tuple[torch.device, nn.Module] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ready": None}

    def _victim(self) -> tuple[torch.device, nn.Module]:
        if self._ready is None:
            device = resolve_device(self.device)
            victim = copy.deepcopy(self.model).to(device).eval().requires_grad_(False)
            self._ready = (device, victim)
        return self._ready

    def __call__(self, writer: MaskStoreWriter, index: int) -> ChunkOutcome:
        """Attack chunk ``index`` and write it (a chunk already done is reported, not redone)."""
        started = time.perf_counter()
        if (done := finished_chunk(writer, index, started)) is not None:
            return done
        device, victim = self._victim()
        start, stop = writer.chunk_bounds(index)
        return attack_chunk(writer, index, victim, self.images[start:stop], self.labels[start:stop], self.attack,
                            batch_size=self.batch_size, seed=self.seed, device=device, started=started)


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: str) -> float:
    """Top-1 of ``model`` on the given images in fp32 (on a copy, so the caller's model is untouched)."""
    dev = resolve_device(device)
    victim = copy.deepcopy(model).to(dev).eval()
    batches = (Batch(_floats(images[i : i + batch_size].to(dev)), labels[i : i + batch_size].to(dev),
                     torch.arange(i, min(i + batch_size, len(images)), device=dev))
               for i in range(0, len(images), batch_size))
    total = -(-len(images) // batch_size)
    return float(evaluate_accuracy(victim, batches, int(labels.max()) + 1, description="clean accuracy",
                                   total=total)["top1"])


def _floats(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _check(batch_size: int, chunk_size: int, workers: int | None, scheduler: str | None, seed: int,
           clean_accuracy: float | None) -> None:
    check_run_options(batch_size, chunk_size, workers, scheduler, seed)
    if clean_accuracy is not None and not 0.0 <= clean_accuracy <= 1.0:
        raise AdvpipeError(f"clean_accuracy must be a fraction in [0, 1], got {clean_accuracy!r}")


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
    _check(batch_size, chunk_size, workers, scheduler, seed, clean_accuracy)
    if scheduler is None:
        resolve_device(device)  # fail early; with a scheduler the device is the workers' business
    images, labels = as_tensors(data)
    image_shape = tuple(images.shape[1:])
    attack = attack.resolve(image_shape, dataset=name)  # record concrete values, not "auto"
    sha = model_sha256(model)
    if clean_accuracy is None:
        clean_accuracy = _accuracy(model, images, labels, max(batch_size, 256), "cpu" if scheduler else device)
    provenance = {
        "dataset": {"name": name, "split": split, "fingerprint": fingerprint_tensors(images, labels)},
        "model": {"arch": arch or type(unwrap(model)).__name__, "checkpoint_sha256": sha,
                  "clean_accuracy": clean_accuracy},
        "attack": {"name": "advmask", **attack.to_dict(), "batch_size": batch_size},
        "seed": seed,
    }

    def make_task(task_device: str, in_process: bool) -> TensorChunkTask:
        return TensorChunkTask(model, images, labels, attack, batch_size=batch_size, seed=seed, device=task_device)

    run = StoreRun(Path(out).absolute(), len(images), image_shape, chunk_size, provenance, overwrite=overwrite,
                   workers=workers, scheduler=scheduler, device=device)
    return run_store(run, make_task)
