"""``advpipe report``: compare evaluated runs side by side in Markdown, PNG plots and CSV.

Each run folder contributes its evaluation JSON (``RUN_DIR/eval.json``, written by ``advpipe
evaluate`` when the checkpoint lives there) and its ``metrics.jsonl`` training curve. The tables
follow the papers' layouts: methods as rows, clean accuracy first, then one column per attack
and corruption (AdvMask Table I, M2AT Table 1 for accuracies; M-TLAT Table 1 for robustness
scores), the best entry of every column in bold. Runs evaluated on different data (their test
data fingerprints differ) are refused unless ``force`` is set.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from advpipe import __version__
from advpipe.errors import AdvpipeError
from advpipe.eval import seed_report
from advpipe.eval.plots import plot_robustness_bars, plot_training_curves
from advpipe.eval.run import EVAL_FILENAME
from advpipe.files import atomic_write_text, check_writable_dir

REPORT_FILENAME = "report.md"
CURVES_FILENAME = "curves.png"
BARS_FILENAME = "robustness.png"
CSV_FILENAME = "report.csv"
AGGREGATE_JSON, AGGREGATE_CSV, AGGREGATE_PNG = "aggregates.json", "aggregates.csv", "aggregates.png"


@dataclass(frozen=True)
class ReportConfig:
    """Which runs to compare and where to write the report."""

    runs: tuple[str, ...]
    out: str = "report"
    csv: bool = False
    force: bool = False
    baseline: str | None = None
    cam: int = 0  # Grad-CAM grid of the first N test images for every run (advpipe.eval.cam); 0 = none


@dataclass
class RunRecord:
    """One run as the report sees it: its evaluation result, training metrics and config."""

    name: str
    folder: Path
    eval_path: Path
    result: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """Architecture name."""
        return str(self.result.get("checkpoint", {}).get("arch", "?"))

    @property
    def method(self) -> str:
        """The ``--aug`` of the training run (config.yaml), else the checkpoint's method."""
        return str(self.config.get("aug") or self.result.get("checkpoint", {}).get("method", "?"))


@dataclass(frozen=True)
class Column:
    """One table column: clean accuracy, an attack, a corruption or the corruption mean."""

    key: str
    label: str
    group: str


@dataclass
class ReportResult:
    """What ``build_report`` wrote."""

    out_dir: Path
    files: list[Path]
    markdown: str
    warnings: list[str]


# --------------------------------------------------------------------------- loading


