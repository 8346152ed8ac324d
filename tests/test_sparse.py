"""Tests of the AdvMask sparse attack (advpipe.attacks.sparse) and its encoders on a tiny trained CNN."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from advpipe.attacks.dense import pgd
from advpipe.attacks.encoders import LinearEncoder, build_encoder, single_value_safe
from advpipe.attacks.init_attack import dense_init
from advpipe.attacks.sparse import (
    ALPHA_SCHEDULES,
    SparseAttackConfig,
    SparseAttackResult,
    sparse_attack,
)
from advpipe.errors import AdvpipeError
from helpers.template_task import train_template_cnn

K = 4  # classes
S = 16  # image side
EPS = Fraction(32, 255)  # dense PGD succeeds on every fixture image; a few pixels suffice at this budget


# one intra-op thread: several times faster on a shared 2-core machine (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task() -> SimpleNamespace:
    """A tiny CNN trained on noisy smooth class templates, plus 32 held-out correctly classified images."""
    model, sample = train_template_cnn(K, S)
    x, y = sample(64)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert correct.float().mean() > 0.85, "fixture model failed to train; the other tests would be meaningless"
    x, y = x[correct][:32], y[correct][:32]
    return SimpleNamespace(model=model, x=x, y=y)


def _attack(task: SimpleNamespace, seed: int = 0, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
            **overrides) -> SparseAttackResult:
    cfg = SparseAttackConfig(**{"eps": EPS, "steps": 60, **overrides})
    x = task.x if x is None else x
    y = task.y if y is None else y
    return sparse_attack(task.model, x, y, cfg, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def adaptive(task: SimpleNamespace) -> SparseAttackResult:
    """One untargeted run with the success-aware lambda, shared by several tests."""
    return _attack(task, lambda_rule="adaptive")


def _predict(task: SimpleNamespace, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return task.model(x.float()).argmax(1)


# --- config ----------------------------------------------------------------------------------


def test_config_to_dict_writes_fractions_and_resolve_follows_image_size() -> None:
    cfg = SparseAttackConfig(eps=Fraction(8, 255))
    d = cfg.to_dict()
    assert d["eps"] == "8/255" and d["beta"] is None and d["lambda_rule"] == "paper"
    small = cfg.resolve((3, 32, 32))
    assert (small.encoder, small.alpha_max) == ("linear", 100.0)  # advmask.txt Sec. III-A a, IV-B
    assert small.beta == Fraction(2, 255) and small.to_dict()["beta"] == "2/255"
    large = cfg.resolve((3, 64, 64))
    assert (large.encoder, large.alpha_max) == ("unet", 5.0)
    forced = SparseAttackConfig(encoder="linear", alpha_max=7.0).resolve((3, 64, 64))
    assert (forced.encoder, forced.alpha_max) == ("linear", 7.0)
    assert SparseAttackConfig(eps=0.03).to_dict()["eps"] == 0.03


def test_config_from_dict_reads_what_to_dict_wrote() -> None:
    cfg = SparseAttackConfig(beta=Fraction(3, 2), init_step_size=0.01, lambda_rule="adaptive").resolve((3, 32, 32))
    assert SparseAttackConfig.from_dict(cfg.to_dict()) == cfg  # "3/2" and "8/255" back to Fractions
    for values, match in (({"colour": 1}, "stored attack records fields .*'colour'"),
                          ({"beta": "x"}, "invalid stored attack beta 'x'"), ({"eps": "1e-99999"}, "too small"),
                          ({"alpha_schedule": ["geometric"]}, "stored attack is unusable")):
        with pytest.raises(AdvpipeError, match=match):
            SparseAttackConfig.from_dict(values, name="stored attack")


@pytest.mark.parametrize(
    "kwargs",
    [dict(eps=-0.1), dict(eps=2.0), dict(steps=0), dict(steps=1.5), dict(alpha_min=0.0),
     dict(alpha_min=10.0, alpha_max=5.0), dict(alpha_schedule="nope"), dict(encoder="nope"),
     dict(encoder_scope="pixel"), dict(lambda_rule="nope"), dict(target="nope"), dict(init_attack="nope"),
     dict(autocast_dtype="fp8"), dict(adam_lr=0.0), dict(keep_best=1), dict(init_extra_steps=-1),
     dict(init_extra_steps=2.5), dict(init_extra_steps=True)],
)
def test_config_rejects_invalid_settings(kwargs: dict) -> None:
    with pytest.raises(AdvpipeError):
        SparseAttackConfig(**kwargs)


def test_config_rejects_unknown_keywords() -> None:
    with pytest.raises(TypeError):
        SparseAttackConfig(epsilon=0.1)  # type: ignore[call-arg]


@pytest.mark.parametrize("name", ALPHA_SCHEDULES.names())
def test_alpha_schedules_run_from_alpha_min_to_alpha_max_monotonically(name: str) -> None:
    fn = ALPHA_SCHEDULES.get(name)
    values = [fn(t, 50, 0.1, 100.0) for t in range(50)]
    assert values[0] == pytest.approx(0.1) and values[-1] == pytest.approx(100.0)
    assert all(b > a for a, b in zip(values, values[1:]))


# --- encoders --------------------------------------------------------------------------------


def test_per_image_linear_encoder_keeps_images_independent() -> None:
    gen = torch.Generator().manual_seed(0)
    enc = build_encoder("linear", (3, 8, 8), 4, scope="image", generator=gen, device=torch.device("cpu"))
    assert isinstance(enc, LinearEncoder) and enc.weight.shape == (4, 3 * 8 * 8, 8 * 8)
    d = torch.rand(4, 3, 8, 8, generator=gen)
    out = enc(d)
    d2 = d.clone()
    d2[1:] = torch.rand(3, 3, 8, 8, generator=gen)
    out2 = enc(d2)
    assert out.shape == (4, 1, 8, 8)
    torch.testing.assert_close(out2[0], out[0])  # image 0's logits ignore the other images
    assert not torch.allclose(out2[1], out[1])
    manual = (d[2].reshape(1, -1) @ enc.weight[2] + enc.bias[2]).view(1, 8, 8)
    torch.testing.assert_close(out[2], manual)


def test_encoder_init_comes_from_the_generator_only() -> None:
    state = torch.get_rng_state()
    make = lambda seed: build_encoder(  # noqa: E731
        "linear", (3, 8, 8), 2, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))
    a, b, c = make(1), make(1), make(2)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a.weight, b.weight)
    assert not torch.equal(a.weight, c.weight)


def test_unet_rejects_per_image_scope() -> None:
    with pytest.raises(AdvpipeError, match="linear encoder only"):
        build_encoder("unet", (3, 64, 64), 2, scope="image", generator=torch.Generator(),
                      device=torch.device("cpu"))


# --- the attack ------------------------------------------------------------------------------


def test_masks_end_near_binary(adaptive: SparseAttackResult) -> None:
    soft = adaptive.soft_mask
    assert soft.shape == (32, S, S)
    near = ((soft < 0.02) | (soft > 0.98)).float().mean()
    assert near > 0.95, f"only {near:.1%} of mask entries are near 0 or 1 at the end"
    assert adaptive.mask.dtype == torch.bool and adaptive.mask.shape == (32, S, S)


def test_applied_perturbation_respects_eps_and_the_image_box(task: SimpleNamespace,
                                                             adaptive: SparseAttackResult) -> None:
    x_adv = adaptive.adversarial(task.x)
    assert (x_adv - task.x).abs().max() <= float(EPS) + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (adaptive.linf <= float(EPS) + 1e-6).all()
    # delta stays in the box, so the clamp in adversarial() changes nothing
    torch.testing.assert_close(x_adv, task.x + adaptive.perturbation())


def test_success_on_most_images_and_claims_hold_in_fp32(task: SimpleNamespace, adaptive: SparseAttackResult) -> None:
    assert adaptive.success.float().mean() >= 0.8
    pred = _predict(task, adaptive.adversarial(task.x))
    assert torch.equal(adaptive.success, pred != task.y)


def test_metrics_match_the_mask_and_delta(adaptive: SparseAttackResult) -> None:
    applied = adaptive.perturbation()
    torch.testing.assert_close(adaptive.l0_elements, (applied != 0).flatten(1).sum(1))
    assert (adaptive.l0_pixels <= adaptive.mask.flatten(1).sum(1)).all()
    assert (adaptive.l0_elements <= 3 * adaptive.l0_pixels).all()
    assert (adaptive.l0_elements >= adaptive.l0_pixels).all()
    torch.testing.assert_close(adaptive.l2, applied.flatten(1).norm(dim=1))


def test_far_sparser_than_dense_pgd(task: SimpleNamespace, adaptive: SparseAttackResult) -> None:
    x_dense = pgd(task.model, task.x, task.y, eps=float(EPS), steps=10, step_size=float(EPS) / 4,
                  generator=torch.Generator().manual_seed(0))
    dense_l0 = (x_dense != task.x).flatten(1).sum(1).float().mean()
    sparse_l0 = adaptive.l0_elements[adaptive.success].float().mean()
    assert sparse_l0 < 0.25 * dense_l0, f"sparse l0 {sparse_l0:.0f} vs dense {dense_l0:.0f}"


def test_same_seed_gives_same_masks_and_other_seeds_differ(task: SimpleNamespace) -> None:
    a = _attack(task, seed=3, steps=15)
    b = _attack(task, seed=3, steps=15)
    c = _attack(task, seed=4, steps=15)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.delta, b.delta)
    assert not torch.equal(a.mask, c.mask)


def test_attack_leaves_model_and_global_rng_untouched(task: SimpleNamespace) -> None:
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    rng = torch.get_rng_state()
    _attack(task, steps=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not task.model.training
    assert all(p.grad is None for p in task.model.parameters())
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_adaptive_lambda_beats_the_papers_rule_when_lambda_is_large(task: SimpleNamespace,
                                                                     adaptive: SparseAttackResult) -> None:
    paper = _attack(task, lambda_rule="paper", C=10.0)
    adaptive_c10 = _attack(task, lambda_rule="adaptive", C=10.0)
    # The paper's lambda ignores success: with C = 10 it gives up many images for sparsity.
    assert adaptive_c10.success.float().mean() > paper.success.float().mean() + 0.2
    pred = _predict(task, paper.adversarial(task.x))
    assert torch.equal(paper.success, pred != task.y)


def test_adaptive_multiplier_rises_after_success_and_falls_after_failure(task: SimpleNamespace) -> None:
    seen = []
    cfg = SparseAttackConfig(eps=EPS, steps=15, lambda_rule="adaptive", lambda_up=1.5, lambda_down=0.25)
    sparse_attack(task.model, task.x, task.y, cfg, generator=torch.Generator().manual_seed(0),
                  on_step=lambda info: seen.append((info.soft_success, info.lambda_multiplier)))
    previous = torch.ones(len(task.y))
    for success, multiplier in seen:
        # the factor is kept in [1e-4, 1e4] (documented bound)
        torch.testing.assert_close(multiplier, (previous * torch.where(success, 1.5, 0.25)).clamp(1e-4, 1e4))
        previous = multiplier
    assert any(s.any() for s, _ in seen) and any((~s).any() for s, _ in seen)


@pytest.mark.parametrize("straight_through", [False, True])
def test_each_step_attacks_with_delta_times_the_soft_or_binary_mask(task: SimpleNamespace,
                                                                   straight_through: bool) -> None:
    seen = []

    def record(info) -> None:
        mask = (info.soft_mask > 0.5).float() if straight_through else info.soft_mask
        pred = _predict(task, task.x + info.delta * mask.unsqueeze(1))
        seen.append(torch.equal(info.soft_success, pred != task.y))
        assert info.delta.abs().max() <= float(EPS) + 1e-6

    cfg = SparseAttackConfig(eps=EPS, steps=12, straight_through=straight_through, lambda_rule="adaptive")
    res = sparse_attack(task.model, task.x, task.y, cfg, generator=torch.Generator().manual_seed(0), on_step=record)
    assert len(seen) == 12 and all(seen)
    assert res.config["straight_through"] is straight_through


def test_straight_through_attack_is_sparse_and_successful(task: SimpleNamespace) -> None:
    res = _attack(task, lambda_rule="adaptive", straight_through=True)
    assert res.success.float().mean() >= 0.8
    assert torch.equal(res.success, _predict(task, res.adversarial(task.x)) != task.y)
    assert res.l0_elements[res.success].float().mean() < 0.25 * 3 * S * S


def test_keep_best_only_changes_the_readout_never_for_the_worse(task: SimpleNamespace) -> None:
    best = _attack(task, steps=30, lambda_rule="adaptive")
    last = _attack(task, steps=30, lambda_rule="adaptive", keep_best=False)
    # Same seed, same trajectory: keep_best only picks which iterate to return.
    torch.testing.assert_close(best.soft_mask, last.soft_mask)
    assert (best.success | ~last.success).all()
    ok = last.success
    assert (best.l0_pixels[ok] <= last.l0_pixels[ok]).all()
    assert best.success.float().mean() > last.success.float().mean()


@pytest.mark.parametrize("target", ["random", "least-likely"])
def test_targeted_variant_reaches_its_targets(task: SimpleNamespace, target: str) -> None:
    res = _attack(task, targeted=True, target=target, lambda_rule="adaptive")
    assert res.targets is not None and (res.targets != task.y).all()
    if target == "least-likely":
        assert torch.equal(res.targets, task.model(task.x).argmin(1))
    assert res.success.float().mean() >= 0.75
    pred = _predict(task, res.adversarial(task.x))
    assert torch.equal(res.success, pred == res.targets)


def test_early_stopped_init_gives_a_less_confident_l_init(task: SimpleNamespace) -> None:
    """init_attack="pgd-early": L_init is the CE where the dense attack first succeeds, not after all its steps."""
    full = _attack(task, steps=3, targeted=True, init_attack="pgd")
    early = _attack(task, steps=3, targeted=True, init_attack="pgd-early")
    assert torch.equal(full.targets, early.targets) and full.init_success.all() and early.init_success.all()
    # Targeted CE falls while PGD goes on, so stopping at success leaves a larger L_init on most images.
    assert (early.l_init > full.l_init).float().mean() > 0.8 and early.l_init.mean() > 2 * full.l_init.mean()


class _SumModel(torch.nn.Module):
    """Two classes; class 1 wins once the pixel sum exceeds the image's threshold ``c`` (a plain ramp for PGD)."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x - 0.5).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), s - self.c[: len(s)]], 1)


