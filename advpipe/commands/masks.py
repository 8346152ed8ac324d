"""``advpipe masks``: look at, check and draw a mask store (``info``, ``verify``, ``report``, ``show``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.tree import Tree

from advpipe.cli import DataDirOpt, app, out
from advpipe.cli_util import echo, user_errors
from advpipe.errors import AdvpipeError

masks_app = typer.Typer(help="Inspect, verify and draw mask stores.", no_args_is_help=True)
app.add_typer(masks_app, name="masks", help="Inspect a mask store: provenance, verification, Table III, mask grid.")

StoreArg = typer.Argument(..., help="Mask store path or URL (http(s)://, s3://, ...).")
#: exit code of ``masks verify`` when the store has problems (bad input is 2, like every command)
EXIT_PROBLEMS = 1


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key == "asr":
        return f"{100 * value:.2f}%"
    if key in ("l0", "l0_pixels"):
        return f"{value:.1f}"
    return f"{value:.4f}"


def summary_lines(summary: dict[str, Any]) -> str:
    """One line saying how many images the summary covers and what the norms are averaged over."""
    skipped = summary["n"] - summary["n_clean_correct"]
    return (f"{summary['n_success']} of the {summary['n_clean_correct']} images the model classified correctly were "
            f"attacked successfully (ASR {_fmt('asr', summary['asr'])}); norms are over those successes; "
            f"{skipped} of {summary['n']} images were misclassified before the attack and are left out")


def summary_table(summary: dict[str, Any]) -> Table:
    """Render a store summary as advmask.txt Table III: ASR and mean/median l0 (elements, pixels), l2, l_inf."""
    from advpipe.pipeline.report import TABLE_III, table_iii_rows

    table = Table()
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("median", justify="right")
    for (label, mean, median), (_, key) in zip(table_iii_rows(summary), TABLE_III):
        table.add_row(label, _fmt(key, mean), _fmt(key, median))
    return table


def _attack_label(prov: dict[str, Any]) -> str:
    attack = prov["attack"]
    kind = f"targeted ({attack.get('target')})" if attack.get("targeted") else "untargeted"
    return f"{prov['model']['arch']} on {prov['dataset']['name']}/{prov['dataset']['split']}, eps {attack.get('eps')}, {kind}"


def _add_mapping(node: Tree, mapping: dict[str, Any]) -> None:
    for key, value in mapping.items():
        if isinstance(value, dict):
            _add_mapping(node.add(f"{key}"), value)
        else:
            node.add(f"{key}: {value}")


@masks_app.command("info")
@user_errors
def info(store: str = StoreArg) -> None:
    """Show a store's provenance (dataset, model, attack, versions) and its summary."""
    from advpipe.pipeline.report import store_summary
    from advpipe.pipeline.store import open_store

    s = open_store(store)
    prov = s.provenance
    done = s.chunk_done()
    tree = Tree(f"[bold]mask store[/bold] {s.location.root}")
    status = prov["status"] + (f" (completed {prov['completed']})" if prov.get("completed") else "")
    tree.add(f"format: {prov['format']}, status: {status}, created {prov['created']}")
    ds = prov["dataset"]
    tree.add(f"dataset: {ds['name']}/{ds['split']}, n={ds['n']}, image {tuple(ds['image_shape'])}, "
             f"fingerprint {ds['fingerprint']}")
    model = prov["model"]
    tree.add(f"model: {model['arch']}, clean accuracy {100 * model['clean_accuracy']:.2f}%, "
             f"checkpoint sha256 {model['checkpoint_sha256']}")
    _add_mapping(tree.add("attack"), prov["attack"])
    tree.add(f"seed {prov['seed']}, chunk size {prov['chunk_size']}, chunks done {int(done.sum())} of {s.n_chunks}")
    versions = prov.get("versions") or {}
    tree.add("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    resumed = prov.get("resumed") or []
    if resumed:
        tree.add(f"resumed {len(resumed)} time(s), last at {resumed[-1].get('time')}")
    out.print(tree)
    summary, counted = store_summary(s)
    if summary is None:
        echo("no chunk is done yet")
        return
    if not s.complete:
        echo(f"partial summary: {counted} of {s.n_chunks} chunks done")
    echo(summary_lines(summary))
    out.print(summary_table(summary))


@masks_app.command("verify")
@user_errors
def verify(
    store: str = StoreArg,
    data: Optional[str] = typer.Option(None, "--data", help="Also check the store against this dataset "
                                       "(fingerprint and per-sample hashes)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to check against (default: the store's)."),
    data_dir: Optional[str] = DataDirOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="First N samples of the split (default: the store's n)."),
) -> None:
    """Check completeness, layout, checksums and summary (and the data, with --data); exit 1 on any problem."""
    import numpy as np

    from advpipe.pipeline.report import load_store_data
    from advpipe.pipeline.store import open_store, sample_hash, verify_store
    from advpipe.progress import track

    fingerprint = hashes = None
    against = ""
    if data is not None or split is not None or limit is not None or data_dir is not None:
        try:
            s = open_store(store)
        except AdvpipeError as exc:
            _report_problems(store, [str(exc)])
        ds = load_store_data(s, data=data, split=split, data_dir=data_dir, limit=limit)
        fingerprint = ds.fingerprint
        step = 1000
        parts = [sample_hash(ds.load_images(range(i, min(i + step, len(ds)))).numpy(), layout="NCHW")
                 for i in track(range(0, len(ds), step), "hashing samples")]
        hashes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
        against = f" and matches {ds.name}/{ds.split} ({len(ds)} samples, fingerprint {fingerprint})"
    try:
        problems = verify_store(store, fingerprint=fingerprint, sample_hashes=hashes)
    except AdvpipeError as exc:
        # The per-sample hash comparison reads the whole sample_hash array and raises if a chunk of
        # it is damaged; report that chunk through the structural check instead.
        problems = verify_store(store, fingerprint=fingerprint) + [f"sample hashes could not be compared: {exc}"]
    if problems:
        _report_problems(store, problems)
    echo(f"ok: {store} is complete and intact{against}")


