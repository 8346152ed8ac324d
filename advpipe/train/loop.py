"""The training loop: one loop for every ``--aug``, readable from top to bottom.

Order of work per step: the device loader yields a cropped/flipped batch in [0,1]; the input
augmentation (``--aug`` first part) transforms it; the training method (``--aug`` second part)
computes the loss; the loop backpropagates and steps the optimizer and the per-step schedule.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from advpipe import progress
from advpipe.augment.base import AugmentContext, InputAugment, build_augment
from advpipe.data.datasets import DatasetSplit, load_dataset
from advpipe.data.loader import DeviceLoader
from advpipe.rng import epoch_seed
from advpipe.data.split import HoldOut, fixed_test_subset, hold_out
from advpipe.errors import AdvpipeError
from advpipe.models.accuracy import evaluate_accuracy
from advpipe.precision import autocast_context, effective_precision
from advpipe.models.build import build_model
from advpipe.models.checkpoint import (Checkpoint, load_checkpoint, load_state_into, non_finite_tensors,
                                       save_checkpoint)
from advpipe.models.normalize import normalization_of, unwrap
from advpipe.train.compose import parse_aug
from advpipe.train.config import TrainConfig
from advpipe.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from advpipe.train.methods import Method, MethodContext, build_method
from advpipe.train.rundir import RunFolder, check_run_dir, disk_errors, open_run_folder, trim_metrics
from advpipe.train.schedule import build_scheduler
from advpipe.devices import resolve_device
from advpipe.files import atomic_write_text

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class TrainResult:
    """Where a finished run lives and how it ended."""

    run_dir: Path
    last_metrics: dict[str, Any]
    best_top1: float
    model: torch.nn.Module


@dataclass
class _Data:
    """The run's splits: training, test and, with ``val_size``, the held-out validation samples."""

    train: DatasetSplit
    test: DatasetSplit
    holdout: HoldOut | None


@dataclass
class _Loaders:
    """The run's batches: training, validation, the full test set (last epoch) and its fixed subset (the others)."""

    train: DeviceLoader
    val: DeviceLoader | None
    test: DeviceLoader
    epoch_test: DeviceLoader
    steps_per_epoch: int  # len(train), counted once


@dataclass
class _Run:
    """What the steps of one run share: the settings, the data, what trains, how it steps and where it saves."""

    cfg: TrainConfig
    device: torch.device
    info: DistInfo
    folder: RunFolder
    data: _Data
    loaders: _Loaders
    augment: InputAugment
    method: Method
    method_name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    precision: str
    best: float = -1.0  # the best selection score so far (validation, or test without a validation split)


def train(cfg: TrainConfig) -> TrainResult:
    """Train a classifier as ``cfg`` says, writing metrics.jsonl, last.pt and best.pt to the run folder."""
    info, device = init_distributed(resolve_device(cfg.device))
    # Model init and anything inside the model that draws from torch's global RNG (dropout,
    # shake-shake) is seeded from cfg.seed in a forked RNG, so the caller's global state is untouched.
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(epoch_seed(cfg.seed, 0, stream=3))
        # Only rank 0 shows progress; the others train silently.
        previous = None if info.is_main else progress.use_reporter(progress.NullReporter())
        try:
            return _train(cfg, device, info)
        finally:
            if previous is not None:
                progress.use_reporter(previous)
            shutdown(info)


def _train(cfg: TrainConfig, device: torch.device, info: DistInfo) -> TrainResult:
    """The body of :func:`train`, run inside a forked, seeded global RNG."""
    aug_name, method_name = parse_aug(cfg.aug)
    data = _load_data(cfg, info)
    size = data.train.image_shape[1:]
    augment = _build(build_augment, aug_name, AugmentContext(cfg.data, size, data.train.num_classes, data.train.mean,
                                                             cfg.epochs), cfg.aug_options, "aug_options")
    method = _build(build_method, method_name, MethodContext(data.train.num_classes, cfg.epochs, size),
                    cfg.method_options, "method_options")
    model = method.prepare(build_model(cfg.model, data.train, pretrained=cfg.pretrained, small_stem=cfg.small_stem,
                                       download=cfg.download)).to(device, memory_format=torch.channels_last)
    side = side_sources(augment.needs_side, cfg, data.train, device)
    side.update(augment.own_side)  # side data the augmentation derives itself (CP's corners)

    check_run_dir(cfg.run_dir(), resume=cfg.resume, overwrite=cfg.overwrite)
    barrier(info)  # every rank has checked the folder before rank 0 changes it
    folder = open_run_folder(cfg.run_dir(), overwrite=cfg.overwrite) if info.is_main else RunFolder(cfg.run_dir())
    try:
        loaders = _loaders(cfg, device, info, data, side)
        steps = loaders.steps_per_epoch
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        scheduler = build_scheduler(optimizer, cfg.schedule, cfg.epochs * steps, int(cfg.warmup_epochs * steps),
                                    cfg.milestones, cfg.gamma)
        precision = effective_precision(device, cfg.precision)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        return _run(_Run(cfg, device, info, folder, data, loaders, augment, method, method_name, model, optimizer,
                         scheduler, scaler, precision))
    except BaseException:
        folder.abandon()  # an --overwrite that never saved a checkpoint leaves the old run as it was
        raise


