"""Tests of the evaluation suite: attack specs, norms, robustness scores and `advpipe evaluate` (corruption kernels: test_corruptions*.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advpipe import progress
from advpipe.data.datasets import load_dataset
from advpipe.errors import AdvpipeError
from advpipe.eval.robustness import perturbation_norms, robustness_score, summarize_norms
from advpipe.eval.run import EVAL_FILENAME, EvalConfig, evaluate
from advpipe.eval.specs import DEFAULT_SUITE, parse_attack_spec, parse_attack_specs
from advpipe.files import sha256_file

TINY = "test-tiny-cnn"
LIMIT = 256




# one intra-op thread: several times faster on a shared 2-core machine (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


class _Recorder:
    """A progress reporter that records the task descriptions it was asked to open."""

    def __init__(self) -> None:
        self.descriptions: list[str] = []

    def open(self, description: str, total: float | None, unit: str) -> progress.Task:
        self.descriptions.append(description)
        return progress.NullReporter().open(description, total, unit)

    def close(self, task: progress.Task) -> None:
        pass


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny CNN trained for 3 epochs on the synthetic task, and one evaluation of it."""
    from advpipe.train.config import TrainConfig
    from advpipe.train.loop import train

    out = tmp_path_factory.mktemp("eval") / "run"
    train(TrainConfig(data="synthetic", model=TINY, epochs=3, batch_size=64, lr=0.1, schedule="constant",
                      out=str(out), device="cpu", seed=0))
    ckpt = out / "best.pt"
    recorder = _Recorder()
    previous = progress.use_reporter(recorder)
    try:
        result = evaluate(EvalConfig(
            checkpoint=str(ckpt), limit=LIMIT, device="cpu", batch_size=128, seed=3,
            attacks=("fgsm:eps=8/255", "pgd:eps=8/255,steps=10", "cw:steps=5", "pgd-ll:eps=0.04,steps=5",
                     f"mifgsm-transfer:surrogate={out / 'last.pt'},eps=0.04,steps=5"),
            corruptions=("gaussian-noise", "occlusion"), severities=(1, 5)))
    finally:
        progress.use_reporter(previous)
    assert result["clean"]["top1"] > 0.8, "fixture model failed to train; the other tests would be meaningless"
    return SimpleNamespace(dir=out, ckpt=ckpt, result=result, progress=recorder.descriptions)


# --------------------------------------------------------------------------- attack specs

GOOD_SPECS = {
    "fgsm": ("fgsm", {"eps": "8/255"}),
    "fgsm:eps=8/255": ("fgsm", {"eps": "8/255"}),
    "FGSM:eps=0.03137": ("fgsm", {"eps": "3137/100000"}),
    "pgd:eps=8/255,steps=10": ("pgd", {"eps": "8/255", "steps": 10, "step": "2/255", "start": "random"}),
    "pgd:eps=8/255,steps=20": ("pgd", {"steps": 20, "step": "2/255"}),
    "pgd:eps=8/255,steps=10,step=1/255": ("pgd", {"step": "1/255"}),
    "pgd: eps = 8/255.0 , steps=7, start=clean": ("pgd", {"eps": "8/255", "steps": 7, "start": "clean"}),
    "cw:steps=20": ("cw", {"eps": "8/255", "steps": 20, "step": "2/255"}),
    "pgd-ll:eps=0.04,steps=10": ("pgd-ll", {"eps": "1/25", "steps": 10, "step": "1/100"}),
    "mifgsm-transfer:surrogate=runs/vgg/best.pt,eps=0.04": (
        "mifgsm-transfer",
        {"surrogate": "runs/vgg/best.pt", "eps": "1/25", "steps": 10, "step": "1/250", "decay": 1.0}),
    "mifgsm-transfer:surrogate=a.pt,eps=0.08,decay=0.5": ("mifgsm-transfer", {"eps": "2/25", "decay": 0.5}),
}


