"""The one precompute runner: a mask store's pending chunks, run by one chunk task, whatever the victim and data.

The command's :func:`advpipe.pipeline.precompute.precompute_masks` (a checkpoint and a dataset by
name) and the library's :func:`advpipe.pipeline.precompute_tensors.precompute_masks` (an ``nn.Module``
and tensors) both describe their run as a :class:`StoreRun` plus a :class:`ChunkTask`, which builds its
victim and data once per process and attacks one chunk per call. :func:`run_store` then does the rest
the same way for both: refuse or resume the store, run each pending chunk once (in this process, or as
one dask task per chunk), report progress and finalize. :func:`measure_accuracy` measures both victims.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from advpipe.attacks.sparse import sparse_attack
from advpipe.attacks.sparse_config import SparseAttackConfig
from advpipe.cluster import dask_cluster
from advpipe.data.batch import Batch
from advpipe.data.datasets import DatasetSplit
from advpipe.data.loader import DeviceLoader
from advpipe.data.user import to_uint8
from advpipe.devices import resolve_device
from advpipe.errors import AdvpipeError
from advpipe.models.accuracy import evaluate_accuracy
from advpipe.pipeline.codecs import METRICS, sample_hash
from advpipe.pipeline.reader import open_store
from advpipe.pipeline.writer import MaskStoreWriter, create_store
from advpipe.progress import task
from advpipe.rng import chunk_seed

__all__ = ["ChunkOutcome", "ChunkTask", "PrecomputeResult", "StoreRun", "attack_images", "measure_accuracy",
           "run_store"]

log = logging.getLogger(__name__)

#: what a chunk task reads a chunk from: a dataset split, or (N,C,H,W) images and (N,) labels
ChunkData = DatasetSplit | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ChunkOutcome:
    """What one finished chunk reports back to the runner."""

    index: int
    n_images: int
    n_success: int
    seconds: float


@dataclass
class PrecomputeResult:
    """A finished run: where the store is, its summary and how much work this invocation did."""

    path: Path
    summary: dict[str, Any]
    provenance: dict[str, Any]
    n_chunks: int
    chunks_run: int
    chunks_already_done: int
    images_run: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StoreRun:
    """Where and how to run a store's chunks.

    ``provenance`` is the store's caller section (see :func:`advpipe.pipeline.provenance.new_attrs`).
    ``workers`` = 0 runs in this process, None = one dask worker per visible GPU (one on CPU);
    ``scheduler`` is the address of an existing dask scheduler. A refused overwrite names the field
    ``overwrite`` (:class:`advpipe.errors.OverwriteRefused`; the command line writes it ``--overwrite``).
    """

    path: Path
    n: int
    image_shape: tuple[int, int, int]
    chunk_size: int
    provenance: dict[str, Any]
    overwrite: bool = False
    workers: int | None = 0
    scheduler: str | None = None
    device: str = "auto"


class ChunkTask:
    """The chunk task of every precompute run: ``task(writer, index)`` attacks chunk ``index`` and writes it.

    ``victim()`` builds the model to attack; ``data`` is a :data:`ChunkData` (images uint8, or floats in
    [0,1]) or a function that loads one. Each process builds the victim (on the device, in eval mode,
    without gradients) and loads the data once, on its first chunk, and keeps them with the task; the
    task pickles without them, so dask sends it to each worker once. A chunk already done is reported,
    not redone.
    """

    def __init__(self, victim: Callable[[], nn.Module], data: ChunkData | Callable[[], ChunkData],
                 attack: SparseAttackConfig, *, batch_size: int, seed: int, device: str) -> None:
        """Hold what every chunk needs; nothing runs until the task is called."""
        self.victim, self.data, self.attack = victim, data, attack
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self._loaded: tuple[torch.device, nn.Module, ChunkData] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}

    def _load(self) -> tuple[torch.device, nn.Module, ChunkData]:
        if self._loaded is None:
            device = resolve_device(self.device)
            data = self.data() if callable(self.data) else self.data
            self._loaded = (device, self.victim().to(device).eval().requires_grad_(False), data)
        return self._loaded

    def __call__(self, writer: MaskStoreWriter, index: int) -> ChunkOutcome:
        """Attack chunk ``index`` and write its masks, the labels the attack used, per-sample hashes and metrics."""
        started = time.perf_counter()
        start, stop = writer.chunk_bounds(index)
        if index not in writer.pending_chunks():
            # A worker that died after its chunk was marked done gets rescheduled by dask; the store keeps
            # the first result, so report it instead of attacking again.
            done = open_store(writer.path).metrics()["success"][start:stop]
            return ChunkOutcome(index, stop - start, int(done.sum()), time.perf_counter() - started)
        device, model, data = self._load()
        images, labels = _rows(data, start, stop)
        out = attack_images(model, images, labels, self.attack, batch_size=self.batch_size, seed=self.seed,
                            index=index, device=device)
        hashes = sample_hash(to_uint8(images.cpu()).numpy(), layout="NCHW")  # floats: to the nearest 1/255
        writer.write_chunk(index, out["masks"], out["labels"], hashes, {name: out[name] for name in METRICS})
        return ChunkOutcome(index, len(images), int(out["success"].sum()), time.perf_counter() - started)


def _rows(data: ChunkData, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, DatasetSplit):
        return data.load_images(range(start, stop)), data.labels[start:stop]
    return data[0][start:stop], data[1][start:stop]


def attack_images(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: SparseAttackConfig, *,
                  batch_size: int, seed: int, index: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Attack the images of chunk ``index`` in batches as a store records them: masks, labels and metrics (CPU).

    The generator is seeded from (seed, index), so the same chunk, configuration, device type and
    thread count give the same result (what ``advpipe masks verify --recompute`` relies on).
    """
    generator = torch.Generator(device=device).manual_seed(chunk_seed(seed, index))
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("masks", "labels", *METRICS)}
    for b in range(0, len(images), batch_size):
        y = labels[b : b + batch_size].to(device)
        res = sparse_attack(model, _floats(images[b : b + batch_size].to(device)), y, attack, generator=generator)
        used = res.targets if attack.targeted and res.targets is not None else y
        for name, value in (("masks", res.mask), ("labels", used), ("success", res.success),
                            ("clean_correct", res.clean_correct), ("l0", res.l0_elements), ("l0_pixels", res.l0_pixels),
                            ("l2", res.l2), ("linf", res.linf), ("loss", res.loss)):
            parts[name].append(value.detach().cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


def _floats(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def measure_accuracy(victim: Callable[[], nn.Module], data: ChunkData, *, batch_size: int, device: str) -> float:
    """Top-1 in fp32 of the model ``victim()`` builds, on ``data`` (through the evaluation loader for a split)."""
    dev = resolve_device(device)
    model = victim().to(dev).eval()
    if isinstance(data, DatasetSplit):
        # workers=0: no DataLoader processes are forked once zarr's event-loop thread may be running.
        batches: Iterable[Batch] = DeviceLoader(data, batch_size=batch_size, device=dev, train=False, workers=0)
        num_classes, n = data.num_classes, len(data)
    else:
        images, labels = data
        batches = (Batch(_floats(images[i : i + batch_size].to(dev)), labels[i : i + batch_size].to(dev),
                         torch.arange(i, min(i + batch_size, len(images)), device=dev))
                   for i in range(0, len(images), batch_size))
        num_classes, n = int(labels.max()) + 1, len(images)
    return float(evaluate_accuracy(model, batches, num_classes, description="clean accuracy",
                                   total=-(-n // batch_size))["top1"])


def _complete_with_same_config(run: StoreRun) -> Any:
    """Return the store at ``run.path`` if it is complete and was made with exactly this configuration."""
    from advpipe.pipeline.provenance import config_diff, config_of, new_attrs

    if not (run.path / "zarr.json").is_file():
        return None
    try:
        store = open_store(run.path)
    except AdvpipeError:
        return None  # create_store reports what is wrong with it
    if not store.complete:
        return None
    wanted = new_attrs(run.provenance, n=run.n, image_shape=run.image_shape, chunk_size=run.chunk_size)
    return None if config_diff(config_of(store.provenance), config_of(wanted)) else store


def _call(chunk_task: ChunkTask, writer: MaskStoreWriter, index: int) -> ChunkOutcome:
    return chunk_task(writer, index)


def _run_dask(client: Any, chunk_task: ChunkTask, writer: MaskStoreWriter, pending: list[int],
              on_done: Callable[[ChunkOutcome], None]) -> None:
    from distributed import as_completed

    run = uuid.uuid4().hex[:8]
    # The task (its model and data) goes to every worker once, not once per chunk.
    shared = client.scatter(chunk_task, broadcast=True, hash=False)
    # One task per chunk index, each submitted once: no two tasks ever write the same chunk.
    futures = [client.submit(_call, shared, writer, i, key=f"advpipe-chunk-{i}-{run}", pure=False) for i in pending]
    try:
        for future in as_completed(futures):
            on_done(future.result())
    finally:
        unfinished = [f for f in futures if not f.done()]
        if unfinished:
            client.cancel(unfinished)


def run_store(run: StoreRun, make_task: Callable[[str, bool], ChunkTask],
              warnings: list[str] | None = None) -> PrecomputeResult:
    """Run every pending chunk of the store ``run`` describes, finalize it and return its summary.

    ``make_task(device, in_process)`` builds the chunk task for the device string the chunks run on
    (``run.device`` in this process, or the dask workers' device). Refuses (AdvpipeError) a store
    made for another configuration unless ``overwrite`` and a store another process is writing;
    resumes an interrupted one; a complete store of the same configuration just returns its summary.
    """
    warnings = list(warnings or [])
    started = time.perf_counter()
    if not run.overwrite and (done := _complete_with_same_config(run)) is not None:
        log.info("%s is already complete for this configuration", run.path)
        return PrecomputeResult(run.path, done.provenance["summary"], done.provenance, done.n_chunks, 0, done.n_chunks,
                                0, 0.0, warnings)
    cluster = functools.partial(dask_cluster, run.scheduler, run.device, run.workers)
    with contextlib.ExitStack() as stack:
        # An unreachable scheduler should fail before a store is created; a local cluster is only
        # started once the store has accepted the configuration and there is work to do.
        remote = stack.enter_context(cluster()) if run.scheduler is not None else None
        writer = create_store(run.path, n=run.n, image_shape=run.image_shape, chunk_size=run.chunk_size,
                              provenance=run.provenance, overwrite=run.overwrite)
        stack.enter_context(writer)  # releases the lock on any exit; chunks done so far stay done
        pending = writer.pending_chunks()
        images_pending = sum(b - a for a, b in map(writer.chunk_bounds, pending))
        counts = {"chunks": 0, "images": 0}
        with task("precompute masks", total=images_pending, unit="img") as bar:
            compute_started = time.perf_counter()

            def on_done(outcome: ChunkOutcome) -> None:
                counts["chunks"] += 1
                counts["images"] += outcome.n_images
                rate = counts["images"] / max(time.perf_counter() - compute_started, 1e-9)
                bar.advance(outcome.n_images, chunks=f"{counts['chunks']}/{len(pending)}", **{"img/s": f"{rate:.2f}"})

            if pending and run.workers == 0:
                local = make_task(run.device, True)
                for i in pending:
                    on_done(local(writer, i))
            elif pending:
                client, worker_device = remote or stack.enter_context(cluster())
                _run_dask(client, make_task(worker_device, False), writer, pending, on_done)
        summary = writer.finalize()
        provenance_out = open_store(run.path).provenance
    return PrecomputeResult(run.path, summary, provenance_out, writer.n_chunks, len(pending),
                            writer.n_chunks - len(pending), counts["images"], time.perf_counter() - started, warnings)
