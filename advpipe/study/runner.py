"""Running a study: masks once, then every grid point's run (train, then evaluate) on dask.

Each run is one dask task (:func:`execute_run`). A run folder is the unit of resumption:

- ``study-run.json`` marks a run whose training and evaluation finished; the next invocation
  skips it (or only re-evaluates it when the study's evaluation settings changed);
- an interrupted run resumes from its ``last.pt`` (:func:`advpipe.train.resume.finish_run`);
- ``attempts.jsonl`` records every start with the epoch it started from, so a restart that
  trained anything again from scratch is visible;
- a lock file keeps two processes (a worker orphaned by a killed study and a new one) from
  training one run folder at once.

The client watches the run folders (``metrics.jsonl``) for progress, so it works the same with a
local cluster and with an existing scheduler whose workers share the study folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from advpipe import progress
from advpipe.errors import AdvpipeError
from advpipe.study.config import RunSpec, StudyConfig
from advpipe.files import atomic_write_text

log = logging.getLogger(__name__)

DONE_FILE, ATTEMPTS_FILE, LOCK_FILE = "study-run.json", "attempts.jsonl", ".study-run.lock"
STUDY_FILE = "study.json"
_POLL_S = 1.0


@dataclass
class StudyResult:
    """What a study invocation did: per-run records, failures, timings and the report files."""

    out: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    skipped: int = 0
    wall_s: float = 0.0
    report_files: list[Path] = field(default_factory=list)


def _eval_key(spec: RunSpec) -> dict[str, Any]:
    e = spec.evaluate
    return {"attacks": list(e.attacks), "corruptions": list(e.corruptions), "severities": list(e.severities),
            "checkpoint": e.checkpoint, "limit": e.limit}


def read_done(run_dir: Path) -> dict[str, Any] | None:
    """The completion record of a finished run, or None."""
    try:
        record = json.loads((run_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") == "done" else None


def is_done(spec: RunSpec) -> bool:
    """Whether the run finished training and was evaluated with the study's current settings."""
    record = read_done(Path(spec.train.run_dir()))
    return record is not None and record.get("evaluate") == _eval_key(spec) and \
        record.get("epochs") == spec.train.epochs


