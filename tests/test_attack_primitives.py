"""Tests of the shared attack primitives (advpipe.attacks.primitives) and the one attack registry."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

from advpipe.attacks.dense import fgsm, mifgsm, pgd
from advpipe.attacks.init_attack import INIT_ATTACKS, init_attack_kind
from advpipe.attacks.primitives import (
    is_adversarial,
    l1_normalized,
    linf_bounds,
    momentum_update,
    per_sample,
    project,
    sign_step,
    uniform_noise,
)
from advpipe.attacks.registry import ATTACKS
from advpipe.attacks.sparse import SparseAttackConfig, SparseAttackResult
from advpipe.errors import AdvpipeError
from advpipe.eval.specs import parse_attack_spec
from advpipe.train.afan import feature_pgd
from advpipe.train.mtlat import targeted_fgsm_per_sample

B, C, S, K = 6, 3, 4, 5


def _images(seed: int = 0) -> torch.Tensor:
    x = torch.rand(B, C, S, S, generator=torch.Generator().manual_seed(seed))
    x[0, 0, 0] = 0.0  # pixels on both edges of the box
    x[1, 1, 1] = 1.0
    return x


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(C * S * S, K)).eval()


def test_per_sample_broadcasts_a_batch_vector_and_keeps_numbers() -> None:
    x = torch.zeros(B, C, S, S, dtype=torch.float64)
    assert per_sample(0.5, x) == 0.5
    eps = per_sample(torch.arange(B, dtype=torch.float32), x)
    assert eps.shape == (B, 1, 1, 1) and eps.dtype == torch.float64
    mask = per_sample(torch.ones(B, dtype=torch.bool), x)
    assert mask.dtype == torch.bool and mask.shape == (B, 1, 1, 1)
    with pytest.raises(ValueError, match="per-sample"):
        per_sample(torch.ones(B + 1), x)


@pytest.mark.parametrize("eps", [0.1, torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 1.0])])
def test_projection_keeps_the_eps_ball_and_the_unit_box(eps: float | torch.Tensor) -> None:
    x = _images()
    bounds = linf_bounds(x, eps)
    r = eps.view(-1, 1, 1, 1) if isinstance(eps, torch.Tensor) else eps
    torch.testing.assert_close(bounds[0], (x - r).clamp(min=0), rtol=0, atol=0)
    torch.testing.assert_close(bounds[1], (x + r).clamp(max=1), rtol=0, atol=0)
    far = x + 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    v = project(far.clone(), bounds)
    assert ((v >= 0) & (v <= 1)).all()
    assert ((v - x).abs() <= r + 1e-7).all()
    inside = (far >= bounds[0]) & (far <= bounds[1])
    assert inside.any() and torch.equal(v[inside], far[inside])  # points already inside do not move
    if isinstance(eps, torch.Tensor):
        assert torch.equal(v[0], x[0])  # eps 0: the image itself


def test_offset_and_feature_bounds() -> None:
    x = _images()
    lo, hi = linf_bounds(None, 0.2, low=-x, high=1 - x)  # the sparse attack's delta
    delta = project(torch.full_like(x, 0.5), (lo, hi))
    assert ((x + delta) <= 1).all() and (delta <= 0.2).all()
    assert torch.equal(delta, torch.minimum(torch.full_like(x, 0.2), 1 - x))
    f = 5 * torch.randn(B, 8, generator=torch.Generator().manual_seed(2))  # features: no [0,1] box
    bounds = linf_bounds(None, torch.tensor(0.3), low=None, high=None)
    moved = project(f + 1.0, tuple(b + f for b in bounds))
    torch.testing.assert_close(moved, f + 0.3)
    assert (moved > 1).any() and (moved < 0).any()


def test_sign_step_scalar_per_sample_and_descent() -> None:
    v = torch.zeros(3, 2)
    d = torch.tensor([[2.0, -0.5], [0.0, 1.0], [-3.0, 4.0]])
    assert torch.equal(sign_step(v.clone(), d, 0.1), 0.1 * d.sign())
    assert torch.equal(sign_step(v.clone(), d, -0.1), -0.1 * d.sign())
    steps = torch.tensor([0.0, 1.0, 2.0])
    assert torch.equal(sign_step(v.clone(), d, steps), steps.view(-1, 1) * d.sign())


def test_mifgsm_momentum_update_is_the_formula_on_a_hand_made_gradient() -> None:
    grad = torch.zeros(2, 1, 2, 2)
    grad[0, 0] = torch.tensor([[1.0, -3.0], [0.0, 0.0]])  # L1 norm 4; sample 1 has a zero gradient
    momentum = torch.tensor([0.5, -1.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    expected = momentum * 0.9
    expected[0, 0] += torch.tensor([[0.25, -0.75], [0.0, 0.0]])
    out = momentum_update(momentum, grad, 0.9)
    assert out is momentum  # in place
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(l1_normalized(grad).abs().sum(dim=(1, 2, 3)), torch.tensor([1.0, 0.0]))


def test_uniform_noise_is_in_the_ball_and_comes_from_the_generator_only() -> None:
    x = torch.zeros(B, C, S, S)
    eps = torch.tensor([0.0, 0.01, 0.1, 0.2, 0.5, 1.0])
    state = torch.random.get_rng_state()
    a = uniform_noise(x, eps, torch.Generator().manual_seed(3))
    b = uniform_noise(x, eps, torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state) and torch.equal(a, b)
    assert (a.abs().flatten(1).amax(1) <= eps).all() and torch.equal(a[0], torch.zeros_like(a[0]))
    assert (a[5].abs() > 0.5).any()  # it spreads over the ball, not a corner of it


def test_is_adversarial() -> None:
    pred, y = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2])
    assert is_adversarial(pred, y, False).tolist() == [False, True, False]
    assert is_adversarial(pred, y, True).tolist() == [True, False, True]


def test_mifgsm_without_momentum_is_ifgsm() -> None:
    """decay 0: sign(grad / ||grad||_1) = sign(grad), so MI-FGSM is PGD from the clean image."""
    model, x = _model(), _images()
    y = torch.arange(B) % K
    a = mifgsm(model, x, y, eps=0.05, steps=4, step_size=0.02, decay=0.0)
    b = pgd(model, x, y, eps=0.05, steps=4, step_size=0.02, random_start=False)
    assert torch.equal(a, b)


def test_fgsm_moves_each_image_by_exactly_its_own_eps() -> None:
    model, x = _model(), _images()
    y = torch.arange(B) % K
    eps = torch.tensor([0.0, 0.01, 0.02, 0.04, 0.08, 0.1])
    out = fgsm(model, x, y, eps=eps)
    step = (out - x).abs()
    free = (x > 0.1) & (x < 0.9)  # no [0,1] clipping possible there
    r = eps.view(-1, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(step[free], r[free], rtol=0, atol=1e-6)
    assert ((out >= 0) & (out <= 1)).all()
    assert torch.equal(fgsm(model, x, y, eps=torch.full((B,), 0.03)), fgsm(model, x, y, eps=0.03))
    with pytest.raises(ValueError, match="tensor"):
        fgsm(model, x, y, eps=torch.ones(B + 1))
    with pytest.raises(AdvpipeError, match="eps"):
        fgsm(model, x, y, eps=-eps)


def test_pgd_with_per_sample_eps_stays_in_each_ball() -> None:
    model, x = _model(), _images()
    y = torch.arange(B) % K
    eps = torch.tensor([0.0, 0.01, 0.02, 0.04, 0.08, 0.1])
    out = pgd(model, x, y, eps=eps, steps=3, step_size=0.05, generator=torch.Generator().manual_seed(0))
    moved = (out - x).abs().flatten(1).amax(1)
    assert (moved <= eps + 1e-6).all() and moved[0] == 0 and (moved[1:] > 0).all()


def test_mtlat_per_sample_fgsm_is_targeted_fgsm_with_a_per_sample_eps() -> None:
    model, x = _model(), _images()
    target = (torch.arange(B) + 1) % K
    eps = torch.linspace(0.0, 0.025, B)
    out = targeted_fgsm_per_sample(model, x, target, eps)
    # m-tlat.txt Eq. (5), written out here: clip(x - eps_i sign(grad_x CE(f(x), target)), 0, 1)
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(leaf), target, reduction="sum"), leaf)
    expected = (x - eps.view(-1, 1, 1, 1) * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # a step towards the target lowers the targeted loss of every moved image (a flipped sign raises it)
    with torch.no_grad():
        before = nn.functional.cross_entropy(model(x), target, reduction="none")
        after = nn.functional.cross_entropy(model(out), target, reduction="none")
    assert after[0] == before[0] and (after[1:] < before[1:]).all(), (before, after)


def test_feature_pgd_is_the_shared_loop_without_the_unit_box() -> None:
    gen = torch.Generator().manual_seed(0)
    head = nn.Sequential(nn.Linear(8, K))
    f, y = 4 * torch.randn(B, 8, generator=gen), torch.arange(B) % K
    delta = feature_pgd(head, f, y, eps=torch.tensor(0.2), steps=3, step_size=0.1)
    # a-fan.txt Eq. (2), written out here: delta <- clip(delta + 0.1 sign(grad_delta CE(head(f + delta), y)), -0.2, 0.2)
    expected = torch.zeros_like(f)
    for _ in range(3):
        leaf = expected.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(head(f + leaf), y, reduction="sum"), leaf)
        expected = (expected + 0.1 * grad.sign()).clamp(-0.2, 0.2)
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
    with torch.no_grad():  # the perturbation raises the loss it ascends
        assert nn.functional.cross_entropy(head(f + delta), y) > nn.functional.cross_entropy(head(f), y)
    assert delta.abs().max() <= 0.2 + 1e-7 and (delta.abs() > 0.19).any()
    assert ((f + delta) > 1).any()  # features are not clamped to [0,1]
    started = feature_pgd(head, f, y, eps=0.2, steps=1, step_size=0.01, random_start=True,
                          generator=torch.Generator().manual_seed(1))
    assert started.abs().max() <= 0.2 + 1e-7


# --------------------------------------------------------------------------- the one registry


def test_one_registry_serves_specs_init_attacks_and_methods() -> None:
    for name in INIT_ATTACKS:
        assert init_attack_kind(name) is ATTACKS.get(name)
    for text in ("fgsm", "pgd", "pgd-early", "cw", "pgd-ll", "mifgsm", "apgd-ce", "apgd-suite"):
        assert parse_attack_spec(text).kind in ATTACKS
    with pytest.raises(AdvpipeError, match="mifgsm, pgd, pgd-early"):
        SparseAttackConfig(init_attack="cw")
    assert parse_attack_spec("pgd-early:steps=20").label == "PGD-20 8/255 early-stop"
    assert parse_attack_spec("mifgsm").key == "mifgsm:eps=8/255,steps=10,step=4/1275,decay=1"


def test_a_registry_kind_equals_the_direct_call_and_checks_its_arguments() -> None:
    model, x = _model(), _images()
    y = torch.arange(B) % K
    kind = ATTACKS.get("pgd")
    via = kind(model, x, y, eps=Fraction(8, 255), steps=3, generator=torch.Generator().manual_seed(0))
    direct = pgd(model, x, y, eps=8 / 255, steps=3, step_size=2 / 255, generator=torch.Generator().manual_seed(0))
    assert torch.equal(via, direct)
    targeted = kind(model, x, y, eps=0.1, steps=2, step=0.05, start="clean", targeted=True)
    assert torch.equal(targeted, pgd(model, x, y, eps=0.1, steps=2, step_size=0.05, random_start=False,
                                     targeted=True))
    with pytest.raises(TypeError, match="step_size"):
        kind(model, x, y, eps=0.1, steps=2, step_size=0.05)
    with pytest.raises(AdvpipeError, match="no targeted form"):
        ATTACKS.get("apgd-ce")(model, x, y, eps=0.1, targeted=True)
    with pytest.raises(AdvpipeError, match="surrogate"):
        ATTACKS.get("mifgsm-transfer")(model, x, y)


def test_sparse_summary_uses_the_shared_norm_summary() -> None:
    n = 4
    z = torch.zeros(n)
    res = SparseAttackResult(
        mask=torch.zeros(n, 2, 2, dtype=torch.bool), delta=torch.zeros(n, 1, 2, 2), soft_mask=torch.zeros(n, 2, 2),
        success=torch.tensor([True, True, False, True]), l0_elements=torch.tensor([1, 2, 50, 4]),
        l0_pixels=torch.tensor([1, 1, 9, 2]), l2=z, linf=z, loss=z, l_init=z,
        init_success=torch.tensor([True, False, True, True]), clean_correct=torch.ones(n, dtype=torch.bool),
        best_step=torch.zeros(n, dtype=torch.long), targets=None, config={})
    s = res.summary()
    assert s["n"] == 4 and s["asr"] == 0.75 and s["init_asr"] == 0.75
    assert s["l0_elements"] == pytest.approx(7 / 3) and s["l0_elements_median"] == 2.0
    every = SparseAttackResult(**{**res.__dict__, "success": torch.ones(n, dtype=torch.bool)}).summary()
    assert every["l0_elements_median"] == 3.0  # even count: the mean of the two middle values (2, 4)
    empty = SparseAttackResult(**{**res.__dict__, "success": torch.zeros(n, dtype=torch.bool)}).summary()
    assert empty["asr"] == 0.0 and empty["l0_elements"] != empty["l0_elements"]  # NaN without a success