def test_dense_init_continues_to_success_up_to_its_cap() -> None:
    """Targeted PGD of 0.002 per pixel and step: 10 steps raise the sum by <= 3.8, so a threshold of 12 needs ~30."""
    n = 8
    x = torch.full((n, 3, 8, 8), 0.5)
    c = torch.tensor([12.0] * 6 + [-100.0, 30.0])  # 6 need ~30 steps, one starts adversarial, one is out of reach
    model, target = _SumModel(c), torch.ones(n, dtype=torch.long)
    cfg = SparseAttackConfig(eps=0.1, init_step_size=0.002, targeted=True).resolve((3, 8, 8))

    def run(**fields) -> torch.Tensor:
        config = dataclasses.replace(cfg, **fields)
        return dense_init(model, x, target, config, torch.Generator().manual_seed(0))

    def reached(x_adv: torch.Tensor) -> torch.Tensor:
        return model(x_adv).argmax(1) == target

    only_ten = run(init_extra_steps=0)
    assert reached(only_ten).tolist() == [False] * 6 + [True, False]  # the old behaviour: L_init from failures
    full = run()  # the default cap, 10 + 90 steps
    assert reached(full).tolist() == [True] * 7 + [False]
    assert ((full - x).abs() <= 0.1 + 1e-6).all()
    torch.testing.assert_close(full[6], only_ten[6])  # a success is never moved
    # each continued image stops at its first success: one step less would still fail
    sums = (full[:6] - 0.5).flatten(1).sum(1)
    assert (sums > 12).all() and (sums - 3 * 64 * 0.002 <= 12).all()
    assert reached(run(init_extra_steps=5)).tolist() == [False] * 6 + [True, False]  # a cap of 15 is too short
    res = sparse_attack(model, x, torch.zeros(n, dtype=torch.long), dataclasses.replace(cfg, steps=1),
                        generator=torch.Generator().manual_seed(0), targets=target)
    assert res.init_success.tolist() == [True] * 7 + [False]


