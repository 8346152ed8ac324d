"""Tests of the dense attacks (FGSM, PGD, MI-FGSM) and their losses on a tiny trained CNN."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from advpipe.attacks import (
    LOSSES,
    cross_entropy_loss,
    cw_margin_loss,
    fgsm,
    least_likely_targets,
    mifgsm,
    pgd,
    random_targets,
)
from advpipe.errors import AdvpipeError
from helpers.template_task import tiny_cnn, train_template_cnn

K = 4  # classes
S = 12  # image side
EPS = 8 / 255  # robust accuracy of the fixture model is roughly 25% here: a meaningful regime


# one intra-op thread: several times faster on a shared 2-core machine (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task() -> SimpleNamespace:
    """A tiny CNN trained on noisy class templates, plus 1000 held-out images."""
    model, sample = train_template_cnn(K, S)
    x, y = sample(1000)
    ns = SimpleNamespace(model=model, x=x, y=y)
    assert accuracy(ns, x) > 0.9, "fixture model failed to train; the other tests would be meaningless"
    return ns


def accuracy(task: SimpleNamespace, x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """Fraction of ``x`` the fixture model classifies as ``y`` (default: the true labels)."""
    y = task.y[: len(x)] if y is None else y
    with torch.no_grad():
        return (task.model(x).argmax(1) == y).float().mean().item()


def _ascent_attacks() -> dict[str, object]:
    return {
        "fgsm": lambda m, x, y, **kw: fgsm(m, x, y, eps=EPS, **kw),
        "pgd": lambda m, x, y, **kw: pgd(m, x, y, eps=EPS, steps=5, step_size=EPS / 3, **kw),
        "pgd_cw": lambda m, x, y, **kw: pgd(m, x, y, eps=EPS, steps=5, step_size=EPS / 3, loss="cw", **kw),
        "mifgsm": lambda m, x, y, **kw: mifgsm(m, x, y, eps=EPS, steps=5, **kw),
        "mifgsm_rs": lambda m, x, y, **kw: mifgsm(m, x, y, eps=EPS, steps=5, random_start=True, **kw),
    }


ATTACKS = _ascent_attacks()


# --- losses -------------------------------------------------------------------------------------


def test_cross_entropy_loss_is_per_sample_ce_and_targeted_negates() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    expected = torch.stack([-torch.log_softmax(logits[i], 0)[y[i]] for i in range(6)])
    torch.testing.assert_close(cross_entropy_loss(logits, y), expected)
    torch.testing.assert_close(cross_entropy_loss(logits, y, targeted=True), -expected)
    out = cross_entropy_loss(logits.bfloat16(), y)
    assert out.dtype == torch.float32 and out.shape == (6,)


@pytest.mark.parametrize("kappa", [0.0, 0.5, float("inf")])
def test_cw_margin_loss_matches_reference(kappa: float) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 5, generator=gen) * 3
    y = torch.randint(0, 5, (64,), generator=gen)
    # Reference through sorting: the best other class is the top class unless that is y.
    top2 = logits.topk(2, dim=1)
    other = torch.where(top2.indices[:, 0] == y, top2.values[:, 1], top2.values[:, 0])
    z_y = logits[torch.arange(64), y]
    torch.testing.assert_close(cw_margin_loss(logits, y, kappa=kappa), torch.clamp(other - z_y, max=kappa))
    torch.testing.assert_close(
        cw_margin_loss(logits, y, targeted=True, kappa=kappa), torch.clamp(z_y - other, max=kappa)
    )
    both = cw_margin_loss(logits, y, kappa=kappa)
    assert (both <= kappa).all() and (both < 0).any()
    assert cw_margin_loss(logits.half(), y, kappa=kappa).dtype == torch.float32


def test_cw_margin_loss_rejects_negative_kappa() -> None:
    with pytest.raises(ValueError, match="kappa"):
        cw_margin_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), kappa=-1.0)


def test_loss_registry_and_unknown_loss(task: SimpleNamespace) -> None:
    assert LOSSES.names() == ["ce", "cw"]
    assert LOSSES.get("ce") is cross_entropy_loss and LOSSES.get("cw") is cw_margin_loss
    with pytest.raises(AdvpipeError, match="ce, cw"):
        fgsm(task.model, task.x[:4], task.y[:4], eps=EPS, loss="hinge")


# --- the shared contract ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("targeted", [False, True])
def test_output_in_eps_ball_and_unit_box(task: SimpleNamespace, name: str, targeted: bool) -> None:
    x, y = task.x[:128], task.y[:128]
    if targeted:
        y = random_targets(y, K, generator=torch.Generator().manual_seed(3))
    x_before = x.clone()
    x_adv = ATTACKS[name](task.model, x, y, targeted=targeted, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert torch.equal(x, x_before), "the attack modified its input in place"
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() >= EPS / 2, "the attack did not move"


def test_strength_ordering_clean_fgsm_pgd(task: SimpleNamespace) -> None:
    x, y = task.x[:512], task.y[:512]
    clean = accuracy(task, x)
    acc_fgsm = accuracy(task, fgsm(task.model, x, y, eps=EPS))
    acc_pgd = accuracy(task, pgd(task.model, x, y, eps=EPS, steps=10, step_size=EPS / 4))
    acc_mi = accuracy(task, mifgsm(task.model, x, y, eps=EPS, steps=10))
    assert acc_pgd <= acc_fgsm <= clean
    assert acc_pgd < clean - 0.3
    assert acc_mi < clean - 0.3


def test_cw_loss_reduces_accuracy(task: SimpleNamespace) -> None:
    x, y = task.x[:512], task.y[:512]
    clean = accuracy(task, x)
    assert accuracy(task, pgd(task.model, x, y, eps=EPS, steps=10, step_size=EPS / 4, loss="cw")) < clean - 0.3
    assert accuracy(task, fgsm(task.model, x, y, eps=EPS, loss="cw")) < clean - 0.15


@pytest.mark.parametrize("picker", ["random", "least_likely"])
def test_targeted_attacks_reach_the_target(task: SimpleNamespace, picker: str) -> None:
    x, y = task.x[:256], task.y[:256]
    if picker == "random":
        target = random_targets(y, K, generator=torch.Generator().manual_seed(4))
    else:
        target = least_likely_targets(task.model, x)
        with torch.no_grad():
            assert torch.equal(target, task.model(x).argmin(1))
    eps = 16 / 255
    pgd_kw = dict(eps=eps, steps=10, step_size=eps / 4)
    assert accuracy(task, x, target) < 0.1
    hits = {
        "fgsm": accuracy(task, fgsm(task.model, x, target, eps=eps, targeted=True), target),
        "pgd": accuracy(task, pgd(task.model, x, target, targeted=True, **pgd_kw), target),
        "mifgsm": accuracy(task, mifgsm(task.model, x, target, eps=eps, steps=10, targeted=True), target),
        "pgd_cw": accuracy(task, pgd(task.model, x, target, targeted=True, loss="cw", **pgd_kw), target),
    }
    # Chance is 1/K = 0.25; the untargeted attack would spread over the K-1 other classes.
    assert all(rate > 0.6 for rate in hits.values()), hits


def test_random_targets_are_uniform_over_other_classes() -> None:
    gen = torch.Generator().manual_seed(5)
    y = torch.randint(0, K, (30000,), generator=gen)
    t = random_targets(y, K, generator=torch.Generator().manual_seed(6))
    assert t.dtype == torch.long and (t != y).all() and t.min() >= 0 and t.max() < K
    for c in range(K):
        freq = torch.bincount(t[y == c], minlength=K).float() / (y == c).sum()
        others = torch.tensor([k for k in range(K) if k != c])
        assert (freq[others] - 1 / (K - 1)).abs().max() < 0.03
    assert torch.equal(t, random_targets(y, K, generator=torch.Generator().manual_seed(6)))
    with pytest.raises(AdvpipeError):
        random_targets(y, 1, generator=gen)


@pytest.mark.parametrize("grad_mode", ["enabled", "no_grad"])
def test_parameters_and_modes_untouched(task: SimpleNamespace, grad_mode: str) -> None:
    model = copy.deepcopy(task.model)
    model.eval()
    model[4].train()  # a mixed-mode model: every flag must survive as the caller set it
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[1].grad = torch.full_like(params[1], 0.5)
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in model.modules()]
    x, y = task.x[:32], task.y[:32]
    ctx = torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad()
    with ctx:
        outs = [attack(model, x, y, generator=torch.Generator().manual_seed(0)) for attack in ATTACKS.values()]
        least_likely_targets(model, x)
    assert all((o - x).abs().max() > 0 for o in outs), "attacks must work even under no_grad"
    assert [p.requires_grad for p in params] == flags
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(params[1].grad, torch.full_like(params[1], 0.5))
    assert all(p.grad is None for i, p in enumerate(params) if i != 1)


def test_same_generator_seed_same_output_and_global_rng_untouched(task: SimpleNamespace) -> None:
    x, y = task.x[:64], task.y[:64]
    state = torch.get_rng_state()

    def run(seed: int | None, attack=pgd) -> torch.Tensor:
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        kw = dict(random_start=True) if attack is mifgsm else dict(step_size=EPS / 4)
        return attack(task.model, x, y, eps=EPS, steps=3, generator=gen, **kw)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(run(None), run(None))  # documented: a fresh default-seeded generator
    assert torch.equal(run(7, mifgsm), run(7, mifgsm))
    assert not torch.equal(run(7, mifgsm), run(8, mifgsm))
    assert torch.equal(torch.get_rng_state(), state)


def test_batchnorm_train_mode_is_kept_and_updates_statistics(task: SimpleNamespace) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = tiny_cnn(K, batchnorm=True)
    x, y = task.x[:64], task.y[:64]
    bn = model[1]
    model.train()
    before = bn.running_mean.clone()
    x_adv = pgd(model, x, y, eps=EPS, steps=3, step_size=EPS / 2, generator=torch.Generator().manual_seed(0))
    assert all(m.training for m in model.modules())
    # Train-mode BN updated its running statistics during the attack: the caller's mode was used.
    assert not torch.equal(bn.running_mean, before)
    assert bn.num_batches_tracked.item() == 3
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    model.eval()
    frozen = bn.running_mean.clone()
    pgd(model, x, y, eps=EPS, steps=3, step_size=EPS / 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bn.running_mean, frozen) and not any(m.training for m in model.modules())


def test_autocast_bfloat16(task: SimpleNamespace) -> None:
    x, y = task.x[:256], task.y[:256]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        x_pgd = pgd(task.model, x, y, eps=EPS, steps=5, step_size=EPS / 3, generator=gen)
        x_mi = mifgsm(task.model, x, y, eps=EPS, steps=5, loss="cw")
        x_fgsm = fgsm(task.model, x, y, eps=EPS)
    clean = accuracy(task, x)
    for x_adv in (x_pgd, x_mi, x_fgsm):
        assert x_adv.dtype == torch.float32
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
        assert accuracy(task, x_adv) < clean - 0.2


def test_batched_equals_unbatched(task: SimpleNamespace) -> None:
    x, y = task.x[:48], task.y[:48]
    for attack in (
        lambda a, b: pgd(task.model, a, b, eps=EPS, steps=4, step_size=EPS / 3, random_start=False),
        lambda a, b: mifgsm(task.model, a, b, eps=EPS, steps=4),
    ):
        whole = attack(x, y)
        parts = torch.cat([attack(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)])
        torch.testing.assert_close(parts, whole, atol=1e-6, rtol=0)


def test_empty_batch(task: SimpleNamespace) -> None:
    x, y = task.x[:0], task.y[:0]
    for attack in ATTACKS.values():
        assert attack(task.model, x, y).shape == x.shape


def test_mifgsm_reduces_to_fgsm_and_ifgsm(task: SimpleNamespace) -> None:
    x, y = task.x[:64], task.y[:64]
    # One step with the default step size eps/1 is FGSM.
    torch.testing.assert_close(mifgsm(task.model, x, y, eps=EPS, steps=1), fgsm(task.model, x, y, eps=EPS))
    # Without momentum the per-sample L1 normalization cannot change a sign: I-FGSM.
    torch.testing.assert_close(
        mifgsm(task.model, x, y, eps=EPS, steps=4, decay=0.0),
        pgd(task.model, x, y, eps=EPS, steps=4, step_size=EPS / 4, random_start=False),
    )
    # With momentum the result differs on a trained (non-linear) model.
    assert not torch.equal(
        mifgsm(task.model, x, y, eps=EPS, steps=4), mifgsm(task.model, x, y, eps=EPS, steps=4, decay=0.0)
    )


def test_invalid_arguments(task: SimpleNamespace) -> None:
    x, y = task.x[:4], task.y[:4]
    with pytest.raises(AdvpipeError, match="eps"):
        fgsm(task.model, x, y, eps=-0.1)
    with pytest.raises(AdvpipeError, match="steps"):
        pgd(task.model, x, y, eps=EPS, steps=0, step_size=0.01)
    with pytest.raises(AdvpipeError, match="decay"):
        mifgsm(task.model, x, y, eps=EPS, steps=2, decay=-1.0)
    with pytest.raises(ValueError, match="shape"):
        fgsm(task.model, x, y[:3], eps=EPS)
    with pytest.raises(TypeError):
        pgd(task.model, x, y, eps=EPS, steps=2, step_size=0.01, alpha=0.01)


# --- cross-check against torchattacks -----------------------------------------------------------


def test_pgd_matches_torchattacks(task: SimpleNamespace) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    x, y = task.x, task.y
    alpha, steps = EPS / 4, 10
    gen = torch.Generator().manual_seed(0)
    ours = accuracy(task, pgd(task.model, x, y, eps=EPS, steps=steps, step_size=alpha, generator=gen))
    reference = torchattacks.PGD(task.model, eps=EPS, alpha=alpha, steps=steps, random_start=True)
    # torchattacks draws its start from the global RNG. A different seed from ours on purpose: the
    # CPU streams of Generator(seed).rand and manual_seed(seed)+uniform_ coincide, which would make
    # this an exact comparison instead of the statistical one it is meant to be.
    with torch.random.fork_rng():
        torch.manual_seed(1)
        theirs = accuracy(task, reference(x, y))
    assert 0.1 < ours < 0.9 and 0.1 < theirs < 0.9, (ours, theirs)
    assert abs(ours - theirs) <= 0.01, (ours, theirs)


def test_pgd_without_random_start_equals_torchattacks(task: SimpleNamespace) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    x, y = task.x[:256], task.y[:256]
    ours = pgd(task.model, x, y, eps=EPS, steps=5, step_size=EPS / 3, random_start=False)
    theirs = torchattacks.PGD(task.model, eps=EPS, alpha=EPS / 3, steps=5, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_early_stop_keeps_each_image_at_its_first_adversarial_iterate(task: SimpleNamespace,
                                                                         targeted: bool) -> None:
    """early_stop: image i ends at iterate k_i, the first one classified adversarially (else the last)."""
    x, y = task.x[:200], task.y[:200]
    label = (y + 1) % K if targeted else y
    steps, kw = 6, dict(eps=EPS, step_size=EPS / 4, targeted=targeted)

    def run(n: int, **extra: object) -> torch.Tensor:
        return pgd(task.model, x, label, steps=n, generator=torch.Generator().manual_seed(3), **kw, **extra)

    start = pgd(task.model, x, label, steps=1, generator=torch.Generator().manual_seed(3),
                eps=EPS, step_size=0.0, targeted=targeted)
    iterates = [start] + [run(n) for n in range(1, steps + 1)]  # iterate k = k full steps
    with torch.no_grad():
        adv = torch.stack([(task.model(it).argmax(1) == label) if targeted else (task.model(it).argmax(1) != label)
                           for it in iterates[:-1]])  # success checked before each of the `steps` updates
    first = torch.where(adv.any(0), adv.float().argmax(0), torch.full_like(y, steps))
    expected = torch.stack([iterates[int(k)][i] for i, k in enumerate(first)])
    got = run(steps, early_stop=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert 0 < int((first < steps).sum()) < len(y)  # both kinds of image occur
    assert (first[first < steps] > 0).any()  # and some stop after a few steps, not at the start


def test_pgd_from_a_start_continues_an_earlier_run_exactly(task: SimpleNamespace) -> None:
    x, y = task.x[:128], task.y[:128]
    kw = dict(eps=EPS, step_size=EPS / 4)
    whole = pgd(task.model, x, y, steps=7, generator=torch.Generator().manual_seed(4), **kw)
    first = pgd(task.model, x, y, steps=3, generator=torch.Generator().manual_seed(4), **kw)
    state = torch.get_rng_state()
    rest = pgd(task.model, x, y, steps=4, start=first, generator=None, **kw)
    torch.testing.assert_close(rest, whole, rtol=0, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), state)
    outside = x + 3 * EPS  # a start outside the ball is projected into it before the first step
    moved = pgd(task.model, x, y, steps=1, step_size=0.0, eps=EPS, start=outside)
    assert ((moved - x).abs() <= EPS + 1e-6).all() and (moved >= 0).all() and (moved <= 1).all()
    with pytest.raises(ValueError, match="start"):
        pgd(task.model, x, y, steps=1, start=x[:3], **kw)
