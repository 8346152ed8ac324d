"""``advpipe evaluate``: load a checkpoint and measure it on a dataset split."""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from advpipe import __version__
from advpipe.data.datasets import load_dataset
from advpipe.data.loader import DeviceLoader
from advpipe.errors import AdvpipeError
from advpipe.eval.accuracy import evaluate_accuracy
from advpipe.models.build import model_from_checkpoint
from advpipe.models.checkpoint import load_checkpoint
from advpipe.utils import resolve_device, sha256_file


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate, on which data, and how."""

    checkpoint: str
    data: str | None = None
    data_dir: str | None = None
    split: str = "test"
    limit: int | None = None
    batch_size: int = 256
    device: str = "auto"
    precision: str = "fp32"
    workers: int = 2


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Return a JSON-able result with clean top-1, per-class accuracy and full provenance."""
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    data = cfg.data or ckpt.dataset
    ds = load_dataset(data, cfg.split, data_dir=cfg.data_dir, limit=cfg.limit, image_size=ckpt.image_size)
    if ds.num_classes != ckpt.num_classes:
        raise AdvpipeError(f"{cfg.checkpoint} predicts {ckpt.num_classes} classes but {data} has {ds.num_classes}")
    if ds.image_shape[-1] != ckpt.image_size:
        raise AdvpipeError(f"{cfg.checkpoint} expects {ckpt.image_size}px images but {data} has {ds.image_shape[-1]}px")
    model = model_from_checkpoint(ckpt, source=cfg.checkpoint).to(device).eval()
    loader = DeviceLoader(ds, batch_size=cfg.batch_size, device=device, train=False, workers=cfg.workers)
    clean = evaluate_accuracy(model, loader, ds.num_classes, precision=cfg.precision, total=len(loader))
    return {
        "advpipe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"path": str(Path(cfg.checkpoint)), "sha256": sha256_file(cfg.checkpoint), "arch": ckpt.arch,
                       "method": ckpt.method, "epoch": ckpt.epoch, "train_dataset": ckpt.dataset,
                       "train_fingerprint": ckpt.fingerprint},
        "data": {"name": data, "split": cfg.split, "n": len(ds), "fingerprint": ds.fingerprint,
                 "class_names": ds.class_names},
        "params": asdict(cfg),
        "clean": clean,
    }
