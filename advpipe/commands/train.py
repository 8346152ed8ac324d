"""``advpipe train``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from advpipe.cli import DataDirOpt, DataOpt, app
from advpipe.commands.errors_cli import user_errors
from advpipe.commands.reporting import echo
from advpipe.errors import AdvpipeError

def launch_torchrun(nproc: int) -> int:
    """Rerun this command line under torchrun on ``nproc`` processes and return its exit code."""
    from advpipe.train.distributed import torchrun_command

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            argv.append(arg)
    return subprocess.call(torchrun_command(nproc, argv))


@app.command()
@user_errors
def train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of defaults; flags override it."),
    data: Optional[str] = DataOpt,
    data_dir: Optional[str] = DataDirOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N training samples."),
    val_size: Optional[int] = typer.Option(None, "--val-size", help="Hold N training samples out (drawn by --seed) and choose best.pt on them."),
    test_subset: Optional[int] = typer.Option(None, "--test-subset", help="Evaluate each epoch on a fixed N-image test subset (default 2000; 0: all); the last epoch uses the full test set."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Read image-file datasets at this size (folder 224, tinyimagenet 64, flowers102 224)."),
    crop: Optional[str] = typer.Option(None, "--crop", help="Training crop: pad (pad-4 random crop, default) or random-resized (RandomResizedCrop, for fine-tuning at 224); masks follow either."),
    download: Optional[bool] = typer.Option(None, "--download", help="Fetch CIFAR, or the --pretrained torchvision/timm weights (needs internet)."),
    model: Optional[str] = typer.Option(None, "--model", help="Architecture (see `advpipe info`), torchvision:NAME or timm:NAME; default resnet20."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Start from weights: a .safetensors/.pth file, or torchvision / timm (the library's cached weights); the head is replaced for the data's classes."),
    small_stem: Optional[bool] = typer.Option(None, "--small-stem", help="ResNet stem for small inputs: stride-1 first conv, no max-pool (e.g. 64x64)."),
    aug: Optional[str] = typer.Option(None, "--aug", help="AUGMENTATION, METHOD or AUGMENTATION+METHOD; default none."),
    masks: Optional[str] = typer.Option(None, "--masks", help="Mask store path or URL for --aug advmask."),
    masks_digest: Optional[str] = typer.Option(None, "--masks-digest", help="Refuse the --masks store unless its content digest is this sha256:... (docs/sharing.md)."),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="KEY=VALUE fsspec option for a --masks URL, e.g. endpoint_url=... (repeatable)."),
    aug_opt: Optional[list[str]] = typer.Option(None, "--aug-opt", help="KEY=VALUE option of the input augmentation (repeatable)."),
    advmask_l: Optional[str] = typer.Option(None, "--advmask-l", help="AdvMask square side range L_MIN,L_MAX (e.g. 2,15)."),
    advmask_p: Optional[str] = typer.Option(None, "--advmask-p", help="AdvMask masked-ratio range P_MIN,P_MAX (e.g. 0.2,0.4)."),
    advmask_o: Optional[float] = typer.Option(None, "--advmask-o", help="AdvMask maximum overlap o_max (e.g. 0.1)."),
    aug_prob_max: Optional[float] = typer.Option(None, "--aug-prob-max", help="Final fraction of each batch AdvMask occludes (0.8)."),
    aug_warmup_epochs: Optional[int] = typer.Option(None, "--aug-warmup-epochs", help="Epochs over which that fraction grows from 0 (default: all)."),
    method_opt: Optional[list[str]] = typer.Option(None, "--method-opt", help="KEY=VALUE option of the training method (repeatable)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default 30)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default 128)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak SGD learning rate (default 0.1)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay (default 5e-4)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine (default), multistep or constant."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear LR warmup length."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (fp16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Run folder (default runs/<data>/<model>/<aug>/)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Loader threads that decode image-file datasets (default 2)."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Train with DDP on N local processes (launches torchrun)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run folder from last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the run folder."),
) -> None:
    """Train a classifier with an augmentation and/or training method."""
    if nproc_per_node < 1:
        raise AdvpipeError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(launch_torchrun(nproc_per_node))
    from advpipe.train.config import parse_key_values, parse_pair, read_config_file, resolve_config
    from advpipe.train.loop import train as run_train

    file_values = read_config_file(config) if config else {}
    for key, given in (("aug_options", aug_opt), ("method_options", method_opt)):
        if given:
            file_values[key] = {**file_values.get(key, {}), **parse_key_values(given, "--" + key[:-8].replace("_", "-") + "-opt")}
    if masks_digest is not None:  # the pin travels in the masks string, so config.yaml records it
        from advpipe.pipeline.remote import pin_location

        if not (masks or file_values.get("masks")):
            raise AdvpipeError("--masks-digest pins the store given with --masks; pass --masks too")
        masks = pin_location(masks or file_values["masks"], masks_digest)
    overrides = dict(data=data, data_dir=data_dir, limit=limit, val_size=val_size, test_subset=test_subset, image_size=image_size, crop=crop, download=download,
                     model=model, pretrained=pretrained, small_stem=small_stem, aug=aug, masks=masks, epochs=epochs, batch_size=batch_size, lr=lr,
                     weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs, precision=precision,
                     out=out_dir, seed=seed, device=device, workers=workers,
                     resume=resume or None, overwrite=overwrite or None)
    shortcuts = {"l": parse_pair(advmask_l, "--advmask-l", int), "p": parse_pair(advmask_p, "--advmask-p", float),
                 "o": advmask_o, "prob_max": aug_prob_max, "warmup_epochs": aug_warmup_epochs}
    shortcuts = {k: v for k, v in shortcuts.items() if v is not None}
    if shortcuts:
        file_values["aug_options"] = {**file_values.get("aug_options", {}), **shortcuts}
    cfg = resolve_config(file_values, overrides)
    from advpipe.pipeline.remote import storage_options_env

    with storage_options_env(storage_option):  # options reach the store's open but not config.yaml (credentials)
        result = run_train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    m = result.last_metrics
    echo(f"run folder: {result.run_dir}")
    if m:
        on = "validation" if "val_acc" in m else "test"
        echo(f"epoch {m['epoch']}: test accuracy {m['test_acc']:.4f} (best on {on}: {result.best_top1:.4f})")


