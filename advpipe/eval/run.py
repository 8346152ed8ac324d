"""``advpipe evaluate``: load a checkpoint and measure it on a dataset split.

Clean top-1 and per-class accuracy always; then, when asked, accuracy under each attack spec
(:mod:`advpipe.eval.specs`) and under each corruption and severity, synthesised on the device
(:mod:`advpipe.eval.corruptions`) or read from the released CIFAR-10-C / CIFAR-100-C files
(:mod:`advpipe.eval.corruption_files`), each with M-TLAT's robustness score (m-tlat.txt Eq. 7).
The summary's headline ``mean_corruption_top1`` averages CIFAR-10-C's 15 standard corruptions
(RobustBench's mean corruption accuracy); ``mean_corruption_top1_all`` averages every evaluated
one. The result is one JSON-able dict; ``docs/evaluation.md`` describes its schema.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advpipe import __version__
from advpipe.data.datasets import DatasetSplit, load_dataset
from advpipe.data.loader import DeviceLoader
from advpipe.errors import AdvpipeError
from advpipe.eval.corruption_files import available_corruptions, corruption_file_pass, open_corruption_files
from advpipe.eval.corruptions import STANDARD_CORRUPTIONS, parse_corruption_list, parse_severities
from advpipe.eval.robustness import accuracy_pass, attack_pass, corruption_pass, mean_or_none, public
from advpipe.eval.specs import AttackSpec, parse_attack_specs
from advpipe.models.build import model_from_checkpoint
from advpipe.models.checkpoint import BUILTIN_PREFIX, Checkpoint, load_checkpoint, resolve_checkpoint
from advpipe.devices import resolve_device
from advpipe.files import atomic_write_text, sha256_file

#: evaluate's JSON inside a run folder when no --json is given; ``advpipe report`` reads it
EVAL_FILENAME = "eval.json"
#: files whose presence beside a checkpoint marks its folder as an advpipe run folder
RUN_MARKERS = ("config.yaml", "metrics.jsonl")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate, on which data, and how.

    ``attacks`` are spec strings (``default`` expands to the M2AT suite), ``corruptions`` are
    corruption names (or ``all``), ``severities`` the levels each corruption runs at. ``seed``
    seeds every perturbation's own generator. With ``corruptions_dir`` the corruptions are read
    from the released ``<name>.npy`` files there instead of synthesised (no ``corruptions``:
    every release file present; ``all``: the release's 19).
    """

    checkpoint: str
    data: str | None = None
    data_dir: str | None = None
    split: str = "test"
    limit: int | None = None
    batch_size: int = 256
    device: str = "auto"
    precision: str = "fp32"
    workers: int = 2
    attacks: tuple[str, ...] = ()
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    seed: int = 0
    corruptions_dir: str | None = None


def default_eval_path(checkpoint: str | Path) -> Path | None:
    """``RUN_DIR/eval.json`` when the checkpoint sits in a run folder (config.yaml or metrics.jsonl beside it)."""
    if str(checkpoint).startswith(BUILTIN_PREFIX):
        return None
    folder = Path(checkpoint).parent
    return folder / EVAL_FILENAME if any((folder / m).is_file() for m in RUN_MARKERS) else None


