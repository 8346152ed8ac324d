"""The AdvMask sparse adversarial attack (advmask.txt Sec. III-A, IV-B, V-A): one batched reference.

Per image, a perturbation ``delta`` (B,C,H,W) in the l_inf ball of radius ``eps`` and an encoder
``H`` (:mod:`advpipe.attacks.encoders`) are optimised jointly. The encoder turns ``delta`` into a
soft per-pixel mask (Eq. 3) ``m = sigmoid(alpha * H(delta))`` of shape (B,1,H,W), ``alpha``
annealed from ``alpha_min`` to ``alpha_max`` (Sec. IV-B), and the attacked image is
``clamp(x + delta * m, 0, 1)``. The loss (Eq. 4, 5), per image::

    L_classify = -CE(f(x + delta*m), y) / L_init + 1           (targeted: CE(., t) / L_init - 1)
    L          = max(L_classify, eta * L_classify) + lambda * ||m||_1 / N
    lambda     = C + gamma * mean(m > 0.5)                      (lambda_rule="paper")

``L_init`` is the cross-entropy of a successful dense attack (PGD or MI-FGSM from
:mod:`advpipe.attacks.dense`), by default at the iterate where PGD first succeeds
(``init_attack="pgd-early"``); images it has not brought to success after ``init_steps`` continue
up to ``init_extra_steps`` more steps (:mod:`advpipe.attacks.init_attack`). ``delta`` follows
MI-FGSM on ``L`` with an L1-normalised gradient and is clipped to the eps ball (Eq. 6); the
encoder follows Adam. The attack mask is ``m > 0.5``.

Beyond the paper (options, documented with measurements in docs/attack.md):

* ``lambda_rule="adaptive"`` multiplies each image's lambda by ``lambda_up`` after a step on which
  the attack succeeded and by ``lambda_down`` after a failure, so lambda reacts to success.
* ``keep_best=True`` returns, per image, the sparsest binary mask (with its delta) seen during the
  run that succeeds in float32, like C&W-style attacks; otherwise the last iterate.
* ``straight_through=True`` forwards the binary mask and backpropagates through the soft one.
* ``alpha_schedule`` picks the curve of the annealing (the paper only says "gradually increase").

For precomputing masks, ``SparseAttackConfig(lambda_rule="adaptive", alpha_schedule="linear")`` is
recommended: 100% ASR with about half the l0 of the paper's rules on our ResNet-20 (docs/attack.md).

``delta`` is also kept inside ``[-x, 1-x]`` (the image box), so ``x + delta * m`` never needs the
clamp and the reported norms are those of the perturbation actually applied.

Example::

    cfg = SparseAttackConfig(eps=Fraction(8, 255))
    g = torch.Generator().manual_seed(0)
    res = sparse_attack(model.eval(), images, labels, cfg, generator=g)
    res.mask            # (B,H,W) bool attack masks (the points of interest)
    res.success.float().mean(), res.l0_pixels[res.success].float().mean()
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.attacks.dense import least_likely_targets, random_targets
from advpipe.attacks.encoders import DEFAULT_UNET_BACKBONE, ENCODERS, build_encoder
from advpipe.attacks.init_attack import INIT_ATTACKS, dense_init
from advpipe.attacks.norms import perturbation_norms
from advpipe.errors import AdvpipeError
from advpipe.progress import task
from advpipe.registry import Registry

log = logging.getLogger(__name__)

#: images with at most this many pixels count as "small": linear encoder and alpha_max = 100
SMALL_IMAGE_PIXELS = 32 * 32

# --------------------------------------------------------------------------------------------
# Families: alpha schedules, lambda rules, initial dense attacks, target pickers
# --------------------------------------------------------------------------------------------

AlphaSchedule = Callable[[int, int, float, float], float]
ALPHA_SCHEDULES: Registry[AlphaSchedule] = Registry("alpha schedule")


def _frac(step: int, steps: int) -> float:
    """Fraction of the run done at ``step`` (0 at the first step, 1 at the last)."""
    return step / (steps - 1) if steps > 1 else 1.0


def geometric_alpha(step: int, steps: int, alpha_min: float, alpha_max: float) -> float:
    """alpha_min * (alpha_max/alpha_min)^(t/(T-1)): equal ratios per step (one decade per third at 0.1->100)."""
    return alpha_min * (alpha_max / alpha_min) ** _frac(step, steps)


def linear_alpha(step: int, steps: int, alpha_min: float, alpha_max: float) -> float:
    """alpha_min + (alpha_max - alpha_min) * t/(T-1): equal increments per step."""
    return alpha_min + (alpha_max - alpha_min) * _frac(step, steps)


def cosine_alpha(step: int, steps: int, alpha_min: float, alpha_max: float) -> float:
    """Geometric in log-alpha along a half cosine: slow at both ends, so the soft phase lasts longer."""
    w = 0.5 - 0.5 * math.cos(math.pi * _frac(step, steps))
    return alpha_min * (alpha_max / alpha_min) ** w


ALPHA_SCHEDULES.register("geometric", geometric_alpha)
ALPHA_SCHEDULES.register("linear", linear_alpha)
ALPHA_SCHEDULES.register("cosine", cosine_alpha)


class LambdaRule(Protocol):
    """Per-image multiplier of the paper's lambda (Eq. 5), updated after every step."""

    multiplier: torch.Tensor | None

    def update(self, success: torch.Tensor) -> None: ...


