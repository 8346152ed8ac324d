"""``advpipe precompute-masks``: run the AdvMask sparse attack over a dataset split into a mask store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from advpipe.cli import DataDirOpt, DeviceOpt, app, out
from advpipe.commands.errors_cli import user_errors
from advpipe.commands.reporting import echo


@app.command("precompute-masks")
@user_errors
def precompute_masks(
    model: Optional[str] = typer.Option(None, "--model", help="Architecture; its checkpoint defaults to "
                                        "runs/<data>/<model>/none/best.pt (what `advpipe train` writes)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Attack this .pt file instead."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Attack --model with these weights instead "
                                             "of a trained checkpoint: a .safetensors/.pth file, torchvision or timm."),
    small_stem: bool = typer.Option(False, "--small-stem", help="With --pretrained: ResNet stem for small inputs."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="With --pretrained: resize images to this size."),
    download: bool = typer.Option(False, "--download", help="With --pretrained torchvision/timm: fetch missing weights."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset (default: the checkpoint's, else embedded)."),
    data_dir: Optional[str] = DataDirOpt,
    split: str = typer.Option("train", "--split", help="train or test."),
    eps: str = typer.Option("8/255", "--eps", help="l_inf budget in [0,1] pixel units: 8/255, 0.03137 or 8/255.0."),
    out_path: Optional[str] = typer.Option(None, "--out", help="Store path (default masks/<data>-<split>-<model>-eps<e>.zarr)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="linear or unet (default: linear up to 32x32, else unet)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Attack iterations T (default 200)."),
    targeted: Optional[str] = typer.Option(None, "--targeted", help="random or least-likely target (default untargeted)."),
    attack_opt: Optional[list[str]] = typer.Option(None, "--attack-opt", help="KEY=VALUE of any other sparse-attack "
                                                   "setting, e.g. lambda_rule=adaptive (repeatable)."),
    precision: str = typer.Option("auto", "--precision", help="Classifier precision in the attack: auto (bf16 where "
                                  "the device computes it natively, else fp32), fp32, bf16 or fp16. Success is "
                                  "always checked in fp32."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per attack batch (default 100; the "
                                             "encoder is shared per batch)."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Samples per store chunk = per task (default 500)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Local dask worker processes (default: one per "
                                          "visible GPU, one on CPU); 0 runs in this process without dask."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of a running dask scheduler, "
                                            "e.g. tcp://host:8786 (instead of a local cluster)."),
    device: str = DeviceOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Attack only the first N samples of the split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the attack's random draws (per chunk)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store made with another configuration."),
) -> None:
    """Precompute AdvMask attack masks of a dataset split into a resumable Zarr mask store."""
    from advpipe.commands.masks import summary_lines, summary_table
    from advpipe.pipeline.precompute import precompute_masks as run
    from advpipe.pipeline.precompute_config import PrecomputeConfig
    from advpipe.train.config import parse_key_values
    from advpipe.fraction import parse_fraction

    eps_value = parse_fraction(eps, name="--eps")
    if data is None:
        data = _checkpoint_dataset(checkpoint) if checkpoint is not None else "embedded"
    sizes = {k: v for k, v in (("batch_size", batch_size), ("chunk_size", chunk_size)) if v is not None}
    cfg = PrecomputeConfig(
        data=data, model=model, checkpoint=str(checkpoint) if checkpoint is not None else None, split=split,
        pretrained=pretrained, small_stem=small_stem, image_size=image_size, download=download,
        data_dir=data_dir, limit=limit, eps=eps_value, steps=steps, encoder=encoder, targeted=targeted,
        attack_options=parse_key_values(attack_opt or [], "--attack-opt"), precision=precision,
        workers=workers, scheduler=scheduler,
        device=device, seed=seed, out=out_path, overwrite=overwrite, **sizes,
    )
    result = run(cfg)
    if result.chunks_run == 0 and result.chunks_already_done == result.n_chunks and result.images_run == 0:
        echo(f"{result.path} is already complete for this configuration")
    else:
        rate = result.images_run / result.seconds if result.seconds else 0.0
        echo(f"attacked {result.images_run} images in {result.chunks_run} chunks ({rate:.2f} img/s); "
             f"{result.chunks_already_done} of {result.n_chunks} chunks were already done")
    echo(summary_lines(result.summary))
    out.print(summary_table(result.summary))
    echo(f"mask store: {result.path}")


def _checkpoint_dataset(path: Path) -> str:
    from advpipe.models.checkpoint import load_checkpoint

    return load_checkpoint(path).dataset
