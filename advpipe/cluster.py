"""Dask clusters for long work (precompute chunks, study runs): a local one or an existing scheduler.

A local cluster has one worker process per visible GPU by default (worker i sees only GPU i
through ``CUDA_VISIBLE_DEVICES``), or ``workers`` CPU processes that share the cores. Workers are
spawned, never forked: a forked worker would inherit zarr's event-loop thread and torch's thread
pools in a broken state and can deadlock.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import torch

from advpipe.errors import AdvpipeError
from advpipe.devices import resolve_device

log = logging.getLogger(__name__)

#: seconds a local cluster's workers get to start
WORKER_START_TIMEOUT = 180
#: seconds to reach an existing scheduler, and to wait for its first worker
SCHEDULER_TIMEOUT, FIRST_WORKER_TIMEOUT = 30, 120


def visible_gpus() -> list[str]:
    """The GPU ids this process may use (``CUDA_VISIBLE_DEVICES`` or all that torch sees)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip()]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_local_workers(device: str, workers: int | None) -> tuple[int, list[str] | None, str]:
    """Return (worker processes, GPU id per worker or None, device string the workers use) for a local cluster.

    CPU: ``workers`` processes (default 1). ``auto``/``cuda`` with GPUs: one worker per visible GPU
    by default, worker i sees only GPU i (mod the count) through CUDA_VISIBLE_DEVICES and uses
    ``cuda``. ``cuda:N``: every worker sees only GPU N.
    """
    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return (workers or 1), None, "cpu"
    gpus = visible_gpus()
    if not gpus:
        raise AdvpipeError("CUDA is available but CUDA_VISIBLE_DEVICES lists no GPU")
    if resolved.index is not None:
        if resolved.index >= len(gpus):
            raise AdvpipeError(f"device {device}: only {len(gpus)} GPU(s) are visible", fields=("device",))
        gpus = [gpus[resolved.index]]
        return (workers or 1), gpus, "cuda"
    n = workers or len(gpus)
    return n, [gpus[i % len(gpus)] for i in range(n)], "cuda"


def worker_threads(n_workers: int) -> str:
    """Intra-op threads per local CPU worker: an equal share of the cores."""
    # dask's nanny sets OMP_NUM_THREADS=1 in every worker; a lone CPU worker would then use one core.
    # An explicit OMP_NUM_THREADS in our environment wins (tests pin it for bit-identical results).
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, cpu_count() // n_workers))


def start_local_cluster(n_workers: int, gpus: list[str] | None) -> Any:
    """Start a LocalCluster of ``n_workers`` single-threaded worker processes (spawned), GPU-pinned if asked."""
    from distributed import LocalCluster

    threads = worker_threads(n_workers)
    # memory_limit <= 1 is a fraction of the machine's memory: an equal share per worker, as LocalCluster gives.
    cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None,
                           memory_limit=1 / n_workers)
    template = cluster.new_spec
    for i in range(n_workers):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if gpus is not None:
            # Each worker process sees one GPU as cuda:0, so no process ever opens a context on another GPU.
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        cluster.worker_spec[i] = {"cls": template["cls"], "options": {**template["options"], "env": env}}
    cluster.scale(n_workers)
    return cluster


def connect(scheduler: str | None, device: str, workers: int | None) -> tuple[Any, Any, str]:
    """Return (client, local cluster or None, device string for the workers)."""
    from distributed import Client

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=f"{SCHEDULER_TIMEOUT}s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise AdvpipeError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from exc
        try:
            client.wait_for_workers(1, timeout=FIRST_WORKER_TIMEOUT)
        except TimeoutError as exc:
            client.close()
            raise AdvpipeError(f"no dask worker joined the scheduler at {scheduler} within "
                               f"{FIRST_WORKER_TIMEOUT} s") from exc
        return client, None, device
    n_workers, gpus, worker_device = plan_local_workers(device, workers)
    cluster = start_local_cluster(n_workers, gpus)
    client = Client(cluster)
    try:
        client.wait_for_workers(n_workers, timeout=WORKER_START_TIMEOUT)
    except (TimeoutError, OSError) as exc:  # distributed's WorkerStartTimeoutError is a TimeoutError
        client.close()
        cluster.close()
        raise AdvpipeError(f"the local dask cluster did not start within {WORKER_START_TIMEOUT} s; run with "
                           "workers=0 to see the error in this process", fields=("workers",)) from exc
    log.info("started a local dask cluster with %d worker(s) at %s", n_workers, cluster.scheduler_address)
    return client, cluster, worker_device


@contextlib.contextmanager
def dask_log_level(level: int) -> Iterator[None]:
    """Raise the ``distributed`` loggers to ``level`` for a while (their INFO chatter would bury the progress bar)."""
    # dask's logging config gives some child loggers (distributed.scheduler, ...) their own levels
    names = ["distributed"] + [n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg, before in zip(loggers, old):
        lg.setLevel(max(level, before))
    try:
        yield
    finally:
        for lg, before in zip(loggers, old):
            lg.setLevel(before)


@contextlib.contextmanager
def dask_cluster(scheduler: str | None, device: str, workers: int | None) -> Iterator[tuple[Any, str]]:
    """Yield (client, device string for the workers) of a dask cluster, and close it afterwards."""
    import dask
    import distributed  # noqa: F401  (creates its loggers, so dask_log_level can quiet them all)

    # spawn is dask's default, but a user config could say fork (see the module docstring).
    with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}), dask_log_level(logging.WARNING):
        client, cluster, worker_device = connect(scheduler, device, workers)
        try:
            yield client, worker_device
        finally:
            # Closing kills workers that are slow to exit (torch unloads slowly); every result is in
            # by then, so those warnings are noise.
            with dask_log_level(logging.ERROR):
                client.close()
                if cluster is not None:
                    cluster.close()