@pytest.mark.parametrize("text", sorted(GOOD_SPECS))
def test_spec_parsing_accepts_good_forms(text: str) -> None:
    kind, expected = GOOD_SPECS[text]
    spec = parse_attack_spec(text)
    assert spec.kind == kind
    as_json = spec.to_json()
    for key, value in expected.items():
        assert as_json[key] == value, key
    # The canonical key parses back to the same spec.
    assert parse_attack_spec(spec.key) == spec


BAD_SPECS = [
    ("", "empty attack spec"),
    ("bim:eps=8/255", "unknown attack kind 'bim'"),
    ("pgd:", "no parameters"),
    ("pgd:eps", "expected KEY=VALUE"),
    ("pgd:eps=", "expected KEY=VALUE"),
    ("pgd:=8/255", "expected KEY=VALUE"),
    ("pgd:eps=8/255,,steps=10", "expected KEY=VALUE"),
    ("pgd:eps=abc", "invalid eps"),
    ("pgd:eps=__import__('os').system('true')", "invalid eps"),
    ("pgd:eps=8/0", "invalid eps"),
    ("pgd:eps=2", "outside (0, 1]"),
    ("pgd:eps=-8/255", "outside (0, 1]"),
    ("pgd:steps=0", "invalid steps"),
    ("pgd:steps=2.5", "invalid steps"),
    ("pgd:steps=-3", "invalid steps"),
    ("pgd:epsilon=8/255", "unknown key 'epsilon'"),
    ("fgsm:steps=10", "unknown key 'steps'"),
    ("pgd:eps=8/255,eps=4/255", "gives 'eps' twice"),
    ("pgd:start=zero", "invalid start"),
    ("mifgsm-transfer:eps=0.04", "needs surrogate="),
    ("mifgsm-transfer:surrogate=a.pt,decay=inf", "invalid decay"),
]


@pytest.mark.parametrize("text,message", BAD_SPECS)
def test_spec_parsing_refuses_bad_forms(text: str, message: str) -> None:
    with pytest.raises(AdvpipeError, match="attack|eps|steps") as info:
        parse_attack_spec(text)
    assert message in str(info.value)


def test_unknown_kind_lists_accepted_forms() -> None:
    with pytest.raises(AdvpipeError) as info:
        parse_attack_spec("deepfool")
    text = str(info.value)
    for form in ("fgsm", "pgd", "cw", "pgd-ll", "mifgsm-transfer", "default", "eps=8/255"):
        assert form in text


def test_default_suite_is_m2at() -> None:
    specs = parse_attack_specs(["default", "fgsm:eps=8/255"])  # the duplicate FGSM is dropped
    assert [s.label for s in specs] == ["FGSM 8/255", "PGD-10 8/255", "PGD-20 8/255", "CW-20 8/255"]
    assert [s.key for s in specs] == [parse_attack_spec(t).key for t in DEFAULT_SUITE]
    assert all(s.values["eps"] * 255 == 8 for s in specs)
    assert all(s.values["step"] * 255 == 2 for s in specs if s.kind != "fgsm")


# --------------------------------------------------------------------------- norms and scores


def test_perturbation_norms_and_summary() -> None:
    delta = torch.zeros(3, 3, 4, 4)
    delta[0, 0, 0, 0] = 0.5
    delta[0, 1, 0, 0] = -0.5  # same pixel, second channel
    delta[0, 2, 3, 3] = 0.1
    delta[1] = 0.25
    norms = perturbation_norms(delta)
    assert norms["l0_elements"].tolist() == [3, 48, 0]
    assert norms["l0_pixels"].tolist() == [2, 16, 0]
    assert torch.allclose(norms["l2"], torch.tensor([(0.25 + 0.25 + 0.01) ** 0.5, (48 * 0.0625) ** 0.5, 0.0]))
    assert torch.allclose(norms["linf"], torch.tensor([0.5, 0.25, 0.0]))
    assert perturbation_norms(delta, atol=0.2)["l0_elements"].tolist() == [2, 48, 0]
    summary = summarize_norms(norms, torch.tensor([True, True, False]))
    assert summary["n"] == 3 and summary["successes"] == 2 and summary["asr"] == pytest.approx(2 / 3)
    assert summary["l0_elements"]["mean"] == pytest.approx(25.5)
    assert summary["l0_elements"]["median"] == pytest.approx(25.5)
    assert summary["linf"]["mean"] == pytest.approx(0.375)
    empty = summarize_norms(norms, torch.zeros(3, dtype=torch.bool))
    assert empty["asr"] == 0 and empty["l2"] == {"mean": None, "median": None}
    json.dumps(empty)
    with pytest.raises(ValueError):
        summarize_norms(norms, torch.ones(2, dtype=torch.bool))
    # numpy inputs (the mask-store report keeps numpy arrays) give the same summary
    as_numpy = summarize_norms({k: v.numpy() for k, v in norms.items()}, np.array([True, True, False]))
    assert as_numpy == summary


