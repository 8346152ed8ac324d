"""``advpipe masks``: look at, check, draw and share a mask store (``info``, ``verify``, ``report``, ``show``,
``publish``, ``pull``, ``pack``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.tree import Tree

from advpipe.cli import DataDirOpt, app, out
from advpipe.commands.errors_cli import user_errors
from advpipe.commands.reporting import echo
from advpipe.errors import AdvpipeError, CannotRead

masks_app = typer.Typer(help="Inspect, verify, draw and share mask stores.", no_args_is_help=True)
app.add_typer(masks_app, name="masks", help="Inspect and share a mask store: provenance, verification, Table III, "
              "mask grid, publish, pull, pack.")

StoreArg = typer.Argument(..., help="Mask store: a folder, a .zip or a URL (http(s)://, s3://, ...), optionally "
                          "pinned as STORE#sha256=HEX.")
StorageOpt = typer.Option(None, "--storage-option", help="KEY=VALUE fsspec option for a URL, e.g. "
                          "endpoint_url=http://127.0.0.1:9000 or anon=true (repeatable; a.b=V nests).")
DigestOpt = typer.Option(None, "--digest", help="Refuse the store unless its content digest is this sha256:... "
                         "(as `advpipe masks info` shows).")
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


def _text(value: Any, limit: int = 200) -> str:
    """A store's value as plain text for rich: markup escaped, cut to ``limit`` characters."""
    from rich.markup import escape

    text = str(value)
    return escape(text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)")


def _add_mapping(node: Tree, mapping: dict[str, Any], depth: int = 0) -> None:
    for key, value in list(mapping.items())[:100]:
        if isinstance(value, dict) and depth < 8:
            _add_mapping(node.add(_text(key)), value, depth + 1)
        else:
            node.add(f"{_text(key)}: {_text(value)}")


def _open(store: str, storage_option: Optional[list[str]], digest: Optional[str]) -> Any:
    from advpipe.pipeline.remote import parse_storage_options
    from advpipe.pipeline.reader import open_store

    return open_store(store, storage_options=parse_storage_options(storage_option), digest=digest)


def _published_line(s: Any) -> Optional[str]:
    """Describe the completion marker ``advpipe masks publish`` wrote, if the store has one."""
    import json

    from advpipe.pipeline.manifest import PUBLISHED_KEY

    raw = s.location.read(PUBLISHED_KEY, 1 << 16) if not s.location.is_zip else None
    try:
        marker = json.loads(raw) if raw else None
    except ValueError:
        marker = None
    if not isinstance(marker, dict):
        return None
    same = "" if marker.get("digest") == s.digest else f" [red]for another digest {_text(str(marker.get('digest'))[:80])}[/red]"
    return f"published {_text(str(marker.get('published'))[:40])} with advpipe {_text(str(marker.get('advpipe'))[:20])}{same}"


@masks_app.command("info")
@user_errors
def info(store: str = StoreArg, storage_option: Optional[list[str]] = StorageOpt,
         digest: Optional[str] = DigestOpt) -> None:
    """Show a store's provenance (dataset, model, attack, versions), content digest and summary."""
    from advpipe.pipeline.report import store_summary

    s = _open(store, storage_option, digest)
    prov = s.provenance
    done = s.chunk_done()
    tree = Tree(f"[bold]mask store[/bold] {_text(s.location.root, 1000)}{' (zip)' if s.location.is_zip else ''}")
    status = prov["status"] + (f" (completed {prov['completed']})" if prov.get("completed") else "")
    tree.add(_text(f"format: {prov['format']}, status: {status}, created {prov.get('created')}"))
    if s.manifest is not None:
        pinned = ", pinned" if s.manifest.pinned else ""
        tree.add(f"manifest: {len(s.manifest.objects)} objects, {s.manifest.total_bytes:,} bytes{pinned}")
        if (line := _published_line(s)) is not None:
            tree.add(line)
    else:
        tree.add("manifest: none (a finished precompute or `advpipe masks publish` writes one)")
    ds = prov["dataset"]
    tree.add(_text(f"dataset: {ds['name']}/{ds['split']}, n={ds['n']}, image {tuple(ds['image_shape'])}, "
                   f"fingerprint {ds['fingerprint']}", 1000))
    model = prov["model"]
    tree.add(_text(f"model: {model['arch']}, clean accuracy {100 * model['clean_accuracy']:.2f}%, "
                   f"checkpoint sha256 {model['checkpoint_sha256']}", 1000))
    _add_mapping(tree.add("attack"), prov["attack"])
    tree.add(f"seed {prov['seed']}, chunk size {prov['chunk_size']}, chunks done {int(done.sum())} of {s.n_chunks}")
    versions = prov.get("versions") or {}
    tree.add(_text("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict)
                   else versions, 1000))
    resumed = prov.get("resumed") or []
    if resumed:
        last = resumed[-1].get("time") if isinstance(resumed[-1], dict) else resumed[-1]
        tree.add(_text(f"resumed {len(resumed)} time(s), last at {last}"))
    out.print(tree)
    echo(f"content digest: {s.digest or 'none'}")  # one unbroken line, to copy into --masks-digest
    summary, counted = store_summary(s)
    if summary is None:
        echo("no chunk is done yet")
        return
    if not s.complete:
        echo(f"partial summary: {counted} of {s.n_chunks} chunks done")
    elif (stale := _summary_disagrees(s, summary)) is not None:
        echo(f"warning: the stored summary disagrees with the arrays ({stale}); showing the one recomputed from "
             f"the arrays; run `advpipe masks verify` on the store")
        summary, _ = store_summary(s, recompute=True)
    echo(summary_lines(summary))
    out.print(summary_table(summary))