class _PaperLambda:
    """Eq. (5) as written: lambda = C + gamma * mean(m > 0.5), no reaction to success."""

    multiplier = None

    def __init__(self, config: "SparseAttackConfig", batch: int, device: torch.device) -> None:
        pass

    def update(self, success: torch.Tensor) -> None:
        pass


class _AdaptiveLambda:
    """Eq. (5) times a per-image factor: x lambda_up after a successful step, x lambda_down after a failure.

    The factor starts at 1 and is kept in [1e-4, 1e4].
    """

    def __init__(self, config: "SparseAttackConfig", batch: int, device: torch.device) -> None:
        self.multiplier = torch.ones(batch, device=device)
        self.up, self.down = float(config.lambda_up), float(config.lambda_down)

    def update(self, success: torch.Tensor) -> None:
        factor = torch.where(success, self.up, self.down)
        # The bounds only stop a run of failures (or successes) from under/overflowing.
        self.multiplier.mul_(factor).clamp_(1e-4, 1e4)


LAMBDA_RULES: Registry[Callable[..., LambdaRule]] = Registry("lambda rule")
LAMBDA_RULES.register("paper", _PaperLambda)
LAMBDA_RULES.register("adaptive", _AdaptiveLambda)


def _random_target(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                   generator: torch.Generator) -> torch.Tensor:
    """A uniformly random class other than ``y`` per image."""
    return random_targets(y, num_classes, generator=generator)


def _least_likely_target(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                         generator: torch.Generator) -> torch.Tensor:
    """The clean image's least likely class per image."""
    return least_likely_targets(model, x)


#: how targets are picked for ``targeted=True`` when the caller passes none (Table III is targeted)
TARGETS: Registry[Callable[..., torch.Tensor]] = Registry("target picker")
TARGETS.register("random", _random_target)
TARGETS.register("least-likely", _least_likely_target)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

