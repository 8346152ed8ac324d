"""Tests for the model zoo (advpipe.models.*) and its registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advpipe.errors import AdvpipeError
from advpipe.models.registry import (
    MODELS,
    create_model,
    feature_layer_name,
    list_models,
    register_model,
)
from advpipe.models.resnet import ZeroPadShortcut
from advpipe.models.shake_shake import ShakeShakeNet, shake

# test modules may register small "test-*" models of their own; the zoo is everything else
REGISTERED = [name for name in list_models() if not name.startswith("test-")]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: on the shared 2-core box, thread contention made forwards ~6x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# Published parameter counts (10 classes): He et al. 2016 Table 6 (CIFAR ResNets), the usual
# CIFAR ports of ResNet-18/34/50 and VGG-19-BN, Zagoruyko & Komodakis 2016 Table 3 (WRN-28-10),
# Gastaldi 2017 Table 1 (26 2x32d).
KNOWN_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet18": 11.2e6,
    "resnet34": 21.3e6,
    "resnet50": 23.5e6,
    "vgg19": 20.0e6,
    "wrn-28-10": 36.5e6,
    "shake-shake-26-2x32d": 2.9e6,
}


def _meta_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a model on the meta device: shapes and counts without allocating or initialising."""
    with torch.device("meta"):
        return create_model(name, num_classes)


def _convs(model: nn.Module, kernel: int) -> int:
    return sum(
        1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (kernel, kernel)
    )


def test_expected_names_registered() -> None:
    expected = {f"vgg{d}" for d in (11, 13, 16, 19)}
    expected |= {f"resnet{d}" for d in (18, 34, 50, 20, 32, 44, 56, 110)}
    expected |= {"wrn-28-10", "shake-shake-26-2x32d"}
    assert set(REGISTERED) == expected
    assert REGISTERED == sorted(REGISTERED)
    assert set(list_models(include_torchvision=True)) >= expected | {"mobilenet_v3_small"}


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", REGISTERED)
def test_builds_and_returns_logits(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes).eval()
    x = torch.randn(2, 3, 32, 32)
    x_before = x.clone()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, num_classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits[0], logits[1])  # the two inputs differ, so must their logits
    assert torch.equal(x, x_before)  # no in-place change of the caller's input


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_parameter_count_matches_literature(name: str) -> None:
    count = sum(p.numel() for p in _meta_model(name).parameters())
    assert abs(count - KNOWN_PARAMS[name]) / KNOWN_PARAMS[name] < 0.05, count


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_he_resnet_depth_and_option_a_shortcuts(depth: int) -> None:
    model = _meta_model(f"resnet{depth}")
    # option A: every weighted layer lies on the main path, so they number exactly the depth
    weighted = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert weighted == depth
    assert _convs(model, 1) == 0
    assert [m.out_channels for m in model.layer3.modules() if isinstance(m, nn.Conv2d)][-1] == 64


def test_zero_pad_shortcut_subsamples_and_pads() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g)
    y = ZeroPadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_wrn_and_shake_shake_structure() -> None:
    wrn = _meta_model("wrn-28-10")
    assert (_convs(wrn, 3), _convs(wrn, 1)) == (25, 3)  # stem + 12 blocks x 2; 3 projections
    assert wrn.fc.in_features == 640
    assert not any(isinstance(m, nn.Dropout) for m in wrn.modules())  # dropout 0 by default
    ss = _meta_model("shake-shake-26-2x32d")
    # 26 = stem + 12 blocks x 2 convs + fc; two branches double the block convs
    assert _convs(ss, 3) == 1 + 2 * 2 * 12
    assert ss.layer1[0].branch1[1].out_channels == 32 and ss.fc.in_features == 128


def test_weight_init() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    w = model.layer4[1].conv2.weight  # 512x512x3x3: enough samples for a tight std estimate
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    assert abs(w.mean().item()) < 1e-3