def _summary_disagrees(s: Any, stored: Any) -> Optional[str]:
    """Name the first key where a complete store's stored summary differs from the arrays (None if none)."""
    import math

    from advpipe.pipeline.report import store_summary

    fresh, _ = store_summary(s, recompute=True)
    if not isinstance(stored, dict):
        return "it is not a mapping"
    for key, value in fresh.items():
        mine = stored.get(key)
        same = (mine == value or (isinstance(mine, (int, float)) and isinstance(value, (int, float))
                                  and not isinstance(mine, bool) and math.isclose(mine, value, rel_tol=1e-9, abs_tol=1e-12)))
        if not same:
            return f"{key}: stored {str(mine)[:40]}, arrays {value}"
    return None


@masks_app.command("verify")
@user_errors
def verify(
    store: str = StoreArg,
    data: Optional[str] = typer.Option(None, "--data", help="Also check the store against this dataset "
                                       "(fingerprint and per-sample hashes)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to check against (default: the store's)."),
    data_dir: Optional[str] = DataDirOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="First N samples of the split (default: the store's n)."),
    storage_option: Optional[list[str]] = StorageOpt,
    digest: Optional[str] = DigestOpt,
    recompute: Optional[int] = typer.Option(None, "--recompute", help="Also re-run the attack for K randomly chosen "
                                            "chunks from the store's recorded configuration and compare the masks "
                                            "(exit 2 if one disagrees)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="With --recompute: the attacked checkpoint "
                                             "(default: found by the store's sha256); its sha256 must match."),
) -> None:
    """Check completeness, layout, checksums, summary and manifest (and the data, with --data); exit 1 on any problem."""
    if checkpoint is not None and recompute is None:
        raise AdvpipeError("--checkpoint is only used with --recompute K")
    import numpy as np

    from advpipe.pipeline.location import Location
    from advpipe.pipeline.remote import parse_storage_options
    from advpipe.pipeline.report import load_store_data
    from advpipe.pipeline.codecs import sample_hash
    from advpipe.pipeline.verify import verify_store
    from advpipe.progress import track

    options = parse_storage_options(storage_option)
    fingerprint = hashes = None
    against = ""
    try:
        s = _open(store, storage_option, digest)
    except CannotRead:
        raise  # not there, not allowed, not answering: bad input (exit 2), not a damaged store
    except AdvpipeError as exc:
        _report_problems(store, [str(exc)])
    if data is not None or split is not None or limit is not None or data_dir is not None:
        ds = load_store_data(s, data=data, split=split, data_dir=data_dir, limit=limit)
        fingerprint = ds.fingerprint
        step = 1000
        parts = [sample_hash(ds.load_images(range(i, min(i + step, len(ds)))).numpy(), layout="NCHW")
                 for i in track(range(0, len(ds), step), "hashing samples")]
        hashes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
        against = f" and matches {ds.name}/{ds.split} ({len(ds)} samples, fingerprint {fingerprint})"
    # A store that cannot be reached (a timeout, no connection) raises: one line, exit 2, no retry.
    problems = verify_store(store, fingerprint=fingerprint, sample_hashes=hashes, storage_options=options, digest=digest)
    if problems:
        _report_problems(store, problems)
    manifest = Location(store, options, digest).load_manifest()
    content = (f"; every object matches its manifest {manifest.digest}{' (pinned)' if manifest.pinned else ''}"
               if manifest is not None else "; it has no manifest, so its content cannot be pinned")
    recomputed = _recompute(s, recompute, checkpoint, data_dir) if recompute is not None else ""
    echo(f"ok: {store} is complete and intact{against}{content}{recomputed}")