def execute_run(spec: RunSpec) -> dict[str, Any]:
    """Train what is left of one run, evaluate it, and mark it done (a dask task; also runs in-process)."""
    from advpipe.eval.run import EVAL_FILENAME, EvalConfig, evaluate, write_eval_json
    from advpipe.pipeline.lock import StoreLock
    from advpipe.train.resume import finish_run, run_state

    run_dir = Path(spec.train.run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = StoreLock.acquire(run_dir / LOCK_FILE, what=f"run folder {run_dir}")
    try:
        started = time.perf_counter()
        state = run_state(spec.train)
        with open(run_dir / ATTEMPTS_FILE, "a") as fh:
            fh.write(json.dumps({"time": _now(), "from_epoch": state.epochs_done if state.same_config else None,
                                 "pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        finish_run(spec.train, on_change="refuse")
        trained = time.perf_counter()
        ckpt = run_dir / ("last.pt" if spec.evaluate.checkpoint == "last" else "best.pt")
        result = evaluate(EvalConfig(checkpoint=str(ckpt), data_dir=spec.train.data_dir, device=spec.train.device,
                                     limit=spec.evaluate.limit, attacks=spec.evaluate.attacks,
                                     corruptions=spec.evaluate.corruptions, severities=spec.evaluate.severities,
                                     seed=spec.train.seed, workers=0))
        write_eval_json(result, run_dir / EVAL_FILENAME)
        record = {"status": "done", "name": spec.name, "axes": spec.axes, "epochs": spec.train.epochs,
                  "from_epoch": state.epochs_done, "train_s": trained - started,
                  "eval_s": time.perf_counter() - trained, "evaluate": _eval_key(spec), "finished": _now(),
                  "clean_top1": result["clean"]["top1"]}
        atomic_write_text(run_dir / DONE_FILE, json.dumps(record, indent=2) + "\n")
        return record
    finally:
        lock.release()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _epochs_done(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


class _Watch:
    """The study's progress: one bar for the study (in epochs, so its eta is sound) and one per running run."""

    def __init__(self, pending: list[RunSpec], total_runs: int, done_runs: int) -> None:
        self.specs = {s.name: s for s in pending}
        self.total_runs, self.done_runs = total_runs, done_runs
        # epochs already in the folders (interrupted runs) are not work this invocation does
        self.shown = {s.name: min(_epochs_done(Path(s.train.run_dir())), s.train.epochs) for s in pending}
        self.bars: dict[str, progress.Task] = {}
        total_epochs = sum(s.train.epochs - self.shown[s.name] for s in pending)
        self.study = progress.open_task("study", total=max(total_epochs, 1), unit="epoch")
        self.study.advance(0, runs=f"{done_runs}/{total_runs}")

    def poll(self, finished: set[str]) -> None:
        """Advance the bars from the run folders; close those of finished runs."""
        for name, spec in self.specs.items():
            now = min(_epochs_done(Path(spec.train.run_dir())), spec.train.epochs)
            if name not in finished and name not in self.bars and (now > self.shown[name] or self._started(spec)):
                self.bars[name] = progress.open_task(f"run {name}", total=spec.train.epochs, unit="epoch")
                self.bars[name].advance(self.shown[name])
            if now > self.shown[name]:
                self.study.advance(now - self.shown[name], runs=f"{self.done_runs}/{self.total_runs}")
                if name in self.bars:
                    self.bars[name].advance(now - self.shown[name])
                self.shown[name] = now
            if name in finished and name in self.bars:
                progress.close_task(self.bars.pop(name))

    def _started(self, spec: RunSpec) -> bool:
        return (Path(spec.train.run_dir()) / LOCK_FILE).exists()

    def finish_run(self, name: str) -> None:
        """Count a finished (or failed) run."""
        self.done_runs += 1
        self.study.advance(0, runs=f"{self.done_runs}/{self.total_runs}")

    def close(self) -> None:
        """Close every bar."""
        for bar in self.bars.values():
            progress.close_task(bar)
        progress.close_task(self.study)


def _run_dask(pending: list[RunSpec], client: Any, worker_device: str, watch: _Watch,
              on_result: Callable[[str, dict | None, str | None], None]) -> None:
    from distributed import wait

    tag = uuid.uuid4().hex[:8]
    # explicit priorities: dask would otherwise start the last-submitted runs first; the grid's order is the user's
    futures = {client.submit(execute_run, _on_device(s, worker_device), key=f"advpipe-run-{s.name}-{tag}",
                             pure=False, priority=len(pending) - i): s.name for i, s in enumerate(pending)}
    remaining = set(futures)
    finished: set[str] = set()
    try:
        while remaining:
            try:
                done, _ = wait(list(remaining), timeout=_POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:  # nothing finished within the poll interval
                done = set()
            for future in done:
                remaining.discard(future)
                name = futures[future]
                finished.add(name)
                watch.poll(finished)
                error = future.exception()
                on_result(name, None if error else future.result(), None if error is None else _describe(error))
            watch.poll(finished)
    finally:
        if remaining:
            client.cancel(list(remaining))


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, AdvpipeError) else f"{type(error).__name__}: {text}"


def _on_device(spec: RunSpec, device: str) -> RunSpec:
    """The run as a worker sees it: a worker pinned to one GPU calls it ``cuda``."""
    return replace(spec, train=replace(spec.train, device=device))


def precompute_study_masks(cfg: StudyConfig, *, workers: int | None, scheduler: str | None, device: str) -> Path | None:
    """Precompute the masks the study declares (once; a complete store with the same settings is reused)."""
    if cfg.masks is None or not any(run.train.masks for run in cfg.runs):
        return None
    from advpipe.pipeline.precompute import precompute_masks
    from advpipe.pipeline.precompute_config import DEFAULT_BATCH_SIZE, PrecomputeConfig

    users = [run.train for run in cfg.runs if run.train.masks]
    data, limit, data_dir = users[0].data, users[0].limit, users[0].data_dir
    if any((t.data, t.limit) != (data, limit) for t in users):
        raise AdvpipeError("every run that uses the study's masks must train on the same data and limit")
    m = cfg.masks
    if m.limit is not None and m.limit != limit:
        raise AdvpipeError(f"masks.limit ({m.limit}) differs from the runs' training limit ({limit}); the masks must "
                           "cover exactly the training split")
    precompute_masks(PrecomputeConfig(data=data, checkpoint=m.checkpoint, split=m.split, data_dir=data_dir,
                                      limit=limit, eps=m.eps, steps=m.steps, encoder=m.encoder, precision=m.precision,
                                      batch_size=m.batch_size or DEFAULT_BATCH_SIZE, workers=workers,
                                      scheduler=scheduler, device=device, seed=m.seed, out=str(cfg.store_path),
                                      attack_options=m.attack_options))
    return cfg.store_path


def run_study(cfg: StudyConfig, *, workers: int | None = None, scheduler: str | None = None,
              device: str = "auto") -> StudyResult:
    """Run every unfinished grid point (``workers=0``: in this process), then aggregate all of them into a report."""
    from advpipe.cluster import dask_cluster

    started = time.perf_counter()
    result = StudyResult(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    runs = list(cfg.runs)
    pending = [r for r in runs if not is_done(r)]
    result.skipped = len(runs) - len(pending)
    if pending:
        precompute_study_masks(cfg, workers=workers, scheduler=scheduler, device=device)
    watch = _Watch(pending, len(runs), result.skipped)

    def on_result(name: str, record: dict | None, error: str | None) -> None:
        watch.finish_run(name)
        if error is not None:
            log.warning("run %s failed: %s", name, error)
            result.failures[name] = error
        else:
            result.records.append(record)  # type: ignore[arg-type]

    try:
        if pending and workers == 0:
            for spec in pending:
                try:
                    record, error = execute_run(spec), None
                except AdvpipeError as exc:
                    record, error = None, str(exc)
                watch.poll({spec.name})
                on_result(spec.name, record, error)
        elif pending:
            with dask_cluster(scheduler, device, workers) as (client, worker_device):
                _run_dask(pending, client, worker_device, watch, on_result)
    finally:
        watch.close()
    ran = time.perf_counter()
    done = [Path(r.train.run_dir()) for r in runs if read_done(Path(r.train.run_dir()))]
    if done:
        from advpipe.eval.report import ReportConfig, build_report

        result.report_files = build_report(ReportConfig(runs=tuple(str(d) for d in done), out=str(cfg.out / "report"),
                                                        csv=True, baseline=cfg.baseline)).files
    result.wall_s = time.perf_counter() - started
    _write_summary(cfg, runs, result, report_s=time.perf_counter() - ran, parallel=_parallel(workers, scheduler))
    return result


def _parallel(workers: int | None, scheduler: str | None) -> bool:
    """Whether runs may have overlapped: an existing cluster, several workers, or one per GPU on several GPUs."""
    import torch

    return scheduler is not None or (workers or 0) > 1 or (workers is None and torch.cuda.device_count() > 1)


def _write_summary(cfg: StudyConfig, runs: list[RunSpec], result: StudyResult, *, report_s: float,
                   parallel: bool = False) -> None:
    """``study.json``: this invocation's timings (the runs' own, the final report's, the rest) and every run's state.

    The overhead (wall time less the runs' own and the report's) is defined only when the runs ran
    one at a time; with several workers the runs overlap, and ``parallel_speedup`` (own / wall)
    is recorded instead.
    """
    own = sum(r.get("train_s", 0) + r.get("eval_s", 0) for r in result.records)
    overhead = result.wall_s - own - report_s if result.records and not parallel else None
    summary = {"name": cfg.name, "finished": _now(), "host": socket.gethostname(), "wall_s": result.wall_s,
               "runs_total": len(runs), "runs_skipped": result.skipped, "runs_executed": len(result.records),
               "runs_failed": result.failures, "runs_own_s": own, "report_s": report_s,
               "overhead_s": overhead, "parallel": parallel,
               "parallel_speedup": own / result.wall_s if parallel and result.wall_s > 0 else None,
               "load_average": os.getloadavg(),
               "runs": {r.name: read_done(Path(r.train.run_dir())) for r in runs}, "config": cfg.source}
    atomic_write_text(cfg.out / STUDY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
