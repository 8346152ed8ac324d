"""What a precompute run depends on: its config, how it is validated, and what it derives (attack, paths).

:func:`attack_config` turns a :class:`PrecomputeConfig` into the sparse attack's config; errors
name config fields (the CLI shows them as flags).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

from advpipe.attacks.sparse_config import FRACTION_FIELDS, SparseAttackConfig
from advpipe.errors import AdvpipeError
from advpipe.models.checkpoint import BUILTIN_PREFIX, builtin_checkpoints, resolve_checkpoint
from advpipe.paths import default_run_dir
from advpipe.pipeline.reader import open_store
from advpipe.pipeline.writer import DEFAULT_CHUNK_SIZE
from advpipe.devices import fast_bf16, resolve_device
from advpipe.files import sha256_file
from advpipe.fraction import parse_fraction

#: images per attack call; a 500-sample chunk is 5 batches. The encoder is shared per batch.
DEFAULT_BATCH_SIZE = 100
#: SparseAttackConfig fields set by a PrecomputeConfig field (and flag) of their own, never via attack_options
ATTACK_FLAGS = {"eps": "eps", "steps": "steps", "encoder": "encoder", "targeted": "targeted",
                "target": "targeted", "autocast_dtype": "precision"}
#: --precision values; the attack's autocast dtype for each (auto is resolved per run, see resolve_precision)
PRECISIONS = {"auto": None, "fp32": None, "bf16": "bf16", "fp16": "fp16"}
TARGET_MODES = ("random", "least-likely")


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything a precompute run depends on (the command builds it from its flags).

    ``model`` names the architecture whose default checkpoint ``runs/<data>/<model>/none/best.pt``
    is attacked unless ``checkpoint`` is given, or whose ``pretrained`` weights (a file, or
    ``torchvision``/``timm``; ``download`` fetches those) are attacked directly
    (:func:`pretrained_victim`), with ``small_stem`` and images resized to ``image_size``.
    ``steps``/``encoder`` of None keep the attack's
    defaults; ``targeted`` is None (untargeted), ``"random"`` or ``"least-likely"``;
    ``attack_options`` sets any other :class:`SparseAttackConfig` field. ``precision`` is the
    classifier's autocast in the attack (see :func:`resolve_precision` for ``auto``). ``workers``
    = 0 runs in this process, None = one worker per visible GPU (one on CPU); ``scheduler`` is the
    address of an existing dask scheduler instead of a local cluster.
    """

    data: str = "embedded"
    model: str | None = None
    checkpoint: str | None = None
    pretrained: str | None = None
    small_stem: bool = False
    image_size: int | None = None
    download: bool = False
    split: str = "train"
    data_dir: str | None = None
    limit: int | None = None
    eps: Fraction = Fraction(8, 255)
    steps: int | None = None
    encoder: str | None = None
    targeted: str | None = None
    attack_options: Mapping[str, Any] = field(default_factory=dict)
    precision: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE
    workers: int | None = None
    scheduler: str | None = None
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    overwrite: bool = False



def default_checkpoint(data: str, model: str) -> Path:
    """The checkpoint ``advpipe train --data DATA --model MODEL`` writes: ``runs/<data>/<model>/none/best.pt``."""
    return default_run_dir(data, model, "none") / "best.pt"


def find_checkpoint(data: str, model: str | None, checkpoint: str | Path | None = None, *,
                    sha256: str | None = None) -> Path:
    """The checkpoint to attack: ``checkpoint`` (a path or ``builtin:<name>``), else the default run's best.pt.

    With ``sha256`` (what a store records), ``checkpoint`` is refused unless it has that sha256; without
    ``checkpoint``, the first of the shipped checkpoints and the default run's best.pt that has it is returned.
    """
    if checkpoint is not None:
        path = resolve_checkpoint(checkpoint)
        if sha256 is not None and not path.is_file():
            raise AdvpipeError(f"checkpoint {checkpoint} does not exist")
        if sha256 is not None and (found := sha256_file(path)) != sha256:
            raise AdvpipeError(f"checkpoint {checkpoint} has sha256 {found}, but the store was made with "
                               f"{sha256}; give the checkpoint the store records")
        return path
    if model is None:
        raise AdvpipeError("pass model (to use the trained run's best.pt) or checkpoint PATH",
                           fields=("model", "checkpoint"))
    path = default_checkpoint(data, model)
    if sha256 is not None:
        tried = [BUILTIN_PREFIX + name for name in builtin_checkpoints()] + [str(path)]
        for spec in tried:
            if (found_path := resolve_checkpoint(spec)).is_file() and sha256_file(found_path) == sha256:
                return found_path
        raise AdvpipeError(f"no checkpoint with the store's sha256 {sha256} found (tried {', '.join(tried)}); "
                           "give its path")
    if not path.is_file():
        raise AdvpipeError(
            f"no trained {model} for {data}: {path} does not exist; train it first with "
            f"`advpipe train --data {data} --model {model}` or pass checkpoint PATH", fields=("checkpoint",))
    return path


