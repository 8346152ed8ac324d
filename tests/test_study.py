"""advpipe study: config validation, seed aggregation against hand-computed numbers, resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from advpipe.cli import app
from advpipe.errors import AdvpipeError
from advpipe.eval.aggregate import compare, summarize, within_noise
from advpipe.study.config import parse_study, run_name
from conftest import TINY_CNN

runner = CliRunner()

TINY = {"name": "tiny", "train": {"data": "embedded", "model": "resnet20", "limit": 256, "epochs": 4,
                                  "batch_size": 64, "val_size": 64, "precision": "fp32"},
        "grid": {"aug": ["none", "cutout"], "seed": [0]},
        "evaluate": {"attacks": ["fgsm:eps=2/255"], "limit": 100}}


def _write(tmp_path: Path, study: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


# --------------------------------------------------------------------------- aggregation


def test_summary_matches_hand_computed_t_interval():
    s = summarize([0.70, 0.72, 0.74])
    # mean 0.72, sample std 0.02; t(0.975, df=2) = 4.302653 -> half width 4.302653 * 0.02 / sqrt(3)
    assert s.n == 3 and s.mean == pytest.approx(0.72) and s.std == pytest.approx(0.02)
    assert s.ci_low == pytest.approx(0.72 - 0.0496828, abs=1e-6) and s.ci_high == pytest.approx(0.72 + 0.0496828, abs=1e-6)
    one = summarize([0.5])
    assert one.n == 1 and one.std is None and one.ci_low is None


def test_paired_comparison_matches_hand_computed_t_test():
    row, base = {0: 0.75, 1: 0.74, 2: 0.78}, {0: 0.70, 1: 0.72, 2: 0.74}
    c = compare(row, base)
    # differences 0.05, 0.02, 0.04: mean 0.0366667, sd 0.0152753, se 0.0088192, t = 4.1576 on 2 df.
    # For 2 df the t tail is closed-form: P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2.
    t = 0.0366667 / 0.0088192
    p = 1 - t / math.sqrt(t * t + 2)
    assert c.test == "paired" and c.n_pairs == 3
    assert c.diff == pytest.approx(0.0366667, abs=1e-6)
    assert c.p_value == pytest.approx(p, abs=1e-4) and c.p_value == pytest.approx(0.05328, abs=1e-4)
    assert c.ci_low == pytest.approx(0.0366667 - 4.302653 * 0.0088192, abs=1e-5)
    assert within_noise(c) is True  # the interval [-0.0013, 0.0746] contains 0
    # minimal detectable difference: (t(0.975, 2) + t(0.80, 2)) * se = (4.302653 + 1.060660) * 0.0088192
    assert c.mdd == pytest.approx((4.302653 + 1.060660) * 0.0088192, abs=1e-5)


def test_mdd_shrinks_with_more_seeds_and_is_absent_without_an_interval():
    # the same per-seed differences (sd 0.01) over 3 and over 5 seeds: se and both t quantiles fall
    three = compare({0: 0.51, 1: 0.50, 2: 0.52}, {0: 0.5, 1: 0.5, 2: 0.5})
    five = compare({0: 0.51, 1: 0.50, 2: 0.52, 3: 0.51, 4: 0.51}, {s: 0.5 for s in range(5)})
    # 5 seeds: sd 0.0070711, se 0.0031623, t(0.975, 4) = 2.776445, t(0.80, 4) = 0.940965
    assert five.mdd == pytest.approx((2.776445 + 0.940965) * 0.0031623, abs=1e-6)
    assert five.mdd < three.mdd
    assert compare({0: 0.7}, {1: 0.6}).mdd is None


def test_welch_comparison_when_seeds_differ():
    c = compare({0: 0.70, 1: 0.72, 2: 0.74}, {5: 0.60, 6: 0.64})
    # se^2 = 0.02^2/3 + 0.0282843^2/2; Welch-Satterthwaite df = 1.68421; t = 0.10 / 0.0230940 = 4.33013
    from scipy.special import betainc

    df, t = 1.684211, 0.10 / 0.0230940
    p = betainc(df / 2, 0.5, df / (df + t * t))  # two-sided p = I_{df/(df+t^2)}(df/2, 1/2)
    assert c.test == "welch" and c.diff == pytest.approx(0.10)
    assert c.p_value == pytest.approx(p, rel=1e-4)
    assert c.ci_low < 0.10 < c.ci_high


def test_one_seed_rows_have_no_interval():
    c = compare({0: 0.7}, {1: 0.6})
    assert c.test == "none" and c.p_value is None and within_noise(c) is None


# --------------------------------------------------------------------------- config validation


def test_grid_expands_to_named_runs(tmp_path):
    cfg = parse_study({**TINY, "grid": {"aug": ["none", "advmask-rp"], "seed": [0, 1]}}, out=str(tmp_path))
    assert [r.name for r in cfg.runs] == ["aug-none_seed-0", "aug-none_seed-1", "aug-advmask-rp_seed-0",
                                          "aug-advmask-rp_seed-1"]
    assert all(Path(r.train.out).parent == tmp_path / "runs" for r in cfg.runs)
    assert run_name({"aug": "advmask+mtlat", "lr": 0.05}) == "aug-advmask_mtlat_lr-0.05"


@pytest.mark.parametrize("change, needle", [
    ({"grid": {"colour": ["red"]}}, "unknown training option 'colour'"),
    ({"grid": {"aug": ["sparkles"]}}, "unknown --aug"),
    ({"grid": {}}, "the grid is empty"),
    ({"grid": {"aug": []}}, "has no values"),
    ({"grid": {"seed": [0], "lr": [-1.0]}}, "lr must be positive"),
    ({"grid": {"weight_decay": [float("nan")]}}, "finite"),
    ({"grid": {"aug": ["advmask"]}}, "needs attack masks"),
    ({"train": {**TINY["train"], "model": "resnet9000"}}, "unknown model"),
    ({"evaluate": {"attacks": ["pgd:eps=banana"]}}, "pgd"),
    ({"flavour": 1}, "unknown sections"),
    ({"grid": {"aug": ["advmask"]}, "masks": {"checkpoint": "builtin:resnet20-cifar10",
                                               "attack_options": {"lambda_rule": "sideways"}}}, "sideways"),
    ({"grid": {"aug": ["advmask"]}, "masks": {"checkpoint": "builtin:resnet20-cifar10",
                                               "attack_options": {"colour": 1}}}, "colour"),
])
def test_bad_study_is_refused_before_any_run(tmp_path, change, needle):
    path = _write(tmp_path, {**TINY, **change})
    result = runner.invoke(app, ["study", str(path), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert not (tmp_path / "s" / "runs").exists()


def test_mask_attack_options_reach_the_precompute_config(tmp_path):
    study = {**TINY, "grid": {"aug": ["advmask"], "seed": [0]},
             "masks": {"checkpoint": "builtin:resnet20-cifar10", "steps": 5,
                       "attack_options": {"lambda_rule": "adaptive", "alpha_schedule": "linear"}}}
    cfg = parse_study(study, out=str(tmp_path))
    assert cfg.masks.attack_options == {"lambda_rule": "adaptive", "alpha_schedule": "linear"}
    from advpipe.pipeline.precompute_config import PrecomputeConfig, attack_config

    attack = attack_config(PrecomputeConfig(checkpoint="x", steps=5, attack_options=cfg.masks.attack_options))
    assert (attack.lambda_rule, attack.alpha_schedule, attack.steps) == ("adaptive", "linear", 5)


def test_rows_that_differ_only_in_their_mask_store_keep_apart():
    from types import SimpleNamespace

    from advpipe.eval.seed_report import group_rows

    def run(aug, masks, seed, acc):
        config = {"aug": aug, "masks": masks, "seed": seed, "epochs": 3}
        return SimpleNamespace(name=f"{aug}-{seed}", config=config, metrics=[], method=aug,
                               result={"clean": {"top1": acc}, "attacks": {}, "checkpoint": {"path": "last.pt"}})

    runs = [run("none", None, s, 50 + s) for s in (0, 1)] + [run("advmask", "a/masks.zarr", s, 40 + s) for s in (0, 1)]
    runs += [run("advmask", "b/masks.zarr", s, 45 + s) for s in (0, 1)]
    rows, base = group_rows(runs, "none")
    assert base is not None and base.label.startswith("none")
    labels = [r.label for r in rows]
    assert len(set(labels)) == 3 and sum("a/masks.zarr" in lb for lb in labels) == 1, labels


def test_corruption_r_is_mean_corruption_over_clean_per_seed_and_paired():
    from types import SimpleNamespace

    from advpipe.eval.seed_report import CORRUPTION_R, group_rows, render_markdown

    def run(aug, seed, clean, corr):
        return SimpleNamespace(name=f"{aug}-{seed}", config={"aug": aug, "seed": seed}, metrics=[], method=aug,
                               result={"clean": {"top1": clean}, "attacks": {}, "checkpoint": {"path": "last.pt"},
                                       "summary": {"mean_corruption_top1": corr}})

    runs = [run("none", 0, 0.40, 0.36), run("none", 1, 0.50, 0.40), run("mtlat", 0, 0.30, 0.30), run("mtlat", 1, 0.40, 0.38)]
    rows, base = group_rows(runs, "none")
    mtlat = next(r for r in rows if r is not base)
    assert base.values[CORRUPTION_R] == pytest.approx({0: 0.9, 1: 0.8})
    assert mtlat.values[CORRUPTION_R] == pytest.approx({0: 1.0, 1: 0.95})
    assert mtlat.comparisons[CORRUPTION_R].diff == pytest.approx(0.125) and mtlat.comparisons[CORRUPTION_R].test == "paired"
    assert any("robustness score" in line for line in render_markdown(rows, base))


def test_parse_study_refuses_a_bad_value_in_the_library_too():
    with pytest.raises(AdvpipeError, match="epochs"):
        parse_study({**TINY, "grid": {"epochs": ["many"]}})


# --------------------------------------------------------------------------- running and resuming


def _attempts(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "attempts.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.slow
def test_study_killed_mid_run_resumes_without_training_from_scratch(tmp_path):
    """SIGKILL the whole study (client and dask worker) during run 2; the rerun finishes every run, none from scratch."""
    # half of TINY's images and a 200-image test subset: about half the time, still seconds an epoch to kill in
    study = {**TINY, "train": {**TINY["train"], "epochs": 6, "limit": 128, "test_subset": 200}}
    path = _write(tmp_path, study)
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "advpipe", "study", str(path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    second = out / "runs" / "aug-cutout_seed-0"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            lines = (second / "metrics.jsonl").read_text().splitlines() if (second / "metrics.jsonl").is_file() else []
            if 2 <= len(lines) < 6:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("run 2 never got under way")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = out / "runs" / "aug-none_seed-0"
    assert (first / "study-run.json").is_file() and not (second / "study-run.json").exists()

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "ran 1 run(s), skipped 1" in rerun.stdout
    assert len(_attempts(first)) == 1  # finished: skipped, never started again
    tries = _attempts(second)
    # resumed, not from scratch (metrics.jsonl is written just before last.pt, so the kill may fall between)
    assert len(tries) == 2 and tries[0]["from_epoch"] == 0 and tries[1]["from_epoch"] >= 1
    metrics = [json.loads(ln) for ln in (second / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert (out / "report" / "report.md").is_file() and (out / "report" / "aggregates.json").is_file()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "ran 0 run(s), skipped 2" in again.stdout
    assert len(_attempts(second)) == 2


def test_study_in_process_reports_across_seeds(tmp_path):
    study = {**TINY, "train": {**TINY["train"], "epochs": 1, "model": TINY_CNN},
             "grid": {"aug": ["none", "cutout"], "seed": [0, 1]}}
    path = _write(tmp_path, study)
    result = runner.invoke(app, ["study", str(path), "--out", str(tmp_path / "s"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    agg = json.loads((tmp_path / "s" / "report" / "aggregates.json").read_text())
    rows = {r["label"]: r for r in agg["rows"]}
    assert agg["baseline"] == "none" and set(rows) == {"none", "cutout"}
    assert rows["cutout"]["n"] == 2 and rows["cutout"]["vs_baseline"]["clean"]["test"] == "paired"
    evals = [json.loads((tmp_path / "s" / "runs" / f"aug-cutout_seed-{s}" / "eval.json").read_text()) for s in (0, 1)]
    mean = sum(e["clean"]["top1"] for e in evals) / 2
    assert rows["cutout"]["summary"]["clean"]["mean"] == pytest.approx(mean)
    assert all(e["checkpoint"]["path"].endswith("last.pt") for e in evals)  # last epoch, never best-on-test
    text = (tmp_path / "s" / "report" / "report.md").read_text()
    assert "Across seeds" in text and "paired" in text
    assert (tmp_path / "s" / "report" / "aggregates.png").stat().st_size > 1000


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[1, 2]", b"", b"train: {epochs: abc}\ngrid: {seed: [0]}"])
def test_unreadable_study_files_and_bad_values_are_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    result = runner.invoke(app, ["study", str(path), "--out", str(tmp_path / "s")])
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output


@pytest.mark.parametrize("content", [b"epochs: abc\n", b"lr: '0.1'\n", b"momentum: .nan\n", b"\xff\xfe"])
def test_bad_train_config_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    result = runner.invoke(app, ["train", "--config", str(path), "--out", str(tmp_path / "r")])
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not (tmp_path / "r" / "last.pt").exists()


@pytest.mark.parametrize("preset", sorted((Path(__file__).parents[1] / "configs" / "studies").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_study_preset_validates(preset):
    study = parse_study(yaml.safe_load(preset.read_text()), source=str(preset))
    assert study.name == preset.stem and study.runs
