"""A-FAN: adversarial feature augmentation and normalization (a-fan.txt, Chen et al., TMLR).

The network is split at one layer (default: the last residual stage, a-fan.txt Sec. 4 "the last
block"; see :func:`advpipe.models.registry.feature_layer_name`) into a backbone ``f(x; θ_b)`` and
a head ``θ_t``. Per batch:

1. one clean forward through the whole model gives ``L_clean`` and the features ``f_clean``
   (captured by a forward hook on the layer, so the backbone runs once);
2. ``k`` strengths ``ε^(1..k) ~ U[0, E]`` are drawn (Alg. 1 line 3) and sorted so that ``ε^(1)``
   is the largest; PGD-``steps`` on the features (Eqs. 2-3, sign steps of ``step_size``,
   projection onto the l_inf ball of radius ``ε^(1)``) gives ``δ_1``, running only the head;
3. the other strengths come from the interpolation the paper uses instead of more PGD runs
   (Sec. 1 "computes adversarial features with other perturbation strengths ... via
   interpolation", Alg. 1 lines 6-8): ``δ_i = (ε^(i) / ε^(1)) δ_1``, i.e. points on the segment
   from ``f_clean`` to ``f_adv^(1)``, each inside its own ball ``||δ_i||_inf <= ε^(i)``;
4. adversarial feature normalization, Eq. (5), with per-channel batch moments (BN's routine,
   biased variance, ``σ = sqrt(var + 1e-5)``):
   ``f_mix^(i) = σ_adv^(i) (f_clean - μ_clean) / σ_clean + μ_adv^(i)``;
5. Eq. (6): ``loss = L_clean + λ Σ_i CE(head(f_mix^(i)), y)`` with ``λ = 1``.

Defaults are the paper's CIFAR classification setting (Sec. 4): PGD-5, three strengths drawn
from ``[0, α]`` with ``α = 0.5/255`` (ResNet-20s/56s; the ResNet-18 ablation of Fig. 4 preferred
``1.0/255``). The paper names ``α`` both the step size and the end of the strength range, so the
step size defaults to ``eps_max``; since it is at least every radius, PGD here moves each feature
to a corner of its ball and later steps can only flip signs. PGD starts from ``δ = 0`` (Eq. 2 and
the public code's default, ``randinit`` off).

Choices where the paper is silent, and why:

* strengths are drawn once per batch (the paper draws "k strengths", not k per sample), and the
  k mixed batches run through the head separately so a head with BN normalizes each on its own;
* ``δ`` is a constant for the update (as in adversarial training); gradients of the adversarial
  losses flow into the backbone through ``f_clean`` and the moments, since Eq. (3) minimises over
  all of θ;
* BN running statistics are restored after the PGD steps and the adversarial head passes
  (:func:`advpipe.models.dual_bn.preserve_bn_stats`): forwards still use batch statistics as in
  training, but only the clean forward updates the averages evaluation uses. The default heads
  (pool + linear) have no BN, so this only matters for heads such as WRN's final BN;
* ``normalize=false`` trains on ``f_adv^(i)`` directly: the "+AFA" ablation of Tab. 9.

The method context does not name the architecture, so without ``layer=`` the split point is the
last top-level child of the network whose name is one of the registry's feature layers
(``layer4`` > ``block3`` > ``layer3`` ... by position), which equals ``feature_layer_name`` for
every registered model.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from advpipe.attacks.losses import cross_entropy_loss
from advpipe.attacks.primitives import linf_bounds, sign_ascent, uniform_noise
from advpipe.data.batch import Batch
from advpipe.errors import AdvpipeError
from advpipe.models.dual_bn import preserve_bn_stats
from advpipe.models.normalize import unwrap
from advpipe.models.registry import feature_layer_name, list_models
from advpipe.train.methods import METHODS, Method, MethodContext
from advpipe.train.soft_labels import checked_options, flag_option, fraction_option, positive_int

BN_EPS = 1e-5


def channel_moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and ``sqrt(biased var + 1e-5)`` of (B,C,...) features, broadcastable."""
    dims = [0, *range(2, f.dim())]
    mean = f.mean(dim=dims, keepdim=True)
    var = f.var(dim=dims, unbiased=False, keepdim=True)
    return mean, (var + BN_EPS).sqrt()


def inject_moments(f_clean: torch.Tensor, f_adv: torch.Tensor) -> torch.Tensor:
    """Eq. (5): re-normalize ``f_clean`` to the per-channel batch moments of ``f_adv``."""
    mu_c, sd_c = channel_moments(f_clean)
    mu_a, sd_a = channel_moments(f_adv)
    return sd_a * (f_clean - mu_c) / sd_c + mu_a