def _recompute(s: Any, k: int, checkpoint: Optional[str], data_dir: Optional[str]) -> str:
    """Re-attack ``k`` random chunks of the verified store; raise (exit 2, one line) if one disagrees."""
    from advpipe.pipeline.recompute import check_agreement, recompute_chunks

    results = recompute_chunks(s, k, checkpoint=checkpoint, data_dir=data_dir)
    for result in results:
        echo(f"recomputed {result.describe()}")
    check_agreement(results, provenance=s.provenance)
    exact = sum(r.exact for r in results)
    return (f"; {len(results)} recomputed chunk(s) agree with it ({exact} identical) under the recorded "
            "configuration and checkpoint")


def _report_problems(store: str, problems: list[str]) -> None:
    echo(f"{len(problems)} problem(s) in {store}:")
    for problem in problems:
        echo(f"- {problem}")
    raise typer.Exit(EXIT_PROBLEMS)


@masks_app.command("report")
@user_errors
def report(store: str = StoreArg, storage_option: Optional[list[str]] = StorageOpt,
           digest: Optional[str] = DigestOpt) -> None:
    """Print advmask.txt Table III for a store: ASR and mean/median l0 (elements, pixels), l2, l_inf."""
    from advpipe.pipeline.report import store_summary

    s = _open(store, storage_option, digest)
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
    storage_option: Optional[list[str]] = StorageOpt,
    digest: Optional[str] = DigestOpt,
) -> None:
    """Draw images beside their attack masks: rows of images, masks, and images with the mask in red."""
    import numpy as np
    import torch

    from advpipe.pipeline.report import load_store_data
    from advpipe.pipeline.codecs import sample_hash
    from advpipe.eval.images import save_image_grid

    if n < 1:
        raise AdvpipeError(f"--n must be at least 1, got {n}")
    s = _open(store, storage_option, digest)
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


@masks_app.command("publish")
@user_errors
def publish(
    store: str = typer.Argument(..., help="The finished local store: a folder or a .zip from `advpipe masks pack`."),
    url: str = typer.Argument(..., help="Where to publish it: s3://bucket/prefix/name.zarr or any fsspec URL."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever the destination holds."),
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Verify a store, upload it (data first, metadata and a completion marker last) and confirm the copy."""
    from advpipe.pipeline.remote import parse_storage_options
    from advpipe.pipeline.sharing import publish as run_publish

    result = run_publish(store, url, storage_options=parse_storage_options(storage_option), overwrite=overwrite)
    echo(f"published {store} to {url}: {result.objects} objects, {result.bytes:,} bytes in {result.seconds:.1f} s")
    echo(f"content digest: {result.digest}")
    echo(f"pin it: advpipe train --aug advmask --masks {url} --masks-digest {result.digest}")


@masks_app.command("pull")
@user_errors
def pull(
    url: str = typer.Argument(..., help="The store to copy: a URL (or path), optionally URL#sha256=HEX."),
    dest: Optional[Path] = typer.Argument(None, help="Folder to create (default: the cache, keyed by digest)."),
    digest: Optional[str] = DigestOpt,
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Download a store into a local folder, checking every object against its manifest; reruns resume or skip."""
    from advpipe.pipeline.remote import parse_storage_options
    from advpipe.pipeline.sharing import pull as run_pull

    result = run_pull(url, dest, storage_options=parse_storage_options(storage_option), digest=digest)
    if result.already:
        echo(f"already pulled: {result.path} holds {result.digest}; nothing to do")
    else:
        resumed = f", {result.present} already there from an interrupted pull" if result.present else ""
        echo(f"pulled {result.downloaded} objects ({result.bytes:,} bytes{resumed}) into {result.path}")
        echo(f"content digest: {result.digest}")
    echo(f"train from it: advpipe train --aug advmask --masks {result.path} --masks-digest {result.digest}")


@masks_app.command("pack")
@user_errors
def pack(
    store: str = typer.Argument(..., help="The finished local directory store."),
    out: Path = typer.Argument(..., help="The single-file store to write (a .zip every command reads directly)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Write a verified store as one zarr ZipStore file with the same content digest."""
    from advpipe.pipeline.sharing import pack as run_pack

    result = run_pack(store, out, overwrite=overwrite)
    echo(f"wrote {result.path}: {result.objects} objects, {result.bytes:,} bytes")
    echo(f"content digest: {result.digest}")
