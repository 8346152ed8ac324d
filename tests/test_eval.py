"""Tests of the evaluation suite: attack specs, corruptions, norms, robustness scores and `advpipe evaluate`."""

from __future__ import annotations

import colorsys
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advpipe import progress
from advpipe.data.datasets import load_dataset
from advpipe.errors import AdvpipeError
from advpipe.eval.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, corrupt, parse_corruption_list, parse_severities
from advpipe.eval.robustness import perturbation_norms, robustness_score, summarize_norms
from advpipe.eval.run import EVAL_FILENAME, EvalConfig, evaluate
from advpipe.eval.specs import DEFAULT_SUITE, parse_attack_spec, parse_attack_specs
from advpipe.utils import sha256_file

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


# --------------------------------------------------------------------------- corruptions


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """32 real CIFAR-10 test images (the embedded subset) in [0,1]."""
    return load_dataset("embedded", "test", limit=32).images.float() / 255


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_corruption_contract(name: str, images: torch.Tensor) -> None:
    x = images.clone()
    diffs = []
    for severity in (1, 5):
        g = torch.Generator().manual_seed(severity)
        out = corrupt(x, name, severity, generator=g)
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert out.min() >= 0 and out.max() <= 1
        diffs.append((out - x).abs().mean().item())
    assert torch.equal(x, images), "input modified in place"
    assert diffs[0] > 0
    assert diffs[1] > diffs[0], f"severity 5 should change images more than severity 1: {diffs}"
    # float64 in, float64 out; empty batches pass through
    assert corrupt(x[:2].double(), name, 3, generator=torch.Generator().manual_seed(0)).dtype == torch.float64
    assert corrupt(x[:0], name, 3).shape == (0, *x.shape[1:])


@pytest.mark.parametrize("name", [n for n in ALL_CORRUPTIONS if CORRUPTIONS.get(n).random])
def test_random_corruptions_replay_from_generator_and_params(name: str, images: torch.Tensor) -> None:
    c = CORRUPTIONS.get(name)
    a = c(images, 3, generator=torch.Generator().manual_seed(7))
    b = c(images, 3, generator=torch.Generator().manual_seed(7))
    other = c(images, 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, other)
    params = c.sample(images, 3, torch.Generator().manual_seed(7))
    assert torch.equal(c.apply(images, 3, params), a)
    state = torch.get_rng_state()
    c(images, 3)  # without a generator: default-seeded, global RNG untouched
    assert torch.equal(state, torch.get_rng_state())


def _hsv_reference(img: torch.Tensor, fn) -> torch.Tensor:
    a = img.permute(1, 2, 0).double().numpy()
    out = np.array([[colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*px))) for px in row] for row in a])
    return torch.from_numpy(out).permute(2, 0, 1).clamp(0, 1)


@pytest.mark.parametrize("severity", [1, 2, 5])
def test_brightness_and_saturate_match_hsv_round_trip(severity: int, images: torch.Tensor) -> None:
    img = images[3].double()
    shift = CORRUPTIONS.get("brightness").level(severity)["shift"]
    ref = _hsv_reference(img, lambda h, s, v: (h, s, min(v + shift, 1.0)))
    assert torch.allclose(corrupt(img[None], "brightness", severity)[0], ref, atol=1e-9)
    lv = CORRUPTIONS.get("saturate").level(severity)
    ref = _hsv_reference(img, lambda h, s, v: (h, min(max(s * lv["scale"] + lv["offset"], 0.0), 1.0), v))
    assert torch.allclose(corrupt(img[None], "saturate", severity)[0], ref, atol=1e-9)


def test_gaussian_blur_matches_scipy(images: torch.Tensor) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    img = images[:2].double()
    for severity in (1, 5):
        sigma = CORRUPTIONS.get("gaussian-blur").level(severity)["sigma"]
        ref = np.stack([[ndimage.gaussian_filter(ch.numpy(), sigma=sigma, mode="nearest", truncate=4.0) for ch in im]
                        for im in img])
        assert torch.allclose(corrupt(img, "gaussian-blur", severity), torch.from_numpy(ref), atol=1e-9)


def test_pixelate_and_jpeg_match_pil(images: torch.Tensor) -> None:
    from PIL import Image

    uint8 = (images[:4] * 255).round().to(torch.uint8)
    for severity in (1, 5):
        factor = CORRUPTIONS.get("pixelate").level(severity)["factor"]
        quality = CORRUPTIONS.get("jpeg").level(severity)["quality"]
        for i, img in enumerate(uint8):
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())
            small = pil.resize((int(32 * factor), int(32 * factor)), Image.BOX).resize((32, 32), Image.BOX)
            ref = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).float() / 255
            # PIL rounds to uint8; we stay in float
            assert (corrupt(images[i: i + 1], "pixelate", severity)[0] - ref).abs().max() <= 1.01 / 255
            buf = io.BytesIO()
            pil.save(buf, "JPEG", quality=quality)
            ref = torch.from_numpy(np.asarray(Image.open(buf)).copy()).permute(2, 0, 1).float() / 255
            assert (corrupt(images[i: i + 1], "jpeg", severity)[0] - ref).abs().mean() <= 1 / 255


