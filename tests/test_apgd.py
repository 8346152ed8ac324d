"""APGD-CE / APGD-DLR / APGD-T: the attack contract, the losses, and a cross-check against torchattacks.APGD."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from advpipe.attacks import pgd
from advpipe.attacks.apgd import apgd, apgd_targeted, apgd_worst_case, dlr_loss, dlr_targeted_loss
from advpipe.data.datasets import load_dataset
from advpipe.errors import AdvpipeError
from advpipe.eval.specs import parse_attack_spec, parse_attack_specs

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 4 / 255  # the tiny model keeps about two thirds of the images at this radius: a discriminating test
N = 256
STEPS = 25


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny CNN trained for 3 epochs on the synthetic task and its first N test images."""
    from advpipe.models.build import model_from_checkpoint
    from advpipe.models.checkpoint import load_checkpoint
    from advpipe.train.config import TrainConfig
    from advpipe.train.loop import train

    out = tmp_path_factory.mktemp("apgd") / "run"
    train(TrainConfig(data="synthetic", model="test-tiny-cnn", epochs=3, batch_size=64, lr=0.1, schedule="constant",
                      out=str(out), device="cpu", seed=0))
    model = model_from_checkpoint(load_checkpoint(out / "best.pt")).eval()
    ds = load_dataset("synthetic", "test", limit=N)
    return SimpleNamespace(model=model, x=ds.images.float() / 255, y=ds.labels.long())


def _robust(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def test_dlr_losses_match_their_formulas() -> None:
    z = torch.tensor([[4.0, 1.0, 3.0, 0.0, -1.0], [0.0, 5.0, 2.0, 1.0, 0.5]])
    y = torch.tensor([0, 2])
    # sorted: [4, 3, 1, 0, -1] and [5, 2, 1, 0.5, 0]
    assert torch.allclose(dlr_loss(z, y), torch.tensor([-(4 - 3) / (4 - 1), -(2 - 5) / (5 - 1)]))
    t = torch.tensor([2, 1])
    expected = torch.tensor([-(4 - 3) / (4 - (1 + 0) / 2), -(2 - 5) / (5 - (1 + 0.5) / 2)])
    assert torch.allclose(dlr_targeted_loss(z, y, t), expected)
    with pytest.raises(AdvpipeError, match="at least 3 classes"):
        dlr_loss(z[:, :2], torch.tensor([0, 1]))


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_agrees_with_torchattacks_and_beats_pgd20(loss: str, setup: SimpleNamespace) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    m, x, y = setup.model, setup.x, setup.y
    state = torch.get_rng_state()
    ours = apgd(m, x, y, eps=EPS, steps=STEPS, loss=loss, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state()), "APGD touched the global RNG"
    theirs = torchattacks.APGD(m, norm="Linf", eps=EPS, steps=STEPS, n_restarts=1, seed=0, loss=loss)(x, y)
    ours_acc, theirs_acc = _robust(m, ours, y).float().mean(), _robust(m, theirs, y).float().mean()
    assert 0.2 < ours_acc < _robust(m, x, y).float().mean(), "the radius should leave a discriminating accuracy"
    assert abs(ours_acc - theirs_acc) <= 0.01, (ours_acc, theirs_acc)
    if loss == "ce":
        baseline = pgd(m, x, y, eps=EPS, steps=20, step_size=EPS / 4, generator=torch.Generator().manual_seed(0))
        assert ours_acc <= _robust(m, baseline, y).float().mean()
    assert (ours - x).abs().max() <= EPS + 1e-6 and ours.min() >= 0 and ours.max() <= 1


def test_apgd_contract(setup: SimpleNamespace) -> None:
    m, x, y = setup.model, setup.x[:32].clone(), setup.y[:32]
    before = x.clone()
    m.train()
    try:
        a = apgd(m, x, y, eps=EPS, steps=5, generator=torch.Generator().manual_seed(3))
        assert m.training, "APGD changed the model's mode"
    finally:
        m.eval()
    assert torch.equal(x, before) and a.dtype == x.dtype and a.shape == x.shape
    b = apgd(m, x, y, eps=EPS, steps=5, generator=torch.Generator().manual_seed(3))
    c = apgd(m, x, y, eps=EPS, steps=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(b, c)
    assert not any(p.grad is not None for p in m.parameters())
    assert apgd(m, x[:0], y[:0], eps=EPS).shape == (0, *x.shape[1:])
    with pytest.raises(AdvpipeError, match="restarts"):
        apgd(m, x, y, eps=EPS, restarts=0)
    with pytest.raises(AdvpipeError, match="ce or dlr"):
        apgd(m, x, y, eps=EPS, loss="cw")


def test_targeted_and_worst_case_suite(setup: SimpleNamespace) -> None:
    m, x, y = setup.model, setup.x[:96], setup.y[:96]
    g = torch.Generator().manual_seed(1)
    ce = apgd(m, x, y, eps=EPS, steps=10, generator=torch.Generator().manual_seed(1))
    targeted = apgd_targeted(m, x, y, eps=EPS, steps=10, targets=3, generator=g)
    suite = apgd_worst_case(m, x, y, eps=EPS, steps=10, targets=3, generator=torch.Generator().manual_seed(1))
    clean = _robust(m, x, y)
    for adv in (targeted, suite):
        assert (adv - x).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert _robust(m, targeted, y).sum() < clean.sum()
    # the suite breaks every image APGD-CE breaks (same seed), and is never more robust than either attack alone
    assert not (_robust(m, suite, y) & ~_robust(m, ce, y)).any()
    assert _robust(m, suite, y).sum() <= min(_robust(m, ce, y).sum(), _robust(m, targeted, y).sum() + 2)


def test_apgd_specs() -> None:
    spec = parse_attack_spec("apgd-ce:eps=8/255,steps=100")
    assert spec.key == "apgd-ce:eps=8/255,steps=100,restarts=1" and spec.label == "APGD-CE-100 8/255"
    assert parse_attack_spec("apgd-dlr").label == "APGD-DLR-100 8/255"
    assert parse_attack_spec("apgd-t:targets=3").label == "APGD-T-100 8/255 (targets=3)"
    suite = parse_attack_spec("apgd-suite")
    assert suite.label == "APGD-CE+T-100 8/255 worst case" and suite.values["targets"] == 9
    assert [s.kind for s in parse_attack_specs(["apgd-suite", "apgd-suite:eps=8/255"])] == ["apgd-suite"]
    for bad, needle in (("apgd-ce:restarts=0", "invalid restarts"), ("apgd-t:targets=x", "invalid targets"),
                        ("apgd-suite:restarts=2", "unknown key 'restarts'")):
        with pytest.raises(AdvpipeError, match=needle):
            parse_attack_spec(bad)