def test_explicit_targets_are_used_and_require_targeted(task: SimpleNamespace) -> None:
    targets = (task.y + 1) % K
    res = sparse_attack(task.model, task.x[:4], task.y[:4], SparseAttackConfig(eps=EPS, steps=3, targeted=True),
                        generator=torch.Generator().manual_seed(0), targets=targets[:4])
    assert torch.equal(res.targets, targets[:4])
    with pytest.raises(AdvpipeError):
        sparse_attack(task.model, task.x[:4], task.y[:4], SparseAttackConfig(steps=3),
                      generator=torch.Generator(), targets=targets[:4])


def test_per_image_encoder_scope_attacks_successfully(task: SimpleNamespace) -> None:
    res = _attack(task, encoder_scope="image", lambda_rule="adaptive", x=task.x[:16], y=task.y[:16])
    assert res.config["encoder_scope"] == "image"
    assert res.success.float().mean() >= 0.75
    assert res.l0_elements[res.success].float().mean() < 0.25 * 3 * S * S


def test_bf16_optimisation_still_checks_success_in_fp32(task: SimpleNamespace) -> None:
    res = _attack(task, steps=30, lambda_rule="adaptive", autocast_dtype="bf16")
    assert torch.equal(res.success, _predict(task, res.adversarial(task.x)) != task.y)
    assert res.success.float().mean() >= 0.7


