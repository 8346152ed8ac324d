"""The main job end to end on the embedded data: train, precompute masks, train with AdvMask, evaluate.

Every stage is the same library call the individual commands make; the demo only chooses small
settings (ResNet-20, a short attack) so the whole pipeline fits in about ten minutes on 2 CPU cores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from advpipe.eval.run import EvalConfig, evaluate, write_eval_json
from advpipe.train.config import TrainConfig
from advpipe.train.loop import train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo pipeline."""

    out: str = "demo"
    data: str = "embedded"
    data_dir: str | None = None
    limit: int | None = None
    model: str = "resnet20"
    epochs: int = 12
    batch_size: int = 128
    eps: Fraction = Fraction(8, 255)
    attack_steps: int = 25
    robust_attack: str = "fgsm:eps=2/255"
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False


@dataclass
class DemoResult:
    """What the demo produced."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    store: Path | None = None
    preview: Path | None = None
    mask_summary: dict[str, Any] = field(default_factory=dict)


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the four stages and return the comparison of ``none`` and ``advmask``."""
    from advpipe.augment.preview import preview_augment, save_preview
    from advpipe.data.datasets import load_dataset
    from advpipe.pipeline.precompute import PrecomputeConfig, precompute_masks

    root = Path(cfg.out)
    common = dict(data=cfg.data, data_dir=cfg.data_dir, limit=cfg.limit, model=cfg.model, epochs=cfg.epochs,
                  batch_size=cfg.batch_size, precision=cfg.precision, device=cfg.device, seed=cfg.seed,
                  warmup_epochs=min(1.0, cfg.epochs / 10))
    result = DemoResult()

    log.info("stage 1/4: train %s without augmentation", cfg.model)
    baseline = _train_or_reuse(TrainConfig(**common, aug="none", out=str(root / "runs" / "none")), cfg.overwrite)

    log.info("stage 2/4: precompute AdvMask attack masks")
    store = root / "masks" / f"{cfg.data}-train-{cfg.model}.zarr"
    masks = precompute_masks(PrecomputeConfig(data=cfg.data, data_dir=cfg.data_dir, limit=cfg.limit,
                                              checkpoint=str(baseline / "best.pt"), split="train", eps=cfg.eps,
                                              steps=cfg.attack_steps, workers=0, device=cfg.device, seed=cfg.seed,
                                              out=str(store), overwrite=cfg.overwrite))
    result.store, result.mask_summary = masks.path, masks.summary

    log.info("stage 3/4: train %s with --aug advmask", cfg.model)
    advmask = _train_or_reuse(TrainConfig(**common, aug="advmask", masks=str(store),
                                          out=str(root / "runs" / "advmask")), cfg.overwrite)

    log.info("stage 4/4: evaluate both")
    for name, run in (("none", baseline), ("advmask", advmask)):
        ev = evaluate(EvalConfig(checkpoint=str(run / "best.pt"), data_dir=cfg.data_dir, device=cfg.device,
                                 attacks=(cfg.robust_attack,), seed=cfg.seed))
        write_eval_json(ev, run / "eval.json")
        attack = next(iter(ev["attacks"].values()))
        result.rows.append({"aug": name, "clean_top1": ev["clean"]["top1"], "attack": attack.get("label", cfg.robust_attack),
                            "robust_top1": attack["top1"], "run": str(run)})

    ds = load_dataset(cfg.data, "train", data_dir=cfg.data_dir, limit=cfg.limit)
    result.preview = save_preview(preview_augment("advmask", ds, n=12, masks=str(store), seed=cfg.seed),
                                  root / "advmask-preview.png", f"AdvMask on {cfg.data}: attack masks of {cfg.model}")
    return result


def _train_or_reuse(cfg: TrainConfig, overwrite: bool) -> Path:
    """Train ``cfg``, resume it, or reuse its finished run folder, so rerunning the demo is cheap."""
    from advpipe.models.checkpoint import load_checkpoint

    last = cfg.run_dir() / "last.pt"
    if last.is_file() and not overwrite:
        done = load_checkpoint(last)
        ignore = {"resume", "overwrite"}
        same = {k: v for k, v in done.config.items() if k not in ignore} == \
            {k: v for k, v in cfg.to_dict().items() if k not in ignore}
        if same and done.epoch >= cfg.epochs:
            log.info("reusing the finished run in %s", cfg.run_dir())
            return cfg.run_dir()
        if same:
            return train(replace(cfg, resume=True)).run_dir
    return train(replace(cfg, overwrite=last.is_file())).run_dir