def _load_data(cfg: TrainConfig, info: DistInfo) -> _Data:
    """Load the training and test splits and hold out the validation samples."""
    train_ds = load_dataset(cfg.data, "train", data_dir=cfg.data_dir, limit=cfg.limit, image_size=cfg.image_size,
                            download=cfg.download)
    test_ds = load_dataset(cfg.data, "test", data_dir=cfg.data_dir, image_size=cfg.image_size, download=cfg.download)
    holdout = hold_out(len(train_ds), cfg.val_size, cfg.seed, train_ds.fingerprint) if cfg.val_size else None
    n_train = len(train_ds) if holdout is None else len(holdout.train)
    if cfg.batch_size * info.world_size > n_train:
        raise AdvpipeError(f"batch_size {cfg.batch_size} x {info.world_size} process(es) is larger than the training "
                           f"set ({n_train} samples)", fields=("batch_size",))
    return _Data(train_ds, test_ds, holdout)


def _loaders(cfg: TrainConfig, device: torch.device, info: DistInfo, data: _Data, side: dict[str, Any]) -> _Loaders:
    """This process's loaders (--batch-size is per process: with N processes each step sees N x batch-size samples)."""
    train_ds, test_ds, holdout = data.train, data.test, data.holdout
    loader = DeviceLoader(train_ds, batch_size=cfg.batch_size, device=device, train=True, seed=cfg.seed,
                          side=side, crop=cfg.crop, workers=cfg.workers, rank=info.rank, world_size=info.world_size,
                          indices=None if holdout is None else holdout.train)
    eval_kw = dict(batch_size=max(cfg.batch_size, 256), device=device, train=False, workers=cfg.workers,
                   rank=info.rank, world_size=info.world_size)
    val_loader = None if holdout is None else DeviceLoader(train_ds, indices=holdout.val, **eval_kw)
    test_loader = DeviceLoader(test_ds, **eval_kw)
    subset = fixed_test_subset(len(test_ds), cfg.test_subset)
    epoch_test_loader = test_loader if subset is None else DeviceLoader(test_ds, indices=subset, **eval_kw)
    return _Loaders(loader, val_loader, test_loader, epoch_test_loader, len(loader))


def _run(run: _Run) -> TrainResult:
    """Train the epochs that are left, writing each epoch's metrics and checkpoints into the run folder."""
    cfg, info = run.cfg, run.info
    start_epoch = 0
    if cfg.resume:
        start_epoch = _restore(run)
        if info.is_main:
            _recreate_best(run.folder.path, "test_acc" if run.data.holdout is None else "val_acc", run.best)
    if info.enabled:
        run.model = DistributedDataParallel(run.model, device_ids=[run.device] if run.device.type == "cuda" else None)
    if info.is_main:
        with disk_errors(f"writing {run.folder.path / 'config.yaml'}"):
            atomic_write_text(run.folder.path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        trim_metrics(run.folder.path / "metrics.jsonl", start_epoch)

    last: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        trained, timing = _train_epoch(run, epoch)
        test, val = _evaluate(run, epoch)
        last = {
            "epoch": epoch + 1,
            **trained,
            "test_acc": test["top1"],
            "test_images": test["n"],
            **({} if val is None else {"val_acc": val["top1"]}),
            "lr": run.optimizer.param_groups[0]["lr"],
            **timing,
            **{f"aug_{k}": v for k, v in run.augment.epoch_metrics().items()},
            **{f"method_{k}": v for k, v in run.method.epoch_metrics().items()},
        }
        # best.pt is chosen on the held-out validation split when there is one (never on test then)
        score = test["top1"] if val is None else val["top1"]
        is_best = score > run.best
        run.best = max(run.best, score)
        _refuse_divergence(run, epoch, test, val)
        if not info.is_main:
            barrier(info)  # rank 0 writes the checkpoint; the others wait so a crash never splits the run
            continue
        _save(run, epoch, last, test, is_best)
        log.info("epoch %d: %s", epoch + 1, last)
        barrier(info)
    return TrainResult(run.folder.path, last, run.best, unwrap(run.model))


def _train_epoch(run: _Run, epoch: int) -> tuple[dict[str, float | None], dict[str, float]]:
    """Train one epoch; return its train_* metrics (over every process) and its time and speed."""
    cfg, loader, device = run.cfg, run.loaders.train, run.device
    loader.set_epoch(epoch)
    run.augment.set_epoch(epoch, cfg.epochs)
    run.method.set_epoch(epoch, cfg.epochs)
    # augmentation and method draws differ per rank; rank 0 keeps the single-process stream
    gen = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch, stream=2 + 10 * run.info.rank))
    run.model.train()
    started = time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    correct = seen = 0
    with progress.task(f"epoch {epoch + 1}/{cfg.epochs}", total=run.loaders.steps_per_epoch, unit="batch") as bar:
        for batch in loader:
            batch = batch.replace(images=run.augment(batch.images, side=batch.side, generator=gen))
            with autocast_context(device, run.precision):
                out = run.method.step(run.model, batch, gen)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise AdvpipeError(f"training diverged at epoch {epoch + 1}: loss is {loss.item()}; try a lower lr",
                                   fields=("lr",))
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.scheduler.step()
            for key, value in out.items():
                if key != "logits" and value.dim() == 0:
                    sums[key] = sums.get(key, 0) + value.detach().float()
            if "logits" in out:
                correct += (out["logits"].argmax(1) == batch.labels).sum()
                seen += len(batch)
            bar.advance(1, loss=f"{loss.item():.3f}")
    elapsed = time.perf_counter() - started
    keys = sorted(sums)
    totals = all_reduce_sum(torch.stack([torch.as_tensor(float(sums[k])) for k in keys]
                                        + [torch.as_tensor(float(correct)), torch.as_tensor(float(seen))]).to(device),
                            run.info).cpu()
    world_steps = run.loaders.steps_per_epoch * run.info.world_size
    return ({**{f"train_{k}": float(v) / world_steps for k, v in zip(keys, totals[: len(keys)])},
             "train_acc": float(totals[-2] / totals[-1]) if float(totals[-1]) else None},
            {"epoch_time_s": elapsed, "images_per_s": world_steps * cfg.batch_size / elapsed})