def test_geometric_corruptions_do_what_they_say(images: torch.Tensor) -> None:
    x = images[:8]
    g = torch.Generator().manual_seed(0)
    occ = CORRUPTIONS.get("occlusion")
    p = occ.sample(x, 5, g)
    out = occ.apply(x, 5, p)
    for b in range(len(x)):
        t, l, s = int(p["top"][b]), int(p["left"][b]), int(p["side"][b])
        assert s == 18
        assert torch.all(out[b, :, t:t + s, l:l + s] == 0.5)
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[t:t + s, l:l + s] = False
        assert torch.equal(out[b][:, outside], x[b][:, outside])
    tr = CORRUPTIONS.get("translation")
    p = tr.sample(x, 3, g)
    out = tr.apply(x, 3, p)
    for b in range(len(x)):
        dx, dy = int(p["dx"][b]), int(p["dy"][b])
        assert 5 <= (dx**2 + dy**2) ** 0.5 <= 7  # 6 px at severity 3, up to rounding
        shifted = torch.zeros_like(x[b])
        shifted[:, max(dy, 0): 32 + min(dy, 0), max(dx, 0): 32 + min(dx, 0)] = \
            x[b][:, max(-dy, 0): 32 + min(-dy, 0), max(-dx, 0): 32 + min(-dx, 0)]
        assert torch.allclose(out[b], shifted)
    cs = CORRUPTIONS.get("color-shift")
    p = cs.sample(x, 2, g)
    out = cs.apply(x, 2, p)
    changed = (out != x).flatten(2).any(2)
    assert torch.equal(changed.float().argmax(1), p["channel"]) and torch.all(changed.sum(1) == 1)
    rot = CORRUPTIONS.get("rotation")
    p = rot.sample(x, 4, g)
    assert set(p["degrees"].abs().tolist()) == {32.0}
    out = rot.apply(x, 4, p)
    assert torch.all(out[:, :, 0, 0] == 0)  # corners rotate out of the image and become black


def test_corruption_and_severity_lists() -> None:
    assert parse_corruption_list("all") == list(ALL_CORRUPTIONS) and len(ALL_CORRUPTIONS) == 14
    assert parse_corruption_list("jpeg,Gaussian_Noise,jpeg") == ["gaussian-noise", "jpeg"]
    assert parse_corruption_list(None) == [] and parse_corruption_list("none") == []
    with pytest.raises(AdvpipeError, match="unknown corruption 'fog'.*choose one of"):
        parse_corruption_list("fog")
    assert parse_severities("1-5") == (1, 2, 3, 4, 5)
    assert parse_severities("5,1,3") == (1, 3, 5)
    assert parse_severities("2") == (2,)
    for bad in ("0-3", "6", "a", "3-1", "", "1,,2"):
        with pytest.raises(AdvpipeError, match="severities"):
            parse_severities(bad)


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
    assert r["summary"]["mean_corruption_robustness"] == pytest.approx(
        np.mean([c["robustness"] for c in r["corruptions"].values()]))


def test_result_provenance_and_progress(run: SimpleNamespace) -> None:
    r = run.result
    assert r["checkpoint"]["sha256"] == sha256_file(run.ckpt)
    assert r["data"]["fingerprint"] == load_dataset("synthetic", "test", limit=LIMIT).fingerprint
    assert r["params"]["seed"] == 3 and r["params"]["precision"] == "fp32" and r["params"]["severities"] == [1, 5]
    assert len(r["params"]["attacks"]) == 5
    json.loads(json.dumps(r))  # JSON-able, no NaN
    assert "clean" in run.progress and "attack FGSM 8/255" in run.progress
    assert "gaussian-noise s1" in run.progress and "occlusion s5" in run.progress


def test_evaluation_is_reproducible_per_perturbation(run: SimpleNamespace) -> None:
    # The same seed gives the same numbers, whichever other perturbations run alongside.
    again = evaluate(EvalConfig(checkpoint=str(run.ckpt), limit=LIMIT, device="cpu", batch_size=128, seed=3,
                                corruptions=("occlusion",), severities=(5,)))
    assert again["corruptions"]["occlusion"]["severities"][0]["top1"] == \
        run.result["corruptions"]["occlusion"]["severities"][1]["top1"]


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
    (["--corruptions", "fog"], "unknown corruption 'fog'"),
    (["--severities", "0-9"], "severities"),
    (["--attack", "mifgsm-transfer:surrogate=/nonexistent/x.pt"], "does not exist"),
])
def test_cli_evaluate_refuses_bad_input_in_one_line(run: SimpleNamespace, args: list[str], needle: str) -> None:
    from advpipe.cli import app

    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(run.ckpt), "--device", "cpu", *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