@pytest.mark.parametrize("name", REGISTERED)
def test_feature_layer_feeds_the_head(name: str) -> None:
    model = _meta_model(name).eval()
    layer = getattr(model, feature_layer_name(name))
    assert isinstance(layer, nn.Module)
    seen: list[torch.Tensor] = []
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.device("meta"):
        model(torch.empty(2, 3, 32, 32))
    assert len(seen) == 1
    head = model.classifier if name.startswith("vgg") else model.fc
    assert seen[0].shape[:2] == (2, head.in_features)


def test_feature_layer_name_known_values_and_unknown() -> None:
    assert feature_layer_name("resnet18") == "layer4"
    assert feature_layer_name("resnet56") == "layer3"
    assert feature_layer_name("wrn-28-10") == "block3"
    assert feature_layer_name("vgg16") == "features"
    assert feature_layer_name("wide_resnet50_2") == "layer4"  # torchvision ResNet family
    with pytest.raises(AdvpipeError, match="resnet20"):
        feature_layer_name("mobilenet_v3_small")


def test_torchvision_fallback() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", 7, image_size=64).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    # registered CIFAR models shadow torchvision's of the same name: 3x3 stem, not 7x7
    assert create_model("resnet18", 10).conv1.kernel_size == (3, 3)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(AdvpipeError) as info:
        create_model("resnet19", 10)
    message = str(info.value)
    assert "resnet19" in message and "torchvision" in message
    assert all(name in message for name in REGISTERED)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        register_model("resnet18", feature_layer="nope")(lambda n, s: nn.Linear(1, n))
    assert feature_layer_name("resnet18") == "layer4"
    assert MODELS.get("resnet18")(10, 32).conv1.kernel_size == (3, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "resnet20", "num_classes": 0},
        {"name": "resnet20", "num_classes": 10, "image_size": 0},
        {"name": "vgg11", "num_classes": 10, "image_size": 16},
    ],
)
def test_invalid_sizes_raise(kwargs: dict) -> None:
    with pytest.raises(AdvpipeError):
        create_model(**kwargs)


def test_vgg_larger_images() -> None:
    torch.manual_seed(0)
    model = create_model("vgg11", 200, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)


def test_shake_mixes_forward_with_alpha_and_backward_with_beta() -> None:
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    x2 = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    alpha = torch.rand(3, 1, 1, 1, generator=g)
    beta = torch.rand(3, 1, 1, 1, generator=g)
    out = shake(x1, x2, alpha, beta)
    torch.testing.assert_close(out, alpha * x1 + (1 - alpha) * x2)
    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream)
    torch.testing.assert_close(x1.grad, beta * upstream)
    torch.testing.assert_close(x2.grad, (1 - beta) * upstream)


def test_shake_shake_randomness() -> None:
    torch.manual_seed(0)
    model = ShakeShakeNet(depth=8, width=4, num_classes=5)
    x = torch.randn(1, 3, 16, 16).expand(4, 3, 16, 16)  # four identical images

    def run(seed: int) -> torch.Tensor:
        model.set_generator(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return model(x)

    model.eval()
    evaluated = run(0)
    torch.testing.assert_close(evaluated, run(1))  # eval: fixed 0.5 mixing
    torch.testing.assert_close(evaluated, evaluated[:1].expand(4, 5))
    model.train()
    trained = run(3)
    torch.testing.assert_close(trained, run(3))  # reproducible from the generator
    assert not torch.allclose(trained, run(4))
    # per-image coefficients: identical images differ (BN uses batch stats, same for all four)
    assert not torch.allclose(trained[0], trained[1])
    model.set_generator(torch.Generator().manual_seed(5))
    model(torch.randn(4, 3, 16, 16)).logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_timm_and_torchvision_prefixes() -> None:
    torch.manual_seed(0)
    model = create_model("timm:resnet10t", 7, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    # torchvision:NAME reaches the torchvision model that a registered CIFAR name shadows: 7x7 stem
    assert create_model("torchvision:resnet18", 10).conv1.kernel_size == (7, 7)
    with pytest.raises(AdvpipeError, match="unknown timm model 'resnet19x'"):
        create_model("timm:resnet19x", 10)
    with pytest.raises(AdvpipeError, match="names no timm model"):
        create_model("timm:", 10)
    with pytest.raises(AdvpipeError, match="unknown torchvision model"):
        create_model("torchvision:resnet20", 10)