def test_robustness_score() -> None:
    assert robustness_score(0.45, 0.9) == pytest.approx(0.5)
    assert robustness_score(0.3, 0.0) is None and robustness_score(None, 0.9) is None


# --------------------------------------------------------------------------- evaluation on the trained model


def test_attack_strength_ordering(run: SimpleNamespace) -> None:
    r = run.result
    clean = r["clean"]["top1"]
    fgsm = r["attacks"]["fgsm:eps=8/255"]["top1"]
    pgd = r["attacks"][parse_attack_spec("pgd:eps=8/255,steps=10").key]["top1"]
    assert pgd <= fgsm <= clean
    assert fgsm < clean  # the attack does something
    for entry in r["attacks"].values():
        assert entry["robustness"] == pytest.approx(entry["top1"] / clean)
        assert 0 <= entry["top1"] <= 1 and len(entry["per_class"]) == 10 and entry["n"] == LIMIT


def test_attack_norms_respect_eps(run: SimpleNamespace) -> None:
    for entry in run.result["attacks"].values():
        norms = entry["norms"]
        eps = entry["params"]["eps_float"]
        assert norms["n"] == round(run.result["clean"]["top1"] * LIMIT)  # clean-correct samples
        assert norms["asr"] == pytest.approx(norms["successes"] / norms["n"])
        # every success is a clean-correct sample that became wrong: bounded by the accuracy drop
        assert norms["successes"] >= round((run.result["clean"]["top1"] - entry["top1"]) * LIMIT)
        if norms["successes"]:
            assert 0 < norms["linf"]["mean"] <= eps + 1e-6
            pixels, elements = norms["l0_pixels"]["mean"], norms["l0_elements"]["mean"]
            assert 0 < pixels <= elements <= 3 * pixels and pixels <= 32 * 32


def test_transfer_attack_records_its_surrogate(run: SimpleNamespace) -> None:
    (entry,) = [e for e in run.result["attacks"].values() if e["kind"] == "mifgsm-transfer"]
    assert entry["surrogate"]["sha256"] == sha256_file(run.dir / "last.pt")
    assert entry["top1"] < run.result["clean"]["top1"]


def test_corruption_scores(run: SimpleNamespace) -> None:
    r = run.result
    clean = r["clean"]["top1"]
    for name in ("gaussian-noise", "occlusion"):
        entry = r["corruptions"][name]
        assert [lv["severity"] for lv in entry["severities"]] == [1, 5]
        assert entry["top1"] == pytest.approx(np.mean([lv["top1"] for lv in entry["severities"]]))
        for lv in entry["severities"]:
            assert lv["robustness"] == pytest.approx(lv["top1"] / clean)
        assert entry["robustness"] == pytest.approx(entry["top1"] / clean)
    # the headline averages CIFAR-10-C's 15 standard corruptions only (here gaussian noise); _all every one
    summary = r["summary"]
    assert summary["standard_corruptions"] == 1 and summary["corruptions"] == 2
    assert summary["mean_corruption_robustness"] == pytest.approx(r["corruptions"]["gaussian-noise"]["robustness"])
    assert summary["mean_corruption_top1"] == pytest.approx(r["corruptions"]["gaussian-noise"]["top1"])
    assert summary["mean_corruption_robustness_all"] == pytest.approx(
        np.mean([c["robustness"] for c in r["corruptions"].values()]))
    assert r["corruption_source"] == {"kind": "synthetic", "seed": 3}