def pretrained_victim(cfg: PrecomputeConfig) -> Path:
    """Write ``model`` with its ``pretrained`` weights as an advpipe checkpoint (the victim) and return its path.

    The file lies in ``victims/`` beside the store (``masks/victims/`` by default), named by a hash
    of everything it depends on. A replaced head is initialised from ``seed``, so the same
    options always write the same bytes and a rerun resumes its store. Its fingerprint is
    ``pretrained:<source>`` (the weights' training data is not known here).
    """
    import hashlib

    import torch

    from advpipe.data.datasets import load_dataset
    from advpipe.models.build import build_model
    from advpipe.models.checkpoint import Checkpoint, save_checkpoint

    if cfg.model is None or cfg.checkpoint is not None:
        raise AdvpipeError("pretrained needs model (the architecture its weights are for) and excludes checkpoint",
                           fields=("pretrained", "model", "checkpoint"))
    ds = load_dataset(cfg.data, cfg.split, data_dir=cfg.data_dir, limit=cfg.limit, image_size=cfg.image_size,
                      download=cfg.download)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, ds, pretrained=cfg.pretrained, small_stem=cfg.small_stem, download=cfg.download)
    net = model.model
    ckpt = Checkpoint(arch=cfg.model, num_classes=ds.num_classes, dataset=cfg.data,
                      fingerprint=f"pretrained:{cfg.pretrained}", mean=tuple(model.mean.flatten().tolist()),
                      std=tuple(model.std.flatten().tolist()), image_size=ds.image_shape[-1],
                      model_state={k: v.detach().clone() for k, v in net.state_dict().items()},
                      small_stem=cfg.small_stem, info={"pretrained": cfg.pretrained})
    key = hashlib.sha256(repr((cfg.pretrained, cfg.model, cfg.small_stem, ds.num_classes, ds.image_shape,
                               cfg.seed)).encode()).hexdigest()[:12]
    folder = (Path(cfg.out).parent if cfg.out else Path("masks")) / "victims"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cfg.data}-{cfg.model.replace(':', '_').replace('/', '_')}-{key}.pt"
    save_checkpoint(path, ckpt)
    return path


def attack_config(cfg: PrecomputeConfig) -> SparseAttackConfig:
    """Build the sparse attack's config from the flags and ``attack_options`` (validated by the attack)."""
    options = dict(cfg.attack_options)
    known = {f.name for f in dataclasses.fields(SparseAttackConfig)}
    for key in options:
        if key in ATTACK_FLAGS:
            raise AdvpipeError(f"attack_options {key!r}: set {ATTACK_FLAGS[key]} instead",
                               fields=("attack_options", ATTACK_FLAGS[key]))
        if key not in known:
            choices = ", ".join(sorted(known - set(ATTACK_FLAGS)))
            raise AdvpipeError(f"unknown attack_options {key!r}; choose from: {choices}", fields=("attack_options",))
    for key in FRACTION_FIELDS:  # eps is a flag of its own
        if isinstance(options.get(key), str):
            options[key] = parse_fraction(options[key], name=f"attack_options {key}")
    values: dict[str, Any] = {"eps": cfg.eps, **options}
    if cfg.steps is not None:
        values["steps"] = cfg.steps
    if cfg.encoder is not None:
        values["encoder"] = cfg.encoder
    if cfg.targeted is not None:
        if cfg.targeted not in TARGET_MODES:
            raise AdvpipeError(f"targeted must be one of {', '.join(TARGET_MODES)}, got {cfg.targeted!r}",
                               fields=("targeted",))
        values.update(targeted=True, target=cfg.targeted)
    values["autocast_dtype"] = PRECISIONS[cfg.precision]
    return SparseAttackConfig(**values)