def _report_problems(store: str, problems: list[str]) -> None:
    echo(f"{len(problems)} problem(s) in {store}:")
    for problem in problems:
        echo(f"- {problem}")
    raise typer.Exit(EXIT_PROBLEMS)


@masks_app.command("report")
@user_errors
def report(store: str = StoreArg) -> None:
    """Print advmask.txt Table III for a store: ASR and mean/median l0 (elements, pixels), l2, l_inf."""
    from advpipe.pipeline.report import store_summary
    from advpipe.pipeline.store import open_store

    s = open_store(store)
    summary, counted = store_summary(s, recompute=True)
    if summary is None:
        raise AdvpipeError(f"{store} has no finished chunk yet; nothing to report")
    echo(_attack_label(s.provenance))
    if not s.complete:
        echo(f"partial: {counted} of {s.n_chunks} chunks done")
    echo(summary_lines(summary))
    out.print(summary_table(summary))


@masks_app.command("show")
@user_errors
def show(
    store: str = StoreArg,
    n: int = typer.Option(16, "--n", help="Number of images to draw."),
    start: int = typer.Option(0, "--start", help="First sample index."),
    out_path: Path = typer.Option(Path("masks-grid.png"), "--out", help="PNG file to write."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset to take the images from (default: the store's)."),
    data_dir: Optional[str] = DataDirOpt,
) -> None:
    """Draw images beside their attack masks: rows of images, masks, and images with the mask in red."""
    import numpy as np
    import torch

    from advpipe.pipeline.report import load_store_data
    from advpipe.pipeline.store import open_store, sample_hash
    from advpipe.viz import save_image_grid

    if n < 1:
        raise AdvpipeError(f"--n must be at least 1, got {n}")
    s = open_store(store)
    if not 0 <= start < s.n:
        raise AdvpipeError(f"--start must be in [0, {s.n}), got {start}")
    ds = load_store_data(s, data=data, data_dir=data_dir)
    expected = s.provenance["dataset"]["fingerprint"]
    if ds.fingerprint != expected:
        raise AdvpipeError(f"the images of {ds.name}/{ds.split} do not match the store: fingerprint store {expected} "
                           f"vs data {ds.fingerprint}; pass the store's data with --data/--data-dir")
    done_rows = np.repeat(s.chunk_done(), s.chunk_size)[: s.n]
    index = np.flatnonzero(done_rows[start:])[:n] + start
    if index.size == 0:
        raise AdvpipeError(f"{store} has no finished chunk at or after sample {start}")
    lo, hi = int(index[0]), int(index[-1]) + 1
    masks = torch.from_numpy(s.read_masks(lo, hi)[index - lo])
    images = ds.load_images(torch.from_numpy(index))
    if not np.array_equal(sample_hash(images.numpy(), layout="NCHW"), s.sample_hashes()[index]):
        raise AdvpipeError("the images do not match the store's per-sample hashes")
    metrics = s.metrics()
    x = images.float() / 255
    weight = 0.65 * masks.unsqueeze(1).float()
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    overlay = x * (1 - weight) + red * weight
    cols = min(len(index), 8)
    rows, titles, names = [], [], []
    for g in range(0, len(index), cols):
        sel = index[g : g + cols]
        rows += [x[g : g + cols], masks[g : g + cols], overlay[g : g + cols]]
        names += ["image", "mask", "overlay"]
        titles += [[f"#{i} {ds.class_names[int(ds.labels[i])]}" for i in sel],
                   [f"{int(metrics['l0_pixels'][i])} px" for i in sel],
                   ["success" if metrics["success"][i] else "failed" for i in sel]]
    save_image_grid(rows, out_path, row_titles=names, cell_titles=titles, title=_attack_label(s.provenance))
    echo(f"wrote {out_path}")
