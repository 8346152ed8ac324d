"""Tests of `advpipe report`: loading evaluated runs, the comparison tables, plots, CSV and fingerprint checks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from advpipe.errors import AdvpipeError
from advpipe.eval.report import (
    Column,
    ReportConfig,
    RunRecord,
    _markdown_table,
    build_report,
    check_fingerprints,
    load_run,
    unique_names,
)
from advpipe.eval.run import EVAL_FILENAME

TINY = "test-tiny-cnn"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




# one intra-op thread: several times faster on a shared 2-core machine (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args: str):
    from advpipe.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two small trained runs (1 and 2 epochs), each evaluated by the CLI into RUN_DIR/eval.json."""
    from advpipe.train.config import TrainConfig
    from advpipe.train.loop import train

    root = tmp_path_factory.mktemp("report")
    dirs = []
    for name, epochs in (("short", 1), ("longer", 2)):
        out = root / name
        train(TrainConfig(data="synthetic", model=TINY, epochs=epochs, batch_size=64, lr=0.1, schedule="constant",
                          out=str(out), device="cpu", seed=epochs, limit=512))
        res = _invoke("evaluate", "--checkpoint", str(out / "last.pt"), "--limit", "128", "--device", "cpu",
                      "--attack", "fgsm:eps=8/255", "--corruptions", "gaussian-noise,rotation", "--severities", "1,5")
        assert res.exit_code == 0, res.output
        assert (out / EVAL_FILENAME).is_file()
        dirs.append(out)
    return SimpleNamespace(root=root, short=dirs[0], longer=dirs[1])


