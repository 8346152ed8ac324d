"""PNG charts for ``advpipe report``: training curves of several runs and a robustness bar chart.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot), so no global backend
is switched and nothing needs a display. Files are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from advpipe.files import atomic_write_bytes


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _save(fig: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Draw test accuracy and training loss per epoch of every run on shared axes; return ``path``.

    ``runs`` maps a run name to its metrics.jsonl records (``epoch``, ``test_acc``, ``train_loss``).
    """
    fig, (acc_ax, loss_ax) = _figure(10, 4, ncols=2)
    for name, records in runs.items():
        rows = [r for r in records if isinstance(r.get("epoch"), (int, float))]
        acc = [(r["epoch"], 100 * r["test_acc"]) for r in rows if isinstance(r.get("test_acc"), (int, float))]
        loss = [(r["epoch"], r["train_loss"]) for r in rows if isinstance(r.get("train_loss"), (int, float))]
        if acc:
            acc_ax.plot(*zip(*acc), marker="o", markersize=3, label=name)
        if loss:
            loss_ax.plot(*zip(*loss), marker="o", markersize=3, label=name)
    acc_ax.set(title="test accuracy", xlabel="epoch", ylabel="top-1 (%)")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")
    from matplotlib.ticker import MaxNLocator

    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_robustness_bars(run_names: Sequence[str], labels: Sequence[str], values: Sequence[Sequence[float | None]],
                         path: str | Path, *, ylabel: str = "robustness score R", title: str = "",
                         intervals: Sequence[Sequence[tuple[float, float] | None]] | None = None,
                         reference: float | None = 1.0) -> Path:
    """Grouped bar chart: one group per perturbation (``labels``), one bar per run; return ``path``.

    ``values[i][j]`` is run (or row) ``i``'s value for column ``j`` (None draws no bar);
    ``intervals[i][j]`` an optional (low, high) error bar; ``reference`` a dashed horizontal line.
    """
    n_runs = max(len(run_names), 1)
    fig, (ax,) = _figure(max(6.0, 0.55 * len(labels) * n_runs + 2), 4.5)
    width = 0.8 / n_runs
    for i, name in enumerate(run_names):
        cols = [j for j, v in enumerate(values[i]) if v is not None]
        xs = [j + (i - (n_runs - 1) / 2) * width for j in cols]
        ys = [values[i][j] for j in cols]
        ax.bar(xs, ys, width=width, label=name)
        if intervals is not None:
            spans = [intervals[i][j] for j in cols]
            err = [[y - s[0] if s else 0 for y, s in zip(ys, spans)], [s[1] - y if s else 0 for y, s in zip(ys, spans)]]
            ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="black", elinewidth=1, capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    if reference is not None:
        ax.axhline(reference, color="grey", linewidth=0.8, linestyle="--")
    ax.grid(axis="y", alpha=0.3)
    if run_names:
        ax.legend(fontsize=8)
    return _save(fig, path)