def mixed_features(f_clean: torch.Tensor, delta: torch.Tensor, scales: torch.Tensor) -> list[torch.Tensor]:
    """Eq. (5) for every ``f_adv^(i) = f_clean + scales[i] * delta`` without re-reducing the tensor.

    The per-channel moments of ``f_clean + s δ`` follow from those of ``f_clean`` and ``δ`` and their
    covariance: ``μ = μ_f + s μ_δ``, ``var = var_f + 2 s cov(f, δ) + s² var_δ``. One reduction pass
    serves all k strengths; the result equals :func:`inject_moments` (tested).
    """
    dims = [0, *range(2, f_clean.dim())]
    var_f, mu_f = torch.var_mean(f_clean, dim=dims, unbiased=False, keepdim=True)
    centered = f_clean - mu_f
    z = centered / (var_f + BN_EPS).sqrt()
    mu_d = delta.mean(dim=dims, keepdim=True)
    d_centered = delta - mu_d
    var_d = d_centered.square().mean(dim=dims, keepdim=True)
    cov = (centered * d_centered).mean(dim=dims, keepdim=True)
    out = []
    for s in scales:
        var_a = (var_f + 2 * s * cov + s * s * var_d).clamp_min(0)
        out.append(torch.addcmul(mu_f + s * mu_d, z, (var_a + BN_EPS).sqrt()))
    return out


def strength_scales(strengths: torch.Tensor) -> torch.Tensor:
    """``ε^(i) / ε^(1)`` for strengths sorted largest first (all 0 if ε^(1) is 0): ``δ_i = scale_i δ_1``."""
    top = strengths[0]
    return torch.where(top > 0, strengths / top.clamp_min(torch.finfo(strengths.dtype).tiny),
                       torch.zeros_like(strengths))