def test_report_writes_table_plots_and_csv(runs: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = _invoke("report", str(runs.short), str(runs.longer), "--out", str(out), "--csv")
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    for name in ("short", "longer", "Clean", "FGSM 8/255", "gaussian-noise", "rotation", "Mean corruption",
                 "Robustness score", "](curves.png)", "](robustness.png)"):
        assert name in md, name
    table = [ln for ln in md.splitlines() if ln.startswith("| short |") or ln.startswith("| longer |")]
    assert len(table) >= 4  # runs table, accuracy table, robustness table (+ per-severity rows)
    assert "**" in md  # best entries marked
    for png in ("curves.png", "robustness.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["run"] for r in rows] == ["short", "longer"]
    for row, run_dir in zip(rows, (runs.short, runs.longer)):
        result = json.loads((run_dir / EVAL_FILENAME).read_text())
        assert float(row["clean_top1"]) == pytest.approx(result["clean"]["top1"])
        assert float(row["FGSM 8/255 R"]) == pytest.approx(result["attacks"]["fgsm:eps=8/255"]["robustness"], abs=1e-6)


def test_best_clean_accuracy_is_bold_in_the_right_row(runs: SimpleNamespace, tmp_path: Path) -> None:
    result = build_report(ReportConfig(runs=(str(runs.short), str(runs.longer)), out=str(tmp_path)))
    accuracy = result.markdown.split("## Accuracy (%)")[1].split("##")[0]
    clean = {n: json.loads((d / EVAL_FILENAME).read_text())["clean"]["top1"]
             for n, d in (("short", runs.short), ("longer", runs.longer))}
    assert clean["short"] != clean["longer"], "the two runs should differ for this test to mean anything"
    best = max(clean, key=clean.get)
    row = next(ln for ln in accuracy.splitlines() if ln.startswith(f"| {best} |"))
    assert row.split("|")[4].strip() == f"**{100 * clean[best]:.2f}**"


def test_report_refuses_mismatched_fingerprints_unless_forced(runs: SimpleNamespace, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(runs.longer, other)
    data = json.loads((other / EVAL_FILENAME).read_text())
    data["data"]["fingerprint"] = "sha256:" + "0" * 64
    (other / EVAL_FILENAME).write_text(json.dumps(data))
    res = _invoke("report", str(runs.short), str(other), "--out", str(tmp_path / "r1"))
    assert res.exit_code == 2
    assert "different test data" in res.stderr and "--force" in res.stderr
    assert not (tmp_path / "r1" / "report.md").exists()
    res = _invoke("report", str(runs.short), str(other), "--out", str(tmp_path / "r2"), "--force")
    assert res.exit_code == 0, res.output
    assert "Warning:" in (tmp_path / "r2" / "report.md").read_text()


def test_report_errors_are_one_line(runs: SimpleNamespace, tmp_path: Path) -> None:
    empty = tmp_path / "empty-run"
    empty.mkdir()
    for args, needle in (([str(empty)], "no eval.json"), ([str(tmp_path / "missing")], "does not exist"),
                         ([str(runs.short), "--baseline", "nope"], "--baseline 'nope'")):
        res = _invoke("report", *args, "--out", str(tmp_path / "r"))
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], res.stderr


def test_report_accepts_an_eval_json_file_and_runs_without_metrics(runs: SimpleNamespace, tmp_path: Path) -> None:
    lone = tmp_path / "lone.json"
    shutil.copy(runs.short / EVAL_FILENAME, lone)
    result = build_report(ReportConfig(runs=(str(lone),), out=str(tmp_path / "r")))
    assert not (tmp_path / "r" / "curves.png").exists()  # no metrics.jsonl beside it
    assert (tmp_path / "r" / "robustness.png").is_file()
    assert "| lone | test-tiny-cnn |" in result.markdown


def _record(name: str, clean: float, fgsm: float, fingerprint: str = "fp") -> RunRecord:
    result = {"clean": {"top1": clean}, "data": {"fingerprint": fingerprint, "name": "d", "split": "test", "n": 10},
              "checkpoint": {"arch": "m"}, "corruptions": {},
              "attacks": {"fgsm": {"label": "FGSM", "top1": fgsm, "robustness": fgsm / clean}}}
    return RunRecord(name, Path(name), Path(name) / EVAL_FILENAME, result)


def test_table_marks_best_and_baseline_deltas() -> None:
    runs = [_record("base", 0.90, 0.30), _record("ours", 0.92, 0.25), _record("tie", 0.90, 0.30)]
    cols = [Column("clean", "Clean", "clean"), Column("attack:fgsm", "FGSM", "attack")]
    from advpipe.eval.report import cell

    lines = _markdown_table(runs, cols, lambda r, c: cell(r, c, "top1"), lambda c, v: f"{100 * v:.2f}", runs[0])
    rows = {ln.split("|")[1].strip(): [x.strip() for x in ln.split("|")[4:6]] for ln in lines[2:]}
    assert rows["base"] == ["90.00", "**30.00**"]
    assert rows["ours"] == ["**92.00**⁺", "25.00⁻"]
    assert rows["tie"] == ["90.00", "**30.00**"]  # equal to the baseline: no mark, tied best: bold
    # a column where every run ties has nothing to mark
    lines = _markdown_table(runs[:1] + runs[2:], cols, lambda r, c: cell(r, c, "top1"), lambda c, v: f"{v:.2f}", None)
    assert "**" not in "\n".join(lines)


def test_fingerprint_check_and_names() -> None:
    same = [_record("a", 0.9, 0.1), _record("b", 0.8, 0.1)]
    assert check_fingerprints(same, force=False) == []
    mixed = [_record("a", 0.9, 0.1), _record("b", 0.8, 0.1, fingerprint="other")]
    with pytest.raises(AdvpipeError, match="different test data"):
        check_fingerprints(mixed, force=False)
    assert len(check_fingerprints(mixed, force=True)) == 1
    assert unique_names([Path("/r/cifar10/resnet20/none"), Path("/r/cifar10/wrn/none")]) == \
        ["resnet20/none", "wrn/none"]
    assert unique_names([Path("/r/a"), Path("/r/b")]) == ["a", "b"]


def test_load_run_rejects_foreign_json(tmp_path: Path) -> None:
    (tmp_path / EVAL_FILENAME).write_text(json.dumps({"hello": 1}))
    with pytest.raises(AdvpipeError, match="not an advpipe evaluation result"):
        load_run(tmp_path)
    (tmp_path / EVAL_FILENAME).write_text("{not json")
    with pytest.raises(AdvpipeError, match="cannot read evaluation JSON"):
        load_run(tmp_path)
