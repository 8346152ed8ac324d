"""``advpipe evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from advpipe.cli import DataDirOpt, DeviceOpt, app, out
from advpipe.commands.errors_cli import user_errors
from advpipe.commands.reporting import echo
from advpipe.errors import AdvpipeError


@app.command()
@user_errors
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A .pt file written by advpipe train."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset (default: the one the model was trained on)."),
    data_dir: Optional[str] = DataDirOpt,
    split: str = typer.Option("test", "--split", help="train or test."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N samples only."),
    batch_size: int = typer.Option(256, "--batch-size", help="Evaluation batch size."),
    device: str = DeviceOpt,
    attack: Optional[list[str]] = typer.Option(
        None, "--attack", help="Attack spec, repeatable: 'default' (M2AT suite: FGSM, PGD-10, PGD-20, CW-20 at 8/255), "
                               "fgsm:eps=8/255, pgd:eps=8/255,steps=10[,step=2/255], cw:steps=20, "
                               "pgd-ll:eps=0.04,steps=10, mifgsm-transfer:surrogate=PATH,eps=0.04, "
                               "apgd-ce:eps=8/255,steps=100, apgd-dlr, apgd-t[:targets=9], apgd-suite (worst case of "
                               "APGD-CE and APGD-T; not the full AutoAttack)."),
    corruptions: Optional[str] = typer.Option(
        None, "--corruptions", help="'all' (23), 'standard' (CIFAR-10-C's 15), 'cifar-c' (its 19) or a comma list."),
    corruptions_dir: Optional[Path] = typer.Option(
        None, "--corruptions-dir", help="Read the corruptions from the released CIFAR-10-C / CIFAR-100-C files "
                                        "here (<name>.npy and labels.npy) instead of synthesising them."),
    severities: str = typer.Option("1-5", "--severities", help="Corruption severities: 1-5, 1,3,5 or 3."),
    seed: int = typer.Option(0, "--seed", help="Seed of the attacks' and corruptions' random draws."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (default), bf16, fp16 or auto."),
    json_path: Optional[Path] = typer.Option(
        None, "--json", help="Write the results as JSON here (default: RUN_DIR/eval.json when the checkpoint "
                             "is in a run folder)."),
    cam: int = typer.Option(0, "--cam", help="Also draw the Grad-CAM of the first N test images beside them."),
    cam_out: Optional[Path] = typer.Option(
        None, "--cam-out", help="PNG for --cam (default: cams.png beside the JSON, else in the current folder)."),
) -> None:
    """Measure a checkpoint's clean, adversarial and corruption accuracy and robustness scores."""
    from advpipe.eval.corruptions import parse_corruption_list, parse_severities
    from advpipe.eval.run import EvalConfig, default_eval_path, evaluate as run_eval, write_eval_json
    from advpipe.eval.specs import parse_attack_specs

    if batch_size < 1:
        raise AdvpipeError(f"--batch-size must be at least 1, got {batch_size}")
    if cam < 0:
        raise AdvpipeError(f"--cam must be a number of images (0 for none), got {cam}")
    if cam_out is not None and not cam:
        raise AdvpipeError("--cam-out needs --cam N")
    parse_attack_specs(attack or [])  # refuse bad specs before loading anything
    requested = tuple(p.strip() for p in (corruptions or "").split(",") if p.strip())
    if corruptions_dir is None:
        parse_corruption_list(list(requested))
    cfg = EvalConfig(checkpoint=str(checkpoint), data=data, data_dir=data_dir, split=split, limit=limit,
                     batch_size=batch_size, device=device, precision=precision, attacks=tuple(attack or ()),
                     corruptions=requested, severities=parse_severities(severities), seed=seed,
                     corruptions_dir=None if corruptions_dir is None else str(corruptions_dir))
    result = run_eval(cfg)
    out.print(_class_table(result, split))
    if result["attacks"] or result["corruptions"]:
        out.print(_robustness_table(result, cfg.severities))
    target = json_path or default_eval_path(checkpoint)
    if target is not None:
        echo(f"wrote {write_eval_json(result, target)}")
    if cam:
        _draw_cams(result, checkpoint, cam, cam_out or (target.parent if target else Path(".")) / "cams.png")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _class_table(result: dict[str, Any], split: str) -> Table:
    clean = result["clean"]
    # names come from the checkpoint and the data folder: never read them as rich markup
    table = Table(title=escape(f"{result['checkpoint']['arch']} on {result['data']['name']}/{split} ({clean['n']} images)"))
    table.add_column("class")
    table.add_column("top-1", justify="right")
    for name, acc in zip(result["data"]["class_names"], clean["per_class"]):
        table.add_row(escape(str(name)), _pct(acc))
    table.add_row("[bold]all[/bold]", f"[bold]{_pct(clean['top1'])}[/bold]")
    return table


def _robustness_table(result: dict[str, Any], severities: tuple[int, ...]) -> Table:
    table = Table(title="robustness (R = A_perturbed / A_clean)")
    table.add_column("perturbation")
    table.add_column("top-1", justify="right")
    table.add_column("R", justify="right")
    for s in severities:
        table.add_column(f"s{s}", justify="right")
    blank = [""] * len(severities)
    table.add_row("clean", _pct(result["clean"]["top1"]), _score(1.0 if result["clean"]["top1"] else None), *blank)
    for entry in result["attacks"].values():
        table.add_row(escape(entry["label"]), _pct(entry["top1"]), _score(entry["robustness"]), *blank)
    for name, entry in result["corruptions"].items():
        table.add_row(escape(name), _pct(entry["top1"]), _score(entry["robustness"]),
                      *(_pct(level["top1"]) for level in entry["severities"]))
    summary = result["summary"]
    if result["corruptions"]:
        table.add_row(f"[bold]mean, {summary['standard_corruptions']}/15 standard[/bold]",
                      f"[bold]{_pct(summary['mean_corruption_top1'])}[/bold]",
                      f"[bold]{_score(summary['mean_corruption_robustness'])}[/bold]", *blank)
        if summary["corruptions"] != summary["standard_corruptions"]:
            table.add_row(f"mean, all {summary['corruptions']}", _pct(summary["mean_corruption_top1_all"]),
                          _score(summary["mean_corruption_robustness_all"]), *blank)
    return table


def _draw_cams(result: dict[str, Any], checkpoint: Path, n: int, path: Path) -> None:
    """Grad-CAM of the first ``n`` evaluated images beside them (AdvMask Fig. 3 for one model)."""
    from advpipe.eval.cam import checkpoint_cams, first_images, save_cam_grid
    from advpipe.models.checkpoint import load_checkpoint
    from advpipe.devices import resolve_device

    data = result["data"]
    images, labels, names = first_images(data["name"], data["split"], n, data_dir=result["params"].get("data_dir"),
                                         image_size=load_checkpoint(checkpoint).image_size)
    cams, preds, layer = checkpoint_cams(checkpoint, images, labels, device=resolve_device(result["params"]["device"]))
    written = save_cam_grid(images, labels.tolist(), names, [(result["checkpoint"]["arch"], cams, preds)], path)
    echo(f"wrote {written} (Grad-CAM at {layer})")
