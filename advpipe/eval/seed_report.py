"""``advpipe report`` across seeds: runs that differ only in ``seed`` form one row.

Each row gives mean ± std, n and a 95% interval of every metric, and its difference to the
baseline row with an interval and a p-value (:mod:`advpipe.eval.aggregate`). The metrics are
what the run folders' ``eval.json`` measured (a study evaluates the last epoch) plus, for runs
with a validation split, the test accuracy at the epoch of best validation accuracy, read from
``metrics.jsonl``. Nothing is ever selected on the test set.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from advpipe.eval.aggregate import Comparison, Summary, compare, summarize, within_noise

#: config keys that never make two runs different experiments
IGNORED_KEYS = {"seed", "out", "resume", "overwrite", "device", "workers", "data_dir", "download"}
BEST_VAL = "test@best-val"
#: M-TLAT's robustness score R (m-tlat.txt Eq. 7) on the corruption suite: mean corruption over clean accuracy
CORRUPTION_R = "corruption R"
#: config keys that differ between rows only because their ``aug`` differs
IMPLIED_BY_AUG = {"masks", "aug_options", "method_options"}


@dataclass
class Row:
    """The runs of one configuration across seeds, with their per-metric values by seed."""

    label: str
    config: dict[str, Any]
    runs: list[Any]  # RunRecord
    values: dict[str, dict[int, float]] = field(default_factory=dict)
    summaries: dict[str, Summary] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _key(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in IGNORED_KEYS}, sort_keys=True, default=str)


def _seed(run: Any, position: int) -> int:
    seed = run.config.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else -1 - position


def run_metrics(run: Any) -> dict[str, float]:
    """The metrics of one run: clean, each attack, mean corruption, its R and test accuracy at best validation."""
    result = run.result
    out: dict[str, float] = {}
    if isinstance(result["clean"].get("top1"), (int, float)):
        out["clean"] = float(result["clean"]["top1"])
    for key, entry in result["attacks"].items():
        if isinstance(entry.get("top1"), (int, float)):
            out[str(entry.get("label") or key)] = float(entry["top1"])
    mean_corr = result.get("summary", {}).get("mean_corruption_top1")
    if isinstance(mean_corr, (int, float)):
        out["mean corruption"] = float(mean_corr)
        if out.get("clean"):
            out[CORRUPTION_R] = float(mean_corr) / out["clean"]
    with_val = [m for m in run.metrics if isinstance(m.get("val_acc"), (int, float)) and "test_acc" in m]
    if with_val:
        best = max(with_val, key=lambda m: (m["val_acc"], -m["epoch"]))  # earliest epoch of the best val
        out[BEST_VAL] = float(best["test_acc"])
    return out


def group_rows(runs: Sequence[Any], baseline: str | None) -> tuple[list[Row], Row | None]:
    """Group runs by configuration (seed aside), label the rows by what differs, compare with the baseline."""
    groups: dict[str, list[tuple[int, Any]]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(_key(run.config), []).append((i, run))
    configs = [{k: v for k, v in members[0][1].config.items() if k not in IGNORED_KEYS} for members in groups.values()]
    differing = sorted({k for c in configs for k in c if any(c.get(k) != o.get(k) for o in configs)})
    if "aug" in differing:  # the mask store follows from the augmentation; naming it adds only a path ...
        implied = [k for k in differing if k in IMPLIED_BY_AUG]
        differing = [k for k in differing if k not in IMPLIED_BY_AUG] or differing
        # ... unless two groups share every other value (e.g. advmask on two mask stores): then it is shown too
        if len({tuple(str(c.get(k)) for k in differing) for c in configs}) == len(configs):
            implied = []
    else:
        implied = []
    rows = []
    for members, config in zip(groups.values(), configs):
        if not config:  # no config.yaml: the run is its own row
            label = members[0][1].name
        elif differing:
            label = ", ".join(str(config.get(k)) if len(differing) == 1 else f"{k}={config.get(k)}" for k in differing)
            extra = ", ".join(f"{k}={config[k]}" for k in implied if config.get(k) not in (None, "", {}))
            label += f" ({extra})" if extra else ""
        else:
            label = str(config.get("aug", members[0][1].method))
        row = Row(label, config, [run for _, run in members])
        for position, run in members:
            for metric, value in run_metrics(run).items():
                row.values.setdefault(metric, {})[_seed(run, position)] = value
            path = str(run.result.get("checkpoint", {}).get("path", ""))
            if path.endswith("best.pt") and not any("val_acc" in m for m in run.metrics):
                row.notes.append(f"{run.name}: evaluated best.pt chosen on test accuracy (optimistic)")
        row.summaries = {m: summarize(list(v.values())) for m, v in row.values.items()}
        rows.append(row)
    base = _pick_baseline(rows, baseline)
    rows.sort(key=lambda r: (r is not base, r.label))  # the baseline first, then by name
    if base is not None:
        for row in rows:
            if row is not base:
                row.comparisons = {m: compare(v, base.values[m]) for m, v in row.values.items() if m in base.values}
    return rows, base


def _pick_baseline(rows: list[Row], name: str | None) -> Row | None:
    wanted = name or "none"
    for row in rows:
        if row.label == wanted or row.config.get("aug") == wanted:
            return row
    return None


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _cell(s: Summary) -> str:
    if s.std is None:
        return f"{_pct(s.mean)} (n=1, no interval)"
    return f"{_pct(s.mean)} ± {_pct(s.std)} [{_pct(s.ci_low)}, {_pct(s.ci_high)}]"


def _diff_cell(c: Comparison) -> str:
    sign = "+" if c.diff >= 0 else ""
    if c.ci_low is None:
        return f"{sign}{_pct(c.diff)} (no interval)"
    noise = " inside noise" if within_noise(c) else ""
    p = "p=n/a (no spread)" if c.p_value is None else f"p={c.p_value:.3f}"
    mdd = "" if c.mdd is None else f" (mdd {_pct(c.mdd)})"
    return f"{sign}{_pct(c.diff)} [{_pct(c.ci_low)}, {_pct(c.ci_high)}] {p} {c.test}{noise}{mdd}"


def metric_names(rows: Sequence[Row]) -> list[str]:
    """Every metric of any row, first-seen order, clean first."""
    names: list[str] = []
    for row in rows:
        for m in row.values:
            if m not in names:
                names.append(m)
    return sorted(names, key=lambda m: (m != "clean", m == BEST_VAL))


def render_markdown(rows: Sequence[Row], base: Row | None) -> list[str]:
    """The report section: one table of mean ± std [95% CI] and one of differences to the baseline."""
    metrics = metric_names(rows)
    out = ["## Across seeds (%)", "",
           "Runs that differ only in `seed` form one row: mean ± sample std [95% t interval of the mean], over "
           "the last-epoch checkpoints that `eval.json` measured"
           + (f"; `{BEST_VAL}` is the test accuracy at the epoch of best validation accuracy" if BEST_VAL in metrics
              else "")
           + (f"; `{CORRUPTION_R}` is M-TLAT's robustness score, mean corruption over clean accuracy, in %"
              if CORRUPTION_R in metrics else "") + ". No figure is selected on the test set.", "",
           "| Row | n | " + " | ".join(metrics) + " |", "|---|---:|" + "---|" * len(metrics)]
    for row in rows:
        cells = [_cell(row.summaries[m]) if m in row.summaries else "–" for m in metrics]
        out.append(f"| {row.label} | {len(row.runs)} | " + " | ".join(cells) + " |")
    if base is not None and len(rows) > 1:
        out += ["", f"### Difference to `{base.label}` (percentage points)", "",
                "Mean difference [95% interval], two-sided p-value and test: *paired* by seed when both rows hold "
                "the same seeds, *Welch* otherwise. *inside noise*: the interval contains 0. *mdd*: the minimal "
                "detectable difference, the true difference this test would find with 80% power at the 5% level.", "",
                "| Row | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for row in rows:
            if row is base:
                continue
            out.append(f"| {row.label} | " + " | ".join(_diff_cell(row.comparisons[m]) if m in row.comparisons
                                                         else "–" for m in metrics) + " |")
    notes = [n for row in rows for n in row.notes]
    if notes:
        out += [""] + [f"> **Note:** {n}" for n in notes]
    return out


def to_json(rows: Sequence[Row], base: Row | None) -> dict[str, Any]:
    """The aggregates as a JSON-able dict."""
    return {"baseline": None if base is None else base.label, "confidence": 0.95, "rows": [
        {"label": r.label, "n": len(r.runs), "runs": [str(run.folder) for run in r.runs], "config": r.config,
         "values": {m: {str(s): v for s, v in vals.items()} for m, vals in r.values.items()},
         "summary": {m: s.to_dict() for m, s in r.summaries.items()},
         "vs_baseline": {m: c.to_dict() for m, c in r.comparisons.items()}} for r in rows]}


def to_csv(rows: Sequence[Row]) -> str:
    """One line per row and metric: mean, std, n, interval, difference to the baseline, p-value, test."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", "metric", "n", "mean", "std", "ci_low", "ci_high", "diff", "diff_ci_low", "diff_ci_high",
                     "p_value", "test", "mdd"])
    fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    for row in rows:
        for metric, s in row.summaries.items():
            c = row.comparisons.get(metric)
            writer.writerow([row.label, metric, s.n, fmt(s.mean), fmt(s.std), fmt(s.ci_low), fmt(s.ci_high),
                             *(("", "", "", "", "", "") if c is None else
                               (fmt(c.diff), fmt(c.ci_low), fmt(c.ci_high), fmt(c.p_value), c.test, fmt(c.mdd)))])
    return buf.getvalue()