# --------------------------------------------------------------------------------------------
# Config and result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseAttackConfig:
    """Settings of :func:`sparse_attack`; defaults are justified in docs/attack.md.

    ``None`` means "derive from the image size or eps" (see :meth:`resolve`): ``beta`` and
    ``init_step_size`` default to ``eps / 4``, ``alpha_max`` to 100 for images of at most 32x32
    pixels and 5 above (advmask.txt Sec. IV-B), ``encoder="auto"`` to ``linear`` up to 32x32 and
    ``unet`` above (Sec. III-A a). Unknown keyword arguments raise TypeError.
    """

    eps: float | Fraction = Fraction(8, 255)
    steps: int = 200
    beta: float | Fraction | None = None
    mu: float = 1.0
    eta: float = 0.1
    C: float = 0.01
    gamma: float = 10.0
    adam_lr: float = 1e-3
    alpha_min: float = 0.1
    alpha_max: float | None = None
    alpha_schedule: str = "geometric"
    encoder: str = "auto"
    encoder_scope: str = "batch"
    unet_backbone: str = DEFAULT_UNET_BACKBONE
    targeted: bool = False
    target: str = "random"
    lambda_rule: str = "paper"
    lambda_up: float = 1.2
    lambda_down: float = 0.5
    keep_best: bool = True
    straight_through: bool = False
    init_attack: str = "pgd-early"
    init_steps: int = 10
    init_extra_steps: int = 90
    init_step_size: float | Fraction | None = None
    autocast_dtype: str | None = None

    def __post_init__(self) -> None:
        """Validate every field; user-fixable problems raise AdvpipeError."""
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdvpipeError(f"sparse attack {name} must be a positive integer, got {value!r}")

        def number(name: str, *, low: float = 0.0, strict: bool = False, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)) or not math.isfinite(value):
                raise AdvpipeError(f"sparse attack {name} must be a number, got {value!r}")
            if value < low or (strict and value == low):
                raise AdvpipeError(f"sparse attack {name} must be {'>' if strict else '>='} {low}, got {value}")

        positive_int("steps")
        positive_int("init_steps")
        if isinstance(self.init_extra_steps, bool) or not isinstance(self.init_extra_steps, int) \
                or self.init_extra_steps < 0:
            raise AdvpipeError(f"sparse attack init_extra_steps must be an integer >= 0, got {self.init_extra_steps!r}")
        number("eps", strict=True)
        if self.eps > 1:
            raise AdvpipeError(f"sparse attack eps is in [0,1] pixel units, got {self.eps}")
        number("beta", strict=True, optional=True)
        number("init_step_size", strict=True, optional=True)
        for name in ("mu", "eta", "C", "gamma"):
            number(name)
        number("adam_lr", strict=True)
        number("alpha_min", strict=True)
        number("alpha_max", strict=True, optional=True)
        if self.alpha_max is not None and self.alpha_max < self.alpha_min:
            raise AdvpipeError(f"alpha_max ({self.alpha_max}) must be >= alpha_min ({self.alpha_min})")
        number("lambda_up", strict=True)
        number("lambda_down", strict=True)
        ALPHA_SCHEDULES.get(self.alpha_schedule)
        LAMBDA_RULES.get(self.lambda_rule)
        INIT_ATTACKS.get(self.init_attack)
        TARGETS.get(self.target)
        if self.encoder != "auto":
            ENCODERS.get(self.encoder)
        if self.encoder_scope not in ("batch", "image"):
            raise AdvpipeError(f"unknown encoder_scope {self.encoder_scope!r}; choose one of: batch, image")
        if self.autocast_dtype is not None and self.autocast_dtype not in _AUTOCAST:
            raise AdvpipeError(f"unknown autocast_dtype {self.autocast_dtype!r}; choose one of: bf16, fp16 (or None)")
        for name in ("targeted", "keep_best", "straight_through"):
            if not isinstance(getattr(self, name), bool):
                raise AdvpipeError(f"sparse attack {name} must be true or false, got {getattr(self, name)!r}")

    def resolve(self, image_shape: tuple[int, int, int]) -> "SparseAttackConfig":
        """Return a copy with every size- or eps-derived default made concrete for (C,H,W) images."""
        small = image_shape[1] * image_shape[2] <= SMALL_IMAGE_PIXELS
        eps = self.eps
        return dataclasses.replace(
            self,
            beta=eps / 4 if self.beta is None else self.beta,
            init_step_size=eps / 4 if self.init_step_size is None else self.init_step_size,
            alpha_max=(100.0 if small else 5.0) if self.alpha_max is None else self.alpha_max,
            encoder=("linear" if small else "unet") if self.encoder == "auto" else self.encoder,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for provenance; Fractions are written as strings such as ``"8/255"``."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Fraction):
                out[key] = f"{value.numerator}/{value.denominator}"
        return out


@dataclass
class SparseAttackResult:
    """Per-image output of :func:`sparse_attack` (all tensors on the input's device).

    ``mask`` is the binary attack mask ``m > 0.5`` (B,H,W); ``delta`` (B,C,H,W) is the perturbation
    it selects from, so the attack is ``clamp(x + delta * mask, 0, 1)`` (see :meth:`adversarial`).
    ``soft_mask`` (B,H,W) is the final iterate's ``sigmoid(alpha_max * H(delta))``, for inspection.
    Norms are those of ``delta * mask``: ``l0_elements`` counts non-zero entries over C*H*W,
    ``l0_pixels`` counts pixels with any non-zero channel. ``success`` is checked in float32:
    misclassified (untargeted) or classified as ``targets`` (targeted). ``loss`` is Eq. (4) at the
    last optimisation step. ``best_step`` is the step whose mask was kept (``steps`` = the final
    iterate; with keep_best, failures report the final iterate too).
    """

    mask: torch.Tensor
    delta: torch.Tensor
    soft_mask: torch.Tensor
    success: torch.Tensor
    l0_elements: torch.Tensor
    l0_pixels: torch.Tensor
    l2: torch.Tensor
    linf: torch.Tensor
    loss: torch.Tensor
    l_init: torch.Tensor
    init_success: torch.Tensor
    clean_correct: torch.Tensor
    best_step: torch.Tensor
    targets: torch.Tensor | None
    config: dict[str, Any]

    def perturbation(self) -> torch.Tensor:
        """The applied perturbation ``delta * mask`` (B,C,H,W)."""
        return self.delta * self.mask.unsqueeze(1).to(self.delta.dtype)

    def adversarial(self, x: torch.Tensor) -> torch.Tensor:
        """The attacked images ``clamp(x + delta * mask, 0, 1)``."""
        return (x + self.perturbation().to(x.dtype)).clamp(0, 1)

    def summary(self) -> dict[str, float]:
        """ASR and mean norms over successful images (the convention of advmask.txt Table III)."""
        ok = self.success
        n = int(ok.sum())

        def mean(t: torch.Tensor) -> float:
            return float(t[ok].float().mean()) if n else float("nan")

        def median(t: torch.Tensor) -> float:
            return float(t[ok].float().median()) if n else float("nan")

        return {
            "n": int(ok.numel()),
            "asr": float(ok.float().mean()) if ok.numel() else float("nan"),
            "l0_elements": mean(self.l0_elements),
            "l0_elements_median": median(self.l0_elements),
            "l0_pixels": mean(self.l0_pixels),
            "l2": mean(self.l2),
            "linf": mean(self.linf),
            "init_asr": float(self.init_success.float().mean()) if ok.numel() else float("nan"),
        }


@dataclass
class StepInfo:
    """What ``on_step`` sees after optimisation step ``step``: the delta and soft mask (B,H,W) it used.

    ``soft_success`` is the success of that step's forward (soft mask, or binary mask with
    ``straight_through``), in the optimisation precision; ``lambda_multiplier`` is the adaptive
    rule's factor after its update (None for the paper's rule).
    """

    step: int
    alpha: float
    delta: torch.Tensor
    soft_mask: torch.Tensor
    soft_success: torch.Tensor
    loss: torch.Tensor
    lambda_multiplier: torch.Tensor | None


# --------------------------------------------------------------------------------------------
# The attack
# --------------------------------------------------------------------------------------------


def sparse_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: SparseAttackConfig,
    *,
    generator: torch.Generator,
    targets: torch.Tensor | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> SparseAttackResult:
    """Run the AdvMask sparse attack (advmask.txt Eq. 3-6) on a batch and return masks and metrics.

    ``model`` maps [0,1] images to logits and should be in eval mode (its mode is not changed;
    its parameters' gradients are not touched). ``x`` is (B,C,H,W) in [0,1], ``y`` (B,) the true
    labels. With ``config.targeted`` the targets are ``targets`` if given, else picked by
    ``config.target``. All randomness (targets, dense start, encoder init, initial delta) comes
    from ``generator``, which must live on ``x``'s device. ``on_step``, if given, is called after
    every optimisation step with a :class:`StepInfo` (for diagnostics such as mask-freeze curves).
    """
    if not isinstance(config, SparseAttackConfig):
        raise TypeError(f"config must be a SparseAttackConfig, got {type(config).__name__}")
    if not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"x must be a (B,C,H,W) floating-point batch, got {tuple(x.shape)} {x.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    _check_generator(generator, x.device)
    if targets is not None and not config.targeted:
        raise AdvpipeError("targets were given but config.targeted is False")
    if targets is not None and targets.shape != y.shape:
        raise ValueError(f"targets must have shape {tuple(y.shape)}, got {tuple(targets.shape)}")
    if model.training:
        log.warning("sparse_attack: the model is in train mode; BatchNorm statistics will change (call model.eval())")

    cfg = config.resolve(tuple(x.shape[1:]))
    return _SparseRun(model, x.detach().float(), y.detach().long(), cfg, generator, targets, on_step).run()


class _SparseRun:
    """State of one batched attack run (kept in an object so the step stays readable)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SparseAttackConfig,
                 generator: torch.Generator, targets: torch.Tensor | None,
                 on_step: Callable[[StepInfo], None] | None) -> None:
        self.model, self.x, self.y, self.cfg, self.gen = model, x, y, cfg, generator
        self.device = x.device
        self.eps = float(cfg.eps)
        dtype = _AUTOCAST.get(cfg.autocast_dtype) if cfg.autocast_dtype else None
        self.autocast_dtype = dtype
        self.targets_in = targets
        self.on_step = on_step

    def _autocast(self) -> Any:
        """The autocast context of the optimisation (disabled without ``autocast_dtype``)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    @torch.no_grad()
    def _fp32_success(self, x_adv: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Success of attacked images in float32 (boundary masks flip under bf16)."""
        with torch.autocast(self.device.type, enabled=False):
            pred = self.model(x_adv).argmax(dim=1)
        return pred == label if self.cfg.targeted else pred != label

    def run(self) -> SparseAttackResult:
        """Run the whole attack on the batch and assemble the result."""
        cfg, x, y = self.cfg, self.x, self.y
        b, c, h, w = x.shape
        if b == 0:
            return _empty_result(x, cfg)

        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            clean_logits = self.model(x)
        clean_correct = clean_logits.argmax(1) == y
        targets = None
        if cfg.targeted:
            if self.targets_in is not None:
                targets = self.targets_in.to(self.device).long()
            else:
                targets = TARGETS.get(cfg.target)(self.model, x, y, clean_logits.shape[1], self.gen)
        label = targets if cfg.targeted else y

        # L_init: the cross-entropy a successful dense attack reaches (Eq. 4).
        with self._autocast():
            x_init = dense_init(self.model, x, label, cfg, self.gen)
        with torch.no_grad():
            with self._autocast():
                init_logits = self.model(x_init)
            l_init = F.cross_entropy(init_logits.float(), label, reduction="none")
        init_success = self._fp32_success(x_init, label)
        # Only guards the division: a dense attack that already fits the target exactly gives CE ~ 0.
        l_init_div = l_init.clamp_min(1e-6)

        encoder = build_encoder(cfg.encoder, (c, h, w), b, scope=cfg.encoder_scope,
                                options={"backbone": cfg.unet_backbone} if cfg.encoder == "unet" else None,
                                generator=self.gen, device=self.device)
        encoder.train()
        params = [p for p in encoder.parameters()]
        # The fused kernel is ~10x faster than the foreach one for a 3M-parameter encoder on CPU.
        optimizer = torch.optim.Adam(params, lr=cfg.adam_lr, fused=True)

        # The eps ball intersected with the image box, as offsets from x.
        lo = (-x).clamp_(min=-self.eps)
        hi = (1 - x).clamp_(max=self.eps)
        delta = torch.rand(x.shape, generator=self.gen, device=self.device).mul_(2 * self.eps).sub_(self.eps)
        delta = torch.maximum(torch.minimum(delta, hi), lo)
        momentum = torch.zeros_like(delta)
        rule = LAMBDA_RULES.get(cfg.lambda_rule)(cfg, b, self.device)
        schedule = ALPHA_SCHEDULES.get(cfg.alpha_schedule)
        n_pix = h * w
        reduce = tuple(range(1, delta.dim()))
        beta = float(cfg.beta)

        # Best-so-far store (keep_best): sentinel n_pix + 1 pixels means "no successful mask yet".
        best_pix = torch.full((b,), n_pix + 1, dtype=torch.long, device=self.device)
        best_mask = torch.zeros((b, h, w), dtype=torch.bool, device=self.device)
        best_delta = torch.zeros_like(delta)
        best_step = torch.full((b,), cfg.steps, dtype=torch.long, device=self.device)

        def consider(d: torch.Tensor, mask_bin: torch.Tensor, step: int, hint: torch.Tensor | None) -> None:
            """Keep (d, mask) for images where it is sparser than their best and succeeds in fp32.

            ``hint`` (the soft-mask forward's success) limits the fp32 check to promising images:
            checking every image every step would cost half a step more (forward ~ input-only backward).
            """
            pix = mask_bin.flatten(1).sum(1)
            cand = pix < best_pix
            if hint is not None:
                cand &= hint
            idx = cand.nonzero().squeeze(1)
            if idx.numel() == 0:
                return
            m_sel = mask_bin[idx].unsqueeze(1).to(d.dtype)
            ok = self._fp32_success(x[idx] + d[idx] * m_sel, label[idx])
            sel = idx[ok]
            best_pix[sel] = pix[sel]
            best_mask[sel] = mask_bin[sel]
            best_delta[sel] = d[sel]
            best_step[sel] = step

        loss_i = torch.zeros(b, device=self.device)
        alpha = cfg.alpha_min
        with task("sparse attack", total=cfg.steps, unit="step") as bar:
            for step in range(cfg.steps):
                alpha = schedule(step, cfg.steps, cfg.alpha_min, float(cfg.alpha_max))
                with torch.enable_grad():
                    leaf = delta.detach().requires_grad_(True)
                    m = torch.sigmoid(alpha * encoder(leaf))
                    m_fwd = m
                    if cfg.straight_through:
                        # Forward with the binary mask, backward through the soft one (Bengio et al., 2013).
                        m_fwd = m + ((m > 0.5).to(m.dtype) - m).detach()
                    with self._autocast():
                        logits = self.model(x + leaf * m_fwd)
                    ce = F.cross_entropy(logits.float(), label, reduction="none")
                    ratio = ce / l_init_div
                    l_cls = ratio - 1 if cfg.targeted else 1 - ratio
                    l_cls = torch.maximum(l_cls, cfg.eta * l_cls)
                    m_flat = m.flatten(1)
                    lam = cfg.C + cfg.gamma * (m_flat.detach() > 0.5).float().mean(1)
                    if rule.multiplier is not None:
                        lam = lam * rule.multiplier
                    loss_i = l_cls + lam * m_flat.mean(1)
                    # allow_unused: some smp backbones (efficientnet) hold parameters the U-Net never uses.
                    grads = torch.autograd.grad(loss_i.sum(), [leaf, *params], allow_unused=True)

                pred = logits.detach().argmax(1)
                soft_success = pred == label if cfg.targeted else pred != label
                if cfg.keep_best:
                    consider(delta, (m.detach() > 0.5).squeeze(1), step, soft_success)
                rule.update(soft_success)
                if self.on_step is not None:
                    self.on_step(StepInfo(step, alpha, delta, m.detach().squeeze(1), soft_success, loss_i.detach(),
                                          None if rule.multiplier is None else rule.multiplier.clone()))

                for p, g in zip(params, grads[1:]):
                    p.grad = g
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                # Eq. (6): MI-FGSM descent on L with the per-image L1-normalised gradient.
                g_delta = grads[0]
                l1 = g_delta.abs().sum(dim=reduce, keepdim=True).clamp_min_(torch.finfo(g_delta.dtype).tiny)
                momentum.mul_(cfg.mu).add_(g_delta / l1)
                delta = torch.maximum(torch.minimum(delta - beta * momentum.sign(), hi), lo)
                bar.advance(1, alpha=round(alpha, 3))

        with torch.no_grad():
            final_soft = torch.sigmoid(alpha * encoder(delta)).squeeze(1)
        final_mask = final_soft > 0.5
        if cfg.keep_best:
            consider(delta, final_mask, cfg.steps, None)
            found = best_pix <= n_pix
            keep = found.view(b, 1, 1)
            mask = torch.where(keep, best_mask, final_mask)
            delta_out = torch.where(keep.unsqueeze(1), best_delta, delta)
            success = found
        else:
            mask, delta_out = final_mask, delta
            success = self._fp32_success(x + delta * mask.unsqueeze(1).float(), label)
            best_step.fill_(cfg.steps)

        norms = perturbation_norms(delta_out * mask.unsqueeze(1).to(delta_out.dtype))
        return SparseAttackResult(
            mask=mask,
            delta=delta_out,
            soft_mask=final_soft,
            success=success,
            l0_elements=norms["l0_elements"].long(),
            l0_pixels=norms["l0_pixels"].long(),
            l2=norms["l2"],
            linf=norms["linf"],
            loss=loss_i.detach(),
            l_init=l_init,
            init_success=init_success,
            clean_correct=clean_correct,
            best_step=best_step,
            targets=targets,
            config=cfg.to_dict(),
        )


def _empty_result(x: torch.Tensor, cfg: SparseAttackConfig) -> SparseAttackResult:
    """The result for a batch of zero images."""
    _, c, h, w = x.shape
    zl = torch.zeros(0, dtype=torch.long, device=x.device)
    zf = torch.zeros(0, device=x.device)
    zb = torch.zeros(0, dtype=torch.bool, device=x.device)
    return SparseAttackResult(
        mask=torch.zeros((0, h, w), dtype=torch.bool, device=x.device), delta=torch.zeros_like(x),
        soft_mask=torch.zeros((0, h, w), device=x.device),
        success=zb, l0_elements=zl, l0_pixels=zl, l2=zf, linf=zf, loss=zf, l_init=zf, init_success=zb,
        clean_correct=zb, best_step=zl, targets=zl if cfg.targeted else None, config=cfg.to_dict(),
    )


def _check_generator(generator: torch.Generator, device: torch.device) -> None:
    """Require a generator on the tensors' device (randomness only ever comes from it)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (the attack draws its randomness only from it)")
    gen_device = torch.device(generator.device)
    if gen_device.type != device.type or (
        gen_device.index is not None and device.index is not None and gen_device.index != device.index
    ):
        raise ValueError(f"generator is on {gen_device} but the tensors are on {device}")