def resolve_precision(cfg: PrecomputeConfig, path: Path) -> str | None:
    """The attack's autocast dtype for this run: ``--precision`` itself, or what ``auto`` means here.

    ``auto`` keeps the precision of an existing store at ``path`` (so a resume on another machine
    continues as it started, unless ``--overwrite``); for a new store it is bf16 where the device
    computes bf16 natively (:func:`advpipe.devices.fast_bf16`) and fp32 elsewhere, including with
    ``--scheduler`` (the workers' hardware is not known here). Success is always checked in fp32.
    """
    if cfg.precision != "auto":
        return PRECISIONS[cfg.precision]
    if not cfg.overwrite and (path / "zarr.json").is_file():
        try:
            attack = open_store(path).provenance.get("attack", {})
        except AdvpipeError:
            attack = {}
        if "autocast_dtype" in attack and attack["autocast_dtype"] in PRECISIONS.values():
            return attack["autocast_dtype"]
    if cfg.scheduler is not None:
        return None
    return "bf16" if fast_bf16(resolve_device(cfg.device)) else None


def check_run_options(batch_size: int, chunk_size: int, workers: int | None, scheduler: str | None,
                      seed: int, *, in_process_with_scheduler: bool = True) -> None:
    """Refuse bad batch/chunk sizes, worker counts and seeds (shared by the CLI's and the objects' precompute).

    ``in_process_with_scheduler=False`` also refuses ``workers=0`` beside a scheduler (the command
    line, where any ``--workers`` with ``--scheduler`` is a contradiction).
    """
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AdvpipeError(f"{name} must be a positive integer, got {value!r}", fields=(name,))
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise AdvpipeError(f"workers must be 0 (in this process), a positive number or None, got {workers!r}",
                           fields=("workers",))
    if scheduler is not None and workers is not None and (workers != 0 or not in_process_with_scheduler):
        raise AdvpipeError("workers and scheduler exclude each other (an existing dask cluster brings its own)",
                           fields=("workers", "scheduler"))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AdvpipeError(f"seed must be an integer >= 0, got {seed!r}", fields=("seed",))


def check_config(cfg: PrecomputeConfig) -> None:
    """Refuse a config whose values are out of range (one error naming the field)."""
    if not isinstance(cfg.eps, Fraction) or not 0 < cfg.eps <= 1:
        raise AdvpipeError(f"eps must be a fraction in (0, 1], got {cfg.eps!r}", fields=("eps",))
    check_run_options(cfg.batch_size, cfg.chunk_size, cfg.workers, cfg.scheduler, cfg.seed,
                      in_process_with_scheduler=False)
    if cfg.steps is not None and cfg.steps < 1:
        raise AdvpipeError(f"steps must be at least 1, got {cfg.steps}", fields=("steps",))
    if cfg.limit is not None and cfg.limit < 1:
        raise AdvpipeError(f"limit must be a positive number of samples, got {cfg.limit}", fields=("limit",))
    if cfg.precision not in PRECISIONS:
        raise AdvpipeError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}",
                           fields=("precision",))
    if cfg.pretrained is None and (cfg.small_stem or cfg.image_size is not None):
        raise AdvpipeError("small_stem and image_size apply with pretrained; a checkpoint records its own",
                           fields=("small_stem", "image_size", "pretrained"))
    if cfg.image_size is not None and cfg.image_size < 1:
        raise AdvpipeError(f"image_size must be a positive number, got {cfg.image_size}", fields=("image_size",))


def default_store_path(cfg: PrecomputeConfig, arch: str, attack: SparseAttackConfig) -> Path:
    """A descriptive store path under ``masks/``, e.g. ``masks/cifar10-train-vgg19-eps8_255.zarr``."""
    eps = Fraction(cfg.eps)
    parts = [cfg.data, cfg.split, arch, f"eps{eps.numerator}_{eps.denominator}"]
    if cfg.limit is not None:
        parts.append(f"n{cfg.limit}")
    if cfg.targeted is not None:
        parts.append(f"targeted-{cfg.targeted}")
    if cfg.steps is not None and cfg.steps != SparseAttackConfig().steps:
        parts.append(f"steps{cfg.steps}")
    if cfg.encoder is not None:
        parts.append(cfg.encoder)
    if cfg.seed:
        parts.append(f"seed{cfg.seed}")
    if cfg.attack_options:
        # Any other hyperparameter gets a short stable tag so variants do not collide.
        import hashlib
        import json

        # The precision is left out: --precision auto may resolve differently on another machine.
        options = {k: v for k, v in attack.to_dict().items() if k != "autocast_dtype"}
        tag = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
        parts.append(f"opts{tag}")
    return Path("masks") / ("-".join(p.replace("/", "_").replace(":", "_") for p in parts) + ".zarr")