def test_unet_encoder_runs_on_64x64_images(task: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 64, 64, generator=gen)
    y = _predict(task, x)
    res = sparse_attack(task.model, x, y, SparseAttackConfig(eps=EPS, steps=2, init_steps=1),
                        generator=torch.Generator().manual_seed(0))
    assert res.config["encoder"] == "unet" and res.config["alpha_max"] == 5.0
    assert res.mask.shape == (2, 64, 64) and res.soft_mask.shape == (2, 64, 64)
    assert (res.linf <= float(EPS) + 1e-6).all()


def test_unet_pads_sizes_that_are_not_multiples_of_32() -> None:
    enc = build_encoder("unet", (3, 40, 40), 2, generator=torch.Generator().manual_seed(0),
                        device=torch.device("cpu"))
    assert enc(torch.rand(2, 3, 40, 40)).shape == (2, 1, 40, 40)


def test_unet_encoder_trains_at_batch_one_on_32x32(task: SimpleNamespace) -> None:
    """A 32x32 input reaches a 1x1 map in the deepest stage, so at batch 1 BatchNorm has one value per channel."""
    enc = build_encoder("unet", (3, 32, 32), 1, generator=torch.Generator().manual_seed(0),
                        device=torch.device("cpu")).train()
    d = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = enc(d)
    (grad,) = torch.autograd.grad(out.sum(), d)
    assert out.shape == (1, 1, 32, 32) and torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    res = sparse_attack(task.model, x, _predict(task, x), SparseAttackConfig(eps=EPS, steps=2, init_steps=1,
                                                                              encoder="unet"),
                        generator=torch.Generator().manual_seed(0))
    assert res.mask.shape == (1, 32, 32) and res.config["encoder"] == "unet"