def _evaluate(run: _Run, epoch: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Evaluate on test (the full set in the last epoch, else the fixed subset) and on validation, if held out."""
    loaders, num_classes = run.loaders, run.data.test.num_classes

    def on(batches: DeviceLoader, description: str) -> dict[str, Any]:
        return evaluate_accuracy(run.model, batches, num_classes, precision=run.precision, description=description,
                                 total=len(batches), reduce=lambda t: all_reduce_sum(t, run.info))

    test = on(loaders.test if epoch + 1 == run.cfg.epochs else loaders.epoch_test, "test")
    return test, None if loaders.val is None else on(loaders.val, "val")


def _refuse_divergence(run: _Run, epoch: int, test: dict[str, Any], val: dict[str, Any] | None) -> None:
    """Raise before anything of this epoch is saved if the weights or the evaluated outputs are not finite."""
    bad = non_finite_tensors(unwrap(run.model).state_dict())  # every rank holds the same weights
    if bad:
        raise AdvpipeError(f"training diverged at epoch {epoch + 1}: {len(bad)} weight tensors are not finite "
                           f"(first {bad[0]!r}); nothing of this epoch is saved; try a lower lr", fields=("lr",))
    # finite but huge weights (one step at an absurd lr) overflow the logits
    for which, split in (("test", test), ("val", val)):
        if split is not None and split["non_finite"]:
            raise AdvpipeError(f"training diverged at epoch {epoch + 1}: the model's outputs are not finite on "
                               f"{split['non_finite']} of {split['n']} {which} images; nothing of this epoch is "
                               "saved; try a lower lr", fields=("lr",))


def _save(run: _Run, epoch: int, last: dict[str, Any], test: dict[str, Any], is_best: bool) -> None:
    """Append the epoch's metrics, save best.pt (when best) and last.pt, and commit the run folder."""
    folder = run.folder
    ckpt = _checkpoint(run, epoch + 1, {**last, **_selection(run.best, run.data.holdout),
                                        "test_per_class": test["per_class"]})
    with disk_errors(f"saving epoch {epoch + 1} to {folder.final}"):
        with open(folder.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(last) + "\n")
        # best.pt before last.pt: if either save fails, --resume redoes this epoch and writes both
        if is_best:
            save_checkpoint(folder.path / "best.pt", ckpt)
        ckpt.state = {"model": _cpu_state(unwrap(run.model).state_dict()), "optimizer": run.optimizer.state_dict(),
                      "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
                      "rng_cpu": torch.get_rng_state(), "best": run.best}
        if run.device.type == "cuda":
            ckpt.state["rng_cuda"] = torch.cuda.get_rng_state(run.device)
        save_checkpoint(folder.path / "last.pt", ckpt)
    folder.commit()  # an --overwrite replaces the old run now that the new one has a checkpoint


def _selection(best: float, holdout: HoldOut | None) -> dict[str, Any]:
    """How best.pt is chosen: on the validation split (named by its fingerprint) or, without one, on test."""
    if holdout is None:
        return {"best_on": "test", "best_test_acc": best}
    return {"best_on": "val", "best_val_acc": best, "val_size": len(holdout.val), "val_fingerprint": holdout.fingerprint}


def _build(factory: Callable[..., T], name: str, ctx: Any, options: Mapping[str, Any], field_name: str) -> T:
    """Build a registered augmentation or method, turning bad options into a user error."""
    try:
        return factory(name, ctx, **dict(options))
    except TypeError as exc:
        raise AdvpipeError(f"bad {field_name} for {name!r}: {exc}") from exc


def side_sources(names: tuple[str, ...], cfg: TrainConfig, ds: DatasetSplit, device: torch.device) -> dict:
    """Open the per-sample side data an augmentation needs (attack masks come from a mask store)."""
    sources = {}
    for name in names:
        if name == "attack_mask":
            from advpipe.pipeline.streaming import attack_mask_source

            sources[name] = attack_mask_source(cfg.masks, ds, device)
        else:
            raise AdvpipeError(f"no source for side data {name!r}")
    return sources


def _cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of ``state``'s tensors (the model trains channels_last)."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _checkpoint(run: _Run, epoch: int, metrics: dict[str, Any]) -> Checkpoint:
    """A checkpoint whose model_state loads into the plain architecture (what evaluation uses)."""
    cfg, ds = run.cfg, run.data.train
    state = _cpu_state(run.method.export_state(unwrap(run.model)))
    mean, std = normalization_of(run.model) or (ds.mean, ds.std)  # a pretrained model keeps its weights' normalization
    return Checkpoint(arch=cfg.model, num_classes=ds.num_classes, dataset=cfg.data, fingerprint=ds.fingerprint,
                      mean=mean, std=std, image_size=ds.image_shape[-1], model_state=state, epoch=epoch,
                      metrics=metrics, config=cfg.to_dict(), method=run.method_name, small_stem=cfg.small_stem)


def _recreate_best(run_dir: Path, score_key: str, best: float) -> None:
    """Write a missing best.pt from last.pt when last.pt is the best epoch (a save cut short by a full disk)."""
    if (run_dir / "best.pt").exists():
        return
    ckpt = load_checkpoint(run_dir / "last.pt")
    if ckpt.metrics.get(score_key) != best:
        log.warning("%s has no best.pt and its best epoch is not last.pt; the next best epoch writes it", run_dir)
        return
    ckpt.state = {}
    with disk_errors(f"writing {run_dir / 'best.pt'}"):
        save_checkpoint(run_dir / "best.pt", ckpt)


def _restore(run: _Run) -> int:
    """Load last.pt into the model and optimizer after checking it belongs to this run; return its epochs done."""
    cfg, ds, method_name, path = run.cfg, run.data.train, run.method_name, run.folder.path / "last.pt"
    ckpt = load_checkpoint(path)
    if ckpt.arch != cfg.model:
        raise AdvpipeError(f"resume: {path} is a {ckpt.arch} checkpoint, but model is {cfg.model}",
                           fields=("resume", "model"))
    if ckpt.small_stem != cfg.small_stem:
        raise AdvpipeError(f"resume: {path} was trained {'with' if ckpt.small_stem else 'without'} small_stem",
                           fields=("resume", "small_stem"))
    if ckpt.dataset != cfg.data or ckpt.fingerprint != ds.fingerprint:
        raise AdvpipeError(f"resume: {path} was trained on {ckpt.dataset} ({ckpt.fingerprint[:19]}), "
                           f"not on this {cfg.data} data ({ds.fingerprint[:19]})", fields=("resume",))
    if ckpt.epoch >= cfg.epochs:
        raise AdvpipeError(f"resume: {path} already finished {ckpt.epoch} of {cfg.epochs} epochs", fields=("resume",))
    if ckpt.method != method_name:
        raise AdvpipeError(f"resume: {path} was trained with method {ckpt.method}, not {method_name}",
                           fields=("resume",))
    # state["model"] is the full training-time state (e.g. both BNs of AdvProp); model_state is the export
    load_state_into(unwrap(run.model), ckpt.state.get("model", ckpt.model_state), source=str(path))
    try:
        run.optimizer.load_state_dict(ckpt.state["optimizer"])
        run.scheduler.load_state_dict(ckpt.state["scheduler"])
        run.scaler.load_state_dict(ckpt.state["scaler"])
        torch.set_rng_state(ckpt.state["rng_cpu"])
        if "rng_cuda" in ckpt.state and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt.state["rng_cuda"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise AdvpipeError(f"resume: {path} has no usable optimizer state ({exc})", fields=("resume",)) from exc
    run.best = float(ckpt.state.get("best", -1.0))
    return ckpt.epoch