def load_run(path: str | Path, name: str | None = None) -> RunRecord:
    """Read a run folder (or an evaluation JSON file) into a RunRecord; missing pieces raise AdvpipeError."""
    path = Path(path)
    if path.is_file():
        folder, eval_path = path.parent, path
    elif path.is_dir():
        folder, eval_path = path, path / EVAL_FILENAME
        if not eval_path.is_file():
            raise AdvpipeError(f"{path} has no {EVAL_FILENAME}; run `advpipe evaluate --checkpoint {path / 'best.pt'}` "
                               "first (it writes RUN_DIR/eval.json)")
    else:
        raise AdvpipeError(f"run folder {str(path)!r} does not exist")
    try:
        result = json.loads(eval_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdvpipeError(f"cannot read evaluation JSON {eval_path}: {exc}") from exc
    if not (isinstance(result, dict) and all(isinstance(result.get(k), dict) for k in ("clean", "data"))):
        raise AdvpipeError(f"{eval_path} is not an advpipe evaluation result (no 'clean' and 'data' entries)")
    result.setdefault("attacks", {})
    result.setdefault("corruptions", {})
    return RunRecord(name or folder.name, folder, eval_path, result, _read_metrics(folder / "metrics.jsonl"),
                     _read_config(folder / "config.yaml"))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AdvpipeError(f"{path} line {number} is not JSON") from exc
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Short distinct names for run folders: the folder name, lengthened with parents until unique."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def check_fingerprints(runs: Sequence[RunRecord], *, force: bool) -> list[str]:
    """Refuse runs evaluated on different data (AdvpipeError), or with ``force`` return a warning."""
    fingerprints = {str(run.result["data"].get("fingerprint")) for run in runs}
    if len(fingerprints) <= 1:
        return []
    detail = "; ".join(f"{run.name}: {run.result['data'].get('name')}/{run.result['data'].get('split')} "
                       f"n={run.result['data'].get('n')} {str(run.result['data'].get('fingerprint'))[:23]}"
                       for run in runs)
    if not force:
        raise AdvpipeError(f"the runs were evaluated on different test data ({detail}); evaluate them on the same "
                           "data or pass force to compare anyway", fields=("force",))
    return [f"runs were evaluated on different test data, compared anyway (--force): {detail}"]


# --------------------------------------------------------------------------- tables


def report_columns(runs: Sequence[RunRecord]) -> list[Column]:
    """Clean, then every attack and corruption found in any run (first-seen order), then the mean."""
    cols = [Column("clean", "Clean", "clean")]
    seen: set[str] = set()
    for group in ("attacks", "corruptions"):
        for run in runs:
            for key, entry in run.result[group].items():
                col_key = f"{group[:-1]}:{key}"
                if col_key not in seen:
                    seen.add(col_key)
                    cols.append(Column(col_key, str(entry.get("label") or entry.get("name") or key), group[:-1]))
    if any(run.result["corruptions"] for run in runs):
        cols.append(Column("mean-corruption", "Mean corruption", "summary"))
    return cols


def cell(run: RunRecord, column: Column, metric: str) -> float | None:
    """The run's ``top1`` or ``robustness`` value in ``column`` (None when it was not evaluated)."""
    result = run.result
    if column.group == "clean":
        return result["clean"].get("top1") if metric == "top1" else (1.0 if result["clean"].get("top1") else None)
    if column.group == "summary":
        summary = result.get("summary", {})
        return summary.get("mean_corruption_top1" if metric == "top1" else "mean_corruption_robustness")
    group, _, key = column.key.partition(":")
    entry = result[f"{group}s"].get(key)
    return None if entry is None else entry.get(metric)


def _markdown_table(runs: Sequence[RunRecord], columns: Sequence[Column],
                    value: Callable[[RunRecord, Column], float | None], fmt: Callable[[Column, float], str],
                    baseline: RunRecord | None) -> list[str]:
    """Rows = runs, one column per entry; the best displayed value of each column is bold.

    Best and the baseline marks compare the *displayed* (rounded) values, so entries that print
    the same are tied.
    """
    header = ["Run", "Model", "Method", *(c.label for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(columns)]
    best: dict[str, float | None] = {}
    for col in columns:
        shown = [float(fmt(col, v)) for v in (value(r, col) for r in runs) if v is not None]
        # A column where every run ties has no best entry worth marking.
        best[col.key] = max(shown) if len(set(shown)) > 1 else None
    for run in runs:
        cells = []
        for col in columns:
            v = value(run, col)
            if v is None:
                cells.append("–")
                continue
            text = fmt(col, v)
            mark = ""
            if baseline is not None and run is not baseline:
                ref = value(baseline, col)
                if ref is not None and float(text) != float(fmt(col, ref)):
                    mark = "⁺" if float(text) > float(fmt(col, ref)) else "⁻"
            if float(text) == best[col.key]:
                text = f"**{text}**"
            cells.append(text + mark)
        lines.append("| " + " | ".join([run.name, run.model, run.method, *cells]) + " |")
    return lines


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _score(v: float) -> str:
    return f"{v:.3f}"


def render_markdown(runs: Sequence[RunRecord], columns: Sequence[Column], *, baseline: RunRecord | None,
                    warnings: Sequence[str], images: Sequence[tuple[str, str]], aggregate: Sequence[str] = ()) -> str:
    """The whole report.md text."""
    first = runs[0].result["data"]
    out = [
        "# advpipe robustness report",
        "",
        f"Generated by advpipe {__version__} on {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} "
        f"from {len(runs)} run(s). Evaluation data: {first.get('name')}/{first.get('split')}, "
        f"{first.get('n')} images, fingerprint `{str(first.get('fingerprint'))[:23]}`.",
        "",
    ]
    for warning in warnings:
        out += [f"> **Warning:** {warning}", ""]
    if aggregate:
        out += [*aggregate, ""]
    out += ["## Runs", "", "| Run | Model | Method | Epoch | Checkpoint sha256 | Evaluated | Folder |",
            "|---|---|---|---:|---|---|---|"]
    for run in runs:
        ck = run.result.get("checkpoint", {})
        out.append(f"| {run.name} | {run.model} | {run.method} | {ck.get('epoch', '?')} | "
                   f"`{str(ck.get('sha256', '?'))[:12]}` | {run.result.get('created', '?')} | `{run.folder}` |")
    legend = "Best entry of each column in **bold**"
    if baseline is not None:
        legend += f"; ⁺ / ⁻ mark entries above / below the baseline run `{baseline.name}` (as in M-TLAT Table 1)"
    out += ["", "## Accuracy (%)", "",
            "Top-1 accuracy on clean and perturbed test images (layout of AdvMask Table I and M2AT Table 1). "
            "Corruption columns average the evaluated severities. " + legend + ".", ""]
    out += _markdown_table(runs, columns, lambda r, c: cell(r, c, "top1"), lambda c, v: _pct(v), baseline)
    if len(columns) > 1:
        out += ["", "## Robustness score R = A_perturbed / A_clean", "",
                "M-TLAT's robustness score (m-tlat.txt Eq. 7, layout of its Table 1): *Clean* is the clean accuracy "
                "in %, every other column the perturbed accuracy divided by the clean accuracy (corruptions: mean "
                "over severities). R hides the clean accuracy, so compare it only between runs of similar clean "
                "accuracy. " + legend + ".", ""]
        out += _markdown_table(runs, columns, lambda r, c: cell(r, c, "top1" if c.group == "clean" else "robustness"),
                               lambda c, v: _pct(v) if c.group == "clean" else _score(v), baseline)
    per_severity = _severity_lines(runs)
    if per_severity:
        out += ["", "## Corruption accuracy per severity (%)", ""] + per_severity
    out += ["", "## Plots", ""]
    if images:
        out += [f"![{alt}]({name})" for alt, name in images]
    else:
        out.append("No plots: the runs have neither training metrics nor perturbation results.")
    return "\n".join(out) + "\n"


def _severity_lines(runs: Sequence[RunRecord]) -> list[str]:
    rows = []
    for run in runs:
        for name, entry in run.result["corruptions"].items():
            levels = {lv.get("severity"): lv.get("top1") for lv in entry.get("severities", [])}
            rows.append((run.name, name, levels))
    if not rows:
        return []
    severities = sorted({s for _, _, levels in rows for s in levels if isinstance(s, int)})
    lines = ["| Run | Corruption | " + " | ".join(f"s{s}" for s in severities) + " |",
             "|---|---|" + "---:|" * len(severities)]
    for run_name, name, levels in rows:
        values = [_pct(levels[s]) if levels.get(s) is not None else "–" for s in severities]
        lines.append(f"| {run_name} | {name} | " + " | ".join(values) + " |")
    return lines


def render_csv(runs: Sequence[RunRecord], columns: Sequence[Column]) -> str:
    """One row per run: identity, clean top-1, and top-1 plus R of every other column."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    rest = [c for c in columns if c.group != "clean"]
    writer.writerow(["run", "folder", "model", "method", "epoch", "checkpoint_sha256", "data_fingerprint",
                     "clean_top1", *(f"{c.label} {m}" for c in rest for m in ("top1", "R"))])
    for run in runs:
        ck = run.result.get("checkpoint", {})
        values = [cell(run, c, m) for c in rest for m in ("top1", "robustness")]
        writer.writerow([run.name, str(run.folder), run.model, run.method, ck.get("epoch"), ck.get("sha256"),
                         run.result["data"].get("fingerprint"), cell(run, columns[0], "top1"),
                         *("" if v is None else f"{v:.6f}" for v in values)])
    return buf.getvalue()


# --------------------------------------------------------------------------- the report


def _write_aggregates(rows: Sequence[seed_report.Row], base: seed_report.Row | None, out_dir: Path) -> list[Path]:
    """aggregates.json, aggregates.csv and the bar chart with 95% intervals."""
    atomic_write_text(out_dir / AGGREGATE_JSON, json.dumps(seed_report.to_json(rows, base), indent=2) + "\n")
    atomic_write_text(out_dir / AGGREGATE_CSV, seed_report.to_csv(rows))
    metrics = seed_report.metric_names(rows)
    values = [[100 * r.summaries[m].mean if m in r.summaries else None for m in metrics] for r in rows]
    spans = [[(100 * r.summaries[m].ci_low, 100 * r.summaries[m].ci_high)
              if m in r.summaries and r.summaries[m].ci_low is not None else None for m in metrics] for r in rows]
    png = plot_robustness_bars([r.label for r in rows], metrics, values, out_dir / AGGREGATE_PNG, ylabel="top-1 (%)",
                               title="Mean over seeds, 95% interval", intervals=spans, reference=None)
    return [out_dir / AGGREGATE_JSON, out_dir / AGGREGATE_CSV, png]


def build_report(cfg: ReportConfig) -> ReportResult:
    """Load the runs, check they are comparable, and write report.md, the PNG plots and optionally CSV."""
    if not cfg.runs:
        raise AdvpipeError("give at least one run folder")
    paths = [Path(p) for p in cfg.runs]
    # A run is named after its folder; an evaluation JSON given directly after its file stem.
    names = unique_names([(p.parent if p.name == EVAL_FILENAME else p.with_suffix("")) if p.is_file() else p
                          for p in paths])
    runs = [load_run(p, n) for p, n in zip(paths, names)]
    warnings = check_fingerprints(runs, force=cfg.force)
    rows, base_row = seed_report.group_rows(runs, cfg.baseline)
    # every comparison of configured runs gets the seed table (one-seed rows say n=1, no interval)
    aggregated = len(runs) > 1 and all(r.config for r in runs)
    baseline = None
    if cfg.baseline is not None:
        matches = [r for r in runs if cfg.baseline in (r.name, str(r.folder))] or \
            [r for r in runs if r.config.get("aug") == cfg.baseline]
        if not matches and base_row is None:
            raise AdvpipeError(f"baseline {cfg.baseline!r} is none of the runs ({', '.join(r.name for r in runs)})"
                               f" nor of the rows ({', '.join(r.label for r in rows)})", fields=("baseline",))
        baseline = matches[0] if matches else None
    out_dir = check_writable_dir(cfg.out, "--out folder")
    columns = report_columns(runs)
    files: list[Path] = []
    images: list[tuple[str, str]] = []
    curves = {r.name: r.metrics for r in runs if r.metrics}
    if curves:
        files.append(plot_training_curves(curves, out_dir / CURVES_FILENAME))
        images.append(("Training curves", CURVES_FILENAME))
    perturbations = [c for c in columns if c.group != "clean"]
    if perturbations:
        values = [[cell(r, c, "robustness") for c in perturbations] for r in runs]
        files.append(plot_robustness_bars([r.name for r in runs], [c.label for c in perturbations], values,
                                          out_dir / BARS_FILENAME, title="Robustness score R = A_perturbed / A_clean"))
        images.append(("Robustness scores", BARS_FILENAME))
    if cfg.cam:
        from advpipe.eval.cam import CAM_FILENAME, save_run_cams

        files.append(save_run_cams([(r.name, r.folder, r.result) for r in runs], cfg.cam, out_dir / CAM_FILENAME))
        images.append((f"Grad-CAM of the first {cfg.cam} test images per run", CAM_FILENAME))
    section: list[str] = []
    if aggregated:
        section = seed_report.render_markdown(rows, base_row)
        files += _write_aggregates(rows, base_row, out_dir)
        images.insert(0, ("Across seeds: mean with 95% interval", AGGREGATE_PNG))
    markdown = render_markdown(runs, columns, baseline=baseline, warnings=warnings, images=images, aggregate=section)
    atomic_write_text(out_dir / REPORT_FILENAME, markdown)
    files.insert(0, out_dir / REPORT_FILENAME)
    if cfg.csv:
        atomic_write_text(out_dir / CSV_FILENAME, render_csv(runs, columns))
        files.append(out_dir / CSV_FILENAME)
    return ReportResult(out_dir, files, markdown, warnings)