def test_result_provenance_and_progress(run: SimpleNamespace) -> None:
    r = run.result
    assert r["checkpoint"]["sha256"] == sha256_file(run.ckpt)
    assert r["data"]["fingerprint"] == load_dataset("synthetic", "test", limit=LIMIT).fingerprint
    assert r["params"]["seed"] == 3 and r["params"]["precision"] == "fp32" and r["params"]["severities"] == [1, 5]
    assert len(r["params"]["attacks"]) == 5
    json.loads(json.dumps(r))  # JSON-able, no NaN
    assert "clean" in run.progress and "attack FGSM 8/255" in run.progress
    assert "gaussian-noise s1" in run.progress and "occlusion s5" in run.progress


def _without_timings(entry: Any) -> Any:
    """``entry`` with every wall-clock field (``seconds``, ``images_per_s``) dropped, at any depth."""
    if isinstance(entry, dict):
        return {k: _without_timings(v) for k, v in entry.items() if k not in ("seconds", "images_per_s")}
    if isinstance(entry, list):
        return [_without_timings(v) for v in entry]
    return entry


def test_evaluation_is_reproducible_per_perturbation(run: SimpleNamespace) -> None:
    # The same seed gives the same numbers (top-1, per class, robustness, perturbation norms), whichever
    # other perturbations run alongside and in whichever order.
    again = evaluate(EvalConfig(checkpoint=str(run.ckpt), limit=LIMIT, device="cpu", batch_size=128, seed=3,
                                attacks=("cw:steps=5", "pgd:eps=8/255,steps=10"),
                                corruptions=("occlusion", "gaussian-noise"), severities=(5,)))
    first = run.result
    assert _without_timings(again["clean"]) == _without_timings(first["clean"])
    assert len(again["attacks"]) == 2 and set(again["attacks"]) <= set(first["attacks"])
    for key, entry in again["attacks"].items():
        assert _without_timings(entry) == _without_timings(first["attacks"][key]), key
        assert len(entry["per_class"]) == 10 and entry["n"] == LIMIT
    for name in ("occlusion", "gaussian-noise"):
        (level,) = again["corruptions"][name]["severities"]
        assert level["severity"] == 5 and len(level["per_class"]) == 10
        assert _without_timings(level) == _without_timings(first["corruptions"][name]["severities"][1]), name


# --------------------------------------------------------------------------- the CLI


def test_cli_evaluate_with_attack_and_json(run: SimpleNamespace, tmp_path: Path) -> None:
    from advpipe.cli import app

    out = tmp_path / "result.json"
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(run.ckpt), "--limit", "64", "--device", "cpu",
                                   "--attack", "fgsm:eps=8/255", "--corruptions", "contrast", "--severities", "5",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "FGSM 8/255" in res.stdout and "contrast" in res.stdout and f"wrote {out}" in res.stdout
    data = json.loads(out.read_text())
    assert list(data["attacks"]) == ["fgsm:eps=8/255"]
    assert data["clean"]["n"] == 64 and data["checkpoint"]["sha256"] == sha256_file(run.ckpt)
    assert data["corruptions"]["contrast"]["severities"][0]["params"] == {"factor": 0.15}


def test_cli_evaluate_writes_eval_json_into_the_run_folder(run: SimpleNamespace) -> None:
    from advpipe.cli import app

    target = run.dir / EVAL_FILENAME
    target.unlink(missing_ok=True)
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(run.ckpt), "--limit", "32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(target.read_text())["clean"]["n"] == 32


@pytest.mark.parametrize("args,needle", [
    (["--attack", "pgd:eps=banana"], "invalid eps 'banana'"),
    (["--attack", "fgsm", "--attack", "laser"], "unknown attack kind 'laser'"),
    (["--corruptions", "hail"], "unknown corruption 'hail'"),
    (["--severities", "0-9"], "severities"),
    (["--attack", "mifgsm-transfer:surrogate=/nonexistent/x.pt"], "does not exist"),
])
def test_cli_evaluate_refuses_bad_input_in_one_line(run: SimpleNamespace, args: list[str], needle: str) -> None:
    from advpipe.cli import app

    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(run.ckpt), "--device", "cpu", *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