def test_unet_batch_statistics_are_unchanged_from_two_images_on() -> None:
    import segmentation_models_pytorch as smp

    enc = build_encoder("unet", (3, 32, 32), 2, generator=torch.Generator().manual_seed(0),
                        device=torch.device("cpu")).train()
    plain = smp.Unet("mobilenet_v2", encoder_weights=None, in_channels=3, classes=1).train()
    plain.load_state_dict(enc.net.state_dict())
    d = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(enc(d), plain(d))  # every BN, the 1x1 ones included, on batch statistics


def test_single_value_batchnorm_uses_its_running_statistics() -> None:
    bn = single_value_safe(torch.nn.BatchNorm2d(4)).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        bn.bias.fill_(0.5)
    x = torch.randn(1, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    expect = bn.weight.view(1, 4, 1, 1) * x / (1 + bn.eps) ** 0.5 + 0.5
    torch.testing.assert_close(bn(x), expect)
    assert bn.training and torch.equal(bn.running_mean, torch.zeros(4))  # nothing learnt from one value
    two = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bn(two).mean(0).flatten(), torch.full((4,), 0.5))  # batch statistics again
    assert not torch.equal(bn.running_mean, torch.zeros(4))


def test_empty_batch_and_malformed_inputs(task: SimpleNamespace) -> None:
    res = sparse_attack(task.model, task.x[:0], task.y[:0], SparseAttackConfig(steps=2),
                        generator=torch.Generator())
    assert res.mask.shape == (0, S, S) and res.success.shape == (0,)
    with pytest.raises(ValueError):
        sparse_attack(task.model, task.x, task.y[:3], SparseAttackConfig(steps=2), generator=torch.Generator())
    with pytest.raises(TypeError):
        sparse_attack(task.model, task.x, task.y, SparseAttackConfig(steps=2), generator=None)  # type: ignore[arg-type]