def write_eval_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write an evaluation result as JSON atomically; an unwritable path is a user error."""
    path = Path(path)
    try:
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        raise AdvpipeError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    return path


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Return a JSON-able result with clean, attack and corruption accuracy and full provenance."""
    # Everything a user can get wrong is checked before the first (slow) pass.
    if cfg.batch_size < 1:
        raise AdvpipeError(f"batch_size must be at least 1, got {cfg.batch_size}", fields=("batch_size",))
    if cfg.precision not in PRECISIONS:
        raise AdvpipeError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}",
                           fields=("precision",))
    specs = parse_attack_specs(cfg.attacks)
    corruptions = _corruption_names(cfg)
    severities = parse_severities(cfg.severities)
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    data = cfg.data or ckpt.dataset
    ds = load_dataset(data, cfg.split, data_dir=cfg.data_dir, limit=cfg.limit, image_size=ckpt.image_size)
    _check_fits(ckpt, ds, cfg.checkpoint, data)
    files = (open_corruption_files(cfg.corruptions_dir, corruptions, image_shape=ds.image_shape, labels=ds.labels,
                                   num_classes=ds.num_classes) if cfg.corruptions_dir else None)
    surrogates = {spec.key: _load_surrogate(spec, ds, device) for spec in specs if "surrogate" in spec.values}
    model = model_from_checkpoint(ckpt, source=cfg.checkpoint).to(device).eval()
    loader = DeviceLoader(ds, batch_size=cfg.batch_size, device=device, train=False, workers=cfg.workers)

    clean_full = accuracy_pass(model, loader, ds.num_classes, precision=cfg.precision, description="clean",
                               total=len(loader))
    clean = public(clean_full)
    attacks = {}
    for spec in specs:
        surrogate, info = surrogates.get(spec.key, (None, None))
        result = attack_pass(model, loader, spec, ds.num_classes, clean=clean_full, seed=cfg.seed,
                             surrogate=surrogate, precision=cfg.precision, total=len(loader))
        if info:
            result["surrogate"] = info
        attacks[spec.key] = result
    if files is not None:
        corrupted = {name: corruption_file_pass(model, files, name, severities, ds.num_classes, clean=clean_full,
                                                count=len(ds), batch_size=cfg.batch_size, device=device,
                                                precision=cfg.precision) for name in corruptions}
    else:
        corrupted = {name: corruption_pass(model, loader, name, severities, ds.num_classes, clean=clean_full,
                                           seed=cfg.seed, precision=cfg.precision, total=len(loader))
                     for name in corruptions}
    params = asdict(cfg)
    params.update(attacks=list(cfg.attacks), corruptions=list(cfg.corruptions), severities=list(severities))
    return {
        "advpipe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"path": str(cfg.checkpoint), "sha256": sha256_file(resolve_checkpoint(cfg.checkpoint)), "arch": ckpt.arch,
                       "method": ckpt.method, "epoch": ckpt.epoch, "train_dataset": ckpt.dataset,
                       "train_fingerprint": ckpt.fingerprint},
        "data": {"name": data, "split": cfg.split, "n": len(ds), "fingerprint": ds.fingerprint,
                 "class_names": ds.class_names},
        "params": params,
        "device": str(device),
        "clean": clean,
        "attacks": attacks,
        "corruptions": corrupted,
        "corruption_source": (files.provenance() if files is not None
                              else {"kind": "synthetic", "seed": cfg.seed} if corrupted else None),
        "summary": corruption_summary(clean["top1"], corrupted),
    }


def corruption_summary(clean_top1: float | None, corrupted: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Headline means over CIFAR-10-C's 15 standard corruptions, and means over every evaluated one.

    ``mean_corruption_top1`` is RobustBench's mean corruption accuracy when all 15 standard
    corruptions ran at all five severities (``standard_corruptions`` says how many ran); it is
    None when none of them ran. The ``_all`` fields include the extras and M-TLAT's four.
    """
    standard = [c for name, c in corrupted.items() if name in STANDARD_CORRUPTIONS]
    return {
        "clean_top1": clean_top1,
        "mean_corruption_top1": mean_or_none(c["top1"] for c in standard),
        "mean_corruption_robustness": mean_or_none(c["robustness"] for c in standard),
        "standard_corruptions": len(standard),
        "mean_corruption_top1_all": mean_or_none(c["top1"] for c in corrupted.values()),
        "mean_corruption_robustness_all": mean_or_none(c["robustness"] for c in corrupted.values()),
        "corruptions": len(corrupted),
    }


def _corruption_names(cfg: EvalConfig) -> list[str]:
    """The corruptions to run; with a release folder, ``all`` means its 19 and none given means every file there."""
    if not cfg.corruptions_dir:
        return parse_corruption_list(list(cfg.corruptions))
    if not Path(cfg.corruptions_dir).is_dir():
        raise AdvpipeError(f"corruptions_dir {cfg.corruptions_dir!r} is not a folder", fields=("corruptions_dir",))
    requested = [("cifar-c" if str(c).strip().lower() == "all" else c) for c in cfg.corruptions]
    if requested:
        return parse_corruption_list(requested)
    present = available_corruptions(cfg.corruptions_dir)
    if not present:
        raise AdvpipeError(f"corruptions_dir {cfg.corruptions_dir!r} holds none of the release files "
                           "(gaussian_noise.npy, ..., jpeg_compression.npy, beside labels.npy)",
                           fields=("corruptions_dir",))
    return present


def _check_fits(ckpt: Checkpoint, ds: DatasetSplit, source: str, data: str) -> None:
    if ds.num_classes != ckpt.num_classes:
        raise AdvpipeError(f"{source} predicts {ckpt.num_classes} classes but {data} has {ds.num_classes}")
    if ds.image_shape[-1] != ckpt.image_size:
        raise AdvpipeError(f"{source} expects {ckpt.image_size}px images but {data} has {ds.image_shape[-1]}px")


def _load_surrogate(spec: AttackSpec, ds: DatasetSplit, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Load a transfer attack's surrogate checkpoint (it must fit the evaluated data)."""
    path = spec.values["surrogate"]
    ckpt = load_checkpoint(path)
    _check_fits(ckpt, ds, f"surrogate {path}", ds.name)
    model = model_from_checkpoint(ckpt, source=f"surrogate {path}").to(device).eval()
    info = {"path": str(path), "sha256": sha256_file(resolve_checkpoint(path)), "arch": ckpt.arch, "method": ckpt.method,
            "epoch": ckpt.epoch}
    return model, info
