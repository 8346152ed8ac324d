"""Summarise the regime sweep: for each point, does `none` over-fit, does Cutout beat it, does a run fit 10 minutes?

    python tools/regime_sweep.py docs/results/regime-sweep [--idle-images-per-s R]

Reads every published sweep point (``DIR/<point>/runs/<run>/{config.yaml,metrics.jsonl,eval.json}``,
as ``tools/publish_study.py`` writes them) and writes ``DIR/sweep.json``, ``DIR/sweep.csv`` and
``DIR/sweep.png``. The three conditions of issue 22, each checked on the last epoch:

1. `none` over-fits: mean last-epoch train accuracy >= 97% and >= 20 points above its test accuracy;
2. `cutout` beats `none` outside the seed noise: the paired 95% interval of cutout - none lies above 0
   (clean top-1 of ``eval.json``, the full test set, last-epoch checkpoint);
3. one run takes at most 10 minutes on the idle 2-core machine: training images of a run divided by
   the idle loop's images/s (``--idle-images-per-s``, from ``benchmarks/bench_train_speed.py``), plus
   the per-epoch evaluation at the same rate's forward share. The wall time measured under the
   sweep's own load is reported beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from advpipe.eval.aggregate import POWER, _t_quantile, compare, summarize

#: an evaluation image costs about a third of a training image (forward only)
EVAL_COST = 1 / 3


def read_run(run: Path) -> dict[str, Any] | None:
    """A finished run's config, last-epoch metrics, wall seconds and clean test accuracy."""
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        ev = json.loads((run / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    if not rows or rows[-1]["epoch"] != cfg["epochs"]:
        return None
    return {"aug": cfg["aug"], "seed": cfg["seed"], "limit": cfg["limit"], "epochs": cfg["epochs"],
            "precision": cfg.get("precision", "auto"),
            "train_acc": rows[-1]["train_acc"], "test_acc": ev["clean"]["top1"],
            "test_images_per_epoch": rows[0].get("test_images"), "test_images_final": ev["clean"]["n"],
            "wall_train_s": sum(r["epoch_time_s"] for r in rows)}


#: the AdvMask paper's full-scale effects (Table I, ResNet-18): Cutout over Basic, AdvMask over Cutout
PAPER_EFFECTS = (0.73, 0.43)


def seeds_to_detect(effect: float, paired_std: float, most: int = 1000) -> int | None:
    """The fewest seed pairs whose minimal detectable difference (80% power, 5% two-sided) is at most ``effect``."""
    for n in range(2, most + 1):
        if (_t_quantile(n - 1) + _t_quantile(n - 1, POWER)) * paired_std / n ** 0.5 <= effect:
            return n
    return None


def summarise_point(runs: list[dict[str, Any]], idle_rate: float | None) -> dict[str, Any]:
    """The three conditions for one sweep point."""
    by = {aug: {r["seed"]: r for r in runs if r["aug"] == aug} for aug in ("none", "cutout")}
    none, cutout = by["none"], by["cutout"]
    out: dict[str, Any] = {"limit": runs[0]["limit"], "epochs": runs[0]["epochs"],
                           "precision": sorted({r.get("precision", "auto") for r in runs}),
                           "seeds": {aug: sorted(v) for aug, v in by.items()}}
    if none:
        train = summarize([100 * r["train_acc"] for r in none.values()])
        test = summarize([100 * r["test_acc"] for r in none.values()])
        gap = summarize([100 * (r["train_acc"] - r["test_acc"]) for r in none.values()])
        out["none"] = {"train_acc": train.to_dict(), "test_acc": test.to_dict(), "gap": gap.to_dict()}
        out["overfits"] = train.mean >= 97 and gap.mean >= 20
    if cutout:
        out["cutout"] = {"train_acc": summarize([100 * r["train_acc"] for r in cutout.values()]).to_dict(),
                         "test_acc": summarize([100 * r["test_acc"] for r in cutout.values()]).to_dict()}
    if none and cutout:
        c = compare({s: 100 * r["test_acc"] for s, r in cutout.items()}, {s: 100 * r["test_acc"] for s, r in none.items()})
        out["cutout_minus_none"] = c.to_dict()
        if c.n_pairs >= 2:  # the paired std, and the seeds that would detect the paper's Cutout effect at it
            std = summarize([100 * (cutout[s]["test_acc"] - none[s]["test_acc"]) for s in cutout if s in none]).std
            out["paired_std"] = std
            out["seeds_to_detect"] = {str(e): seeds_to_detect(e, std) for e in PAPER_EFFECTS}
        out["cutout_beats_none"] = None if c.ci_low is None else c.ci_low > 0  # None: one seed, no interval
    samples = runs[0]["limit"] * runs[0]["epochs"]
    evals = (runs[0]["epochs"] - 1) * (runs[0]["test_images_per_epoch"] or 0) + runs[0]["test_images_final"]
    out["train_samples_per_run"] = samples
    out["wall_train_s_under_load"] = summarize([r["wall_train_s"] for r in runs]).to_dict()
    if idle_rate:
        out["idle_run_s_estimate"] = (samples + EVAL_COST * evals) / idle_rate
        out["fits_10_minutes"] = out["idle_run_s_estimate"] <= 600
    out["meets_all"] = all(out.get(k) is True for k in ("overfits", "cutout_beats_none", "fits_10_minutes"))
    return out


def pool(points: dict[str, list[dict[str, Any]]], idle_rate: float | None) -> dict[str, dict[str, Any]]:
    """Points that share (limit, epochs) but differ in another setting (e.g. precision), summarised together.

    Seeds are paired within their own point only: seed 0 of one point and seed 0 of another are two pairs.
    """
    groups: dict[tuple[int, int], list[str]] = {}
    for name, runs in points.items():
        groups.setdefault((runs[0]["limit"], runs[0]["epochs"]), []).append(name)
    pooled = {}
    for (limit, epochs), names in groups.items():
        if len(names) > 1:
            runs = [{**r, "seed": f"{name}:{r['seed']}"} for name in names for r in points[name]]
            pooled[f"n{limit}-e{epochs}-pooled"] = {**summarise_point(runs, idle_rate), "points": names}
    return pooled


def plot(points: dict[str, dict[str, Any]], path: Path) -> None:
    """Cutout - none (95% interval) and none's train-test gap for each sweep point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(points)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, name in enumerate(names):
        c = points[name].get("cutout_minus_none")
        if c and c["ci_low"] is not None:
            ax1.errorbar(i, c["diff"], yerr=[[c["diff"] - c["ci_low"]], [c["ci_high"] - c["diff"]]], fmt="o", capsize=4)
        elif c:
            ax1.plot(i, c["diff"], "o")
        n = points[name].get("none")
        if n:
            ax2.bar(i, n["train_acc"]["mean"], color="tab:blue", alpha=0.4, label="train" if i == 0 else None)
            ax2.bar(i, n["test_acc"]["mean"], color="tab:blue", label="test" if i == 0 else None)
    ax1.axhline(0, color="gray", lw=0.8)
    ax1.set(xticks=range(len(names)), xticklabels=names, ylabel="cutout - none, clean top-1 (pp)",
            title="Cutout against none (95% paired interval)")
    ax2.axhline(97, color="gray", ls="--", lw=0.8)
    ax2.set(xticks=range(len(names)), xticklabels=names, ylabel="none, last epoch (%)", ylim=(0, 100),
            title="Does none over-fit?")
    ax2.legend(loc="lower right")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8, labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    """Summarise every sweep point under the folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--idle-images-per-s", type=float, default=None)
    args = ap.parse_args()
    point_runs = {}
    for point in sorted(p for p in args.folder.iterdir() if (p / "runs").is_dir()):
        runs = [r for r in (read_run(run) for run in sorted((point / "runs").iterdir())) if r is not None]
        if runs:
            point_runs[point.name] = runs
    points = {name: summarise_point(runs, args.idle_images_per_s) for name, runs in point_runs.items()}
    pooled = pool(point_runs, args.idle_images_per_s)
    if not points:
        print(f"no finished sweep runs under {args.folder}", file=sys.stderr)
        return 2
    (args.folder / "sweep.json").write_text(json.dumps({"idle_images_per_s": args.idle_images_per_s,
                                                        "points": points, "pooled": pooled}, indent=2) + "\n")
    with open(args.folder / "sweep.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["point", "limit", "epochs", "seeds", "none_train", "none_test", "none_gap", "cutout_test",
                    "cutout_minus_none", "ci_low", "ci_high", "mdd", "idle_run_s", "overfits", "cutout_beats_none",
                    "fits_10_minutes"])
        for name, p in {**points, **pooled}.items():
            n, c, d = p.get("none", {}), p.get("cutout", {}), p.get("cutout_minus_none", {})
            w.writerow([name, p["limit"], p["epochs"], len(p["seeds"]["none"]),
                        n.get("train_acc", {}).get("mean"), n.get("test_acc", {}).get("mean"),
                        n.get("gap", {}).get("mean"), c.get("test_acc", {}).get("mean"), d.get("diff"),
                        d.get("ci_low"), d.get("ci_high"), d.get("mdd"), p.get("idle_run_s_estimate"),
                        p.get("overfits"), p.get("cutout_beats_none"), p.get("fits_10_minutes")])
    plot({**points, **pooled}, args.folder / "sweep.png")
    for name, p in {**points, **pooled}.items():
        print(f"{name}: overfits={p.get('overfits')} cutout_beats_none={p.get('cutout_beats_none')} "
              f"fits_10_minutes={p.get('fits_10_minutes')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
