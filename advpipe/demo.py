"""The main job end to end on the embedded data: masks from a real victim, then three trainings, evaluated.

1. precompute AdvMask attack masks of the embedded training images with the shipped ResNet-20
   victim (``builtin:resnet20-cifar10``, trained on all of CIFAR-10 train, which contains them);
2. train ResNet-20 with ``--aug none``, ``cutout`` and ``advmask`` on the same data and seed;
3. evaluate each (clean and FGSM) and compare with ``none``, saying whether each difference is
   larger than the seed-to-seed noise of this very setting (measured once, see SEED_NOISE).

Every stage is the same library call the individual commands make, and a rerun reuses what is done.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from advpipe.eval.run import EvalConfig, evaluate, write_eval_json
from advpipe.train.config import TrainConfig
from advpipe.train.loop import train
from advpipe.train.resume import finish_run

log = logging.getLogger(__name__)

#: the augmentations the demo trains, the first one being the baseline
DEMO_AUGS = ("none", "cutout", "advmask")
#: Seed-to-seed standard deviation of clean top-1 (percentage points) in the demo's default setting
#: (embedded data, ResNet-20, 45 epochs, batch 128, bf16, 25 attack steps): the std of `none` over
#: seeds 0 and 2 (53.0% and 55.9%), measured on 2026-12-07 with ``advpipe study
#: configs/studies/demo-noise.yaml`` (docs/results/demo-noise/). Provisional: the study's other runs
#: (none seed 1, cutout seeds 1-2) resume next session. It only applies to the default setting.
SEED_NOISE = {"clean_top1_std_pp": 2.05, "source": "docs/results/demo-noise/report.md", "seeds": 2, "rows": "none"}


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo pipeline."""

    out: str = "demo"
    data: str = "embedded"
    data_dir: str | None = None
    limit: int | None = None
    model: str = "resnet20"
    victim: str = "builtin:resnet20-cifar10"
    epochs: int = 45
    batch_size: int = 128
    eps: Fraction = Fraction(8, 255)
    attack_steps: int = 25
    robust_attack: str = "fgsm:eps=2/255"
    #: auto: bf16 where the device computes it natively (advpipe.devices.fast_bf16), else fp32
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False

    @property
    def is_default_setting(self) -> bool:
        """Whether the noise figure in SEED_NOISE was measured for these settings."""
        default = DemoConfig()
        keys = ("data", "limit", "model", "epochs", "batch_size", "victim", "attack_steps", "eps", "precision")
        return all(getattr(self, k) == getattr(default, k) for k in keys)


@dataclass
class DemoResult:
    """What the demo produced."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    store: Path | None = None
    preview: Path | None = None
    mask_summary: dict[str, Any] = field(default_factory=dict)
    noise_pp: float | None = None


def noise_verdict(diff_pp: float, noise_pp: float | None) -> str:
    """Whether a one-seed difference of two runs exceeds the seed noise (|d| > 1.96 * sqrt(2) * std)."""
    if noise_pp is None:
        return "noise not measured for these settings"
    bound = 1.96 * math.sqrt(2) * noise_pp
    return f"{'exceeds' if abs(diff_pp) > bound else 'inside'} the seed noise (±{bound:.1f} pp)"


def last_train_accuracy(run: Path) -> float | None:
    """Training accuracy of a run's last epoch (on its augmented batches), from metrics.jsonl."""
    import json

    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]).get("train_acc") if lines else None


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the stages and return the comparison of the augmentations with ``none``."""
    from advpipe.preview import preview_augment, save_preview
    from advpipe.data.datasets import load_dataset
    from advpipe.pipeline.precompute import precompute_masks
    from advpipe.pipeline.precompute_config import PrecomputeConfig

    root = Path(cfg.out)
    result = DemoResult(noise_pp=SEED_NOISE["clean_top1_std_pp"] if cfg.is_default_setting else None)

    log.info("stage 1/3: precompute AdvMask attack masks with %s", cfg.victim)
    store = root / "masks" / f"{cfg.data}-train-{cfg.victim.replace('builtin:', '')}.zarr"
    masks = precompute_masks(PrecomputeConfig(data=cfg.data, data_dir=cfg.data_dir, limit=cfg.limit,
                                              checkpoint=cfg.victim, split="train", eps=cfg.eps,
                                              steps=cfg.attack_steps, workers=0, device=cfg.device, seed=cfg.seed,
                                              out=str(store), overwrite=cfg.overwrite))
    result.store, result.mask_summary = masks.path, masks.summary

    precision = cfg.precision
    if precision == "auto":
        from advpipe.devices import fast_bf16, resolve_device

        precision = "bf16" if fast_bf16(resolve_device(cfg.device)) else "auto"
    common = dict(data=cfg.data, data_dir=cfg.data_dir, limit=cfg.limit, model=cfg.model, epochs=cfg.epochs,
                  batch_size=cfg.batch_size, precision=precision, device=cfg.device, seed=cfg.seed,
                  warmup_epochs=min(1.0, cfg.epochs / 10))
    runs = {}
    for i, aug in enumerate(DEMO_AUGS):
        log.info("stage 2/3: train %s with --aug %s (%d of %d)", cfg.model, aug, i + 1, len(DEMO_AUGS))
        run_cfg = TrainConfig(**common, aug=aug, masks=str(store) if aug == "advmask" else None,
                              out=str(root / "runs" / aug))
        runs[aug] = train(replace(run_cfg, overwrite=True)).run_dir if cfg.overwrite else \
            finish_run(run_cfg, on_change="overwrite")

    log.info("stage 3/3: evaluate")
    for aug, run in runs.items():
        ev = evaluate(EvalConfig(checkpoint=str(run / "last.pt"), data_dir=cfg.data_dir, device=cfg.device,
                                 attacks=(cfg.robust_attack,), seed=cfg.seed))
        write_eval_json(ev, run / "eval.json")
        attack = next(iter(ev["attacks"].values()))
        train_acc = last_train_accuracy(run)
        result.rows.append({"aug": aug, "train_top1": train_acc, "clean_top1": ev["clean"]["top1"],
                            "gap_pp": None if train_acc is None else 100 * (train_acc - ev["clean"]["top1"]),
                            "attack": attack.get("label", cfg.robust_attack), "robust_top1": attack["top1"],
                            "run": str(run)})
    base = result.rows[0]["clean_top1"]
    for row in result.rows[1:]:
        row["clean_diff_pp"] = 100 * (row["clean_top1"] - base)
        row["verdict"] = noise_verdict(row["clean_diff_pp"], result.noise_pp)

    ds = load_dataset(cfg.data, "train", data_dir=cfg.data_dir, limit=cfg.limit)
    result.preview = save_preview(preview_augment("advmask", ds, n=12, masks=str(store), seed=cfg.seed),
                                  root / "advmask-preview.png", f"AdvMask on {cfg.data}: attack masks of {cfg.victim}")
    return result