def feature_pgd(head: nn.Module, f: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor, steps: int,
                step_size: float, random_start: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. (2) on features: return the l_inf PGD perturbation δ (detached) maximising CE(head(f + δ), y).

    The shared sign-gradient loop of the attacks (:func:`advpipe.attacks.primitives.sign_ascent`)
    run on ``δ``, with the ball around 0 and no [0,1] box (features are not images).
    """
    f = f.detach()
    bounds = linf_bounds(None, eps, low=None, high=None)
    delta = uniform_noise(f, eps, generator) if random_start else torch.zeros_like(f)
    delta = sign_ascent(lambda d: head(f + d), delta, y, bounds=bounds, steps=steps, step_size=step_size,
                        loss_fn=cross_entropy_loss)
    return delta.detach()


class _SplitTracer(fx.Tracer):
    """Traces only the modules on the path to ``target``; everything else stays a leaf call."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not self.target.startswith(qualname + ".")


def split_head(net: nn.Module, layer: str) -> fx.GraphModule:
    """The part of ``net`` after ``layer`` as a module mapping that layer's output to logits.

    The head shares its submodules (and so its parameters and buffers) with ``net``. Raises
    AdvpipeError if ``layer`` is not called exactly once or later computation also reads values
    from before it (e.g. a skip connection across the split).
    """
    try:
        net.get_submodule(layer)
    except AttributeError as exc:
        raise AdvpipeError(f"A-FAN layer {layer!r} is not a submodule of {type(net).__name__}") from exc
    try:
        graph = _SplitTracer(layer).trace(net)
    except Exception as exc:  # tracing failures come as many types; all mean "cannot split here"
        raise AdvpipeError(f"A-FAN cannot trace {type(net).__name__} to split it at {layer!r}: {exc}") from exc
    nodes = list(graph.nodes)
    calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise AdvpipeError(f"A-FAN layer {layer!r} is called {len(calls)} times in {type(net).__name__}.forward; "
                           "it must be called exactly once")
    split = nodes[calls[0]]
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {split: head.placeholder("features")}
    for node in nodes[calls[0] + 1:]:
        for inp in node.all_input_nodes:
            if inp in env:
                continue
            if inp.op != "get_attr":
                raise AdvpipeError(f"A-FAN cannot split {type(net).__name__} at {layer!r}: the rest of the "
                                   f"network also reads {inp.name!r}, computed before that layer")
            env[inp] = head.node_copy(inp, lambda a: env[a])
        env[node] = head.node_copy(node, lambda a: env[a])
    return fx.GraphModule(net, head, class_name=f"{type(net).__name__}Head")


def default_feature_layer(net: nn.Module) -> str:
    """The last top-level child of ``net`` named like a registered model's feature layer."""
    known = {"layer4"}
    for name in list_models():
        try:
            known.add(feature_layer_name(name))
        except AdvpipeError:  # models without a known feature layer (e.g. plain CNNs) add nothing
            pass
    names = [name for name, _ in net.named_children() if name in known]
    if not names:
        raise AdvpipeError(f"A-FAN does not know where to split {type(net).__name__}; "
                           "pass method_options layer=<submodule name>", fields=("method_options",))
    return names[-1]


class AFAN(Method):
    """A-FAN (a-fan.txt Alg. 1, Eqs. 2-6): clean CE + λ Σ_i CE on moment-injected adversarial features."""

    def __init__(self, *, layer: str | None, steps: int, eps_max: float, step_size: float, num_strengths: int,
                 adv_weight: float, normalize: bool, random_start: bool) -> None:
        """Build A-FAN; ``layer=None`` picks the last residual stage when the model is prepared."""
        self.layer, self.steps, self.eps_max, self.step_size = layer, steps, eps_max, step_size
        self.num_strengths, self.adv_weight = num_strengths, adv_weight
        self.normalize, self.random_start = normalize, random_start
        self._owner: Any = None
        self._split: tuple[str, fx.GraphModule] | None = None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Check now (not mid-epoch) that the model can be split at the chosen layer."""
        self.split(unwrap(model))
        return model

    def split(self, net: nn.Module) -> tuple[str, fx.GraphModule]:
        """The split layer's name and the head after it for ``net`` (built once per network)."""
        if self._split is None or self._owner() is not net:
            layer = self.layer or default_feature_layer(net)
            self._split = (layer, split_head(net, layer))
            self._owner = weakref.ref(net)
        return self._split

    def step(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Return ``L_clean + λ Σ_i L_adv^(i)`` (Eq. 6) and the clean logits."""
        x, y = batch.images, batch.labels
        layer, head = self.split(unwrap(model))
        captured: list[torch.Tensor] = []
        handle = unwrap(model).get_submodule(layer).register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            logits = model(x)
        finally:
            handle.remove()
        if len(captured) != 1 or not isinstance(captured[0], torch.Tensor):
            raise AdvpipeError(f"A-FAN layer {layer!r} must run once per forward and return one tensor")
        loss_clean = F.cross_entropy(logits.float(), y)
        # float32: perturbations of ~1/255 vanish in bf16 features (8 mantissa bits)
        f_clean = captured[0].float()
        strengths = torch.rand(self.num_strengths, generator=generator, device=x.device).mul_(self.eps_max)
        strengths = strengths.sort(descending=True).values
        with preserve_bn_stats(head):
            delta = feature_pgd(head, f_clean, y, eps=strengths[0], steps=self.steps, step_size=self.step_size,
                                random_start=self.random_start, generator=generator)
            scales = strength_scales(strengths)
            if self.normalize:
                feats = mixed_features(f_clean, delta, scales)
            else:
                feats = [f_clean + delta * s for s in scales]
            loss_adv = sum(F.cross_entropy(head(f).float(), y) for f in feats)
        return {"loss": loss_clean + self.adv_weight * loss_adv, "loss_clean": loss_clean.detach(),
                "loss_adv": loss_adv.detach(), "strength_max": strengths[0].detach(), "logits": logits}

    def passes(self) -> dict[str, float]:
        """Predicted passes per step: one full forward/backward plus head-only passes for PGD and the k losses."""
        return {"forward": 1, "backward": 1, "head_forward": self.steps + self.num_strengths,
                "head_input_backward": self.steps, "head_backward": self.num_strengths}


@checked_options
def _afan(ctx: MethodContext, *, layer: Any = None, steps: Any = 5, eps_max: Any = "0.5/255", step_size: Any = None,
          num_strengths: Any = 3, adv_weight: Any = 1.0, normalize: Any = True, random_start: Any = False) -> AFAN:
    if layer is not None and (not isinstance(layer, str) or not layer):
        raise AdvpipeError(f"method option layer must be a submodule name such as layer3, got {layer!r}")
    if isinstance(adv_weight, bool) or not isinstance(adv_weight, (int, float)) or adv_weight < 0:
        raise AdvpipeError(f"method option adv_weight must be a number >= 0, got {adv_weight!r}")
    eps = fraction_option(eps_max, "eps_max", high=100.0)
    return AFAN(layer=layer, steps=positive_int(steps, "steps"), eps_max=eps,
                step_size=eps if step_size is None else fraction_option(step_size, "step_size", high=100.0),
                num_strengths=positive_int(num_strengths, "num_strengths"), adv_weight=float(adv_weight),
                normalize=flag_option(normalize, "normalize"), random_start=flag_option(random_start, "random_start"))


METHODS.register("afan", _afan)
