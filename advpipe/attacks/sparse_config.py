"""Settings of the sparse AdvMask attack (:class:`SparseAttackConfig`), validated on construction.

The defaults and the sweep that chose them are in docs/attack.md.

Example::

    cfg = SparseAttackConfig(eps=Fraction(8, 255), lambda_rule="adaptive", alpha_schedule="linear")
    cfg.resolve((3, 32, 32)).alpha_max   # 100.0: the CIFAR-size default (advmask.txt Sec. IV-B)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

import torch

from advpipe.attacks.encoders import DEFAULT_UNET_BACKBONE, ENCODERS
from advpipe.attacks.init_attack import init_attack_kind
from advpipe.attacks.sparse_rules import ALPHA_SCHEDULES, LAMBDA_RULES, TARGETS
from advpipe.errors import AdvpipeError
from advpipe.fraction import parse_fraction

#: images with at most this many pixels count as "small": linear encoder and alpha_max = 100
SMALL_IMAGE_PIXELS = 32 * 32

#: the paper's alpha_max per dataset (advmask.txt Sec. IV-B: "100 on CIFAR-10 and CIFAR-100, and 5 on
#: Tiny-ImageNet and Oxford Flower Dataset"; embedded is a CIFAR-10 subset); the one place that says so.
#: Any other dataset (folder, synthetic, user data) takes the image-size rule of :func:`default_alpha_max`.
PAPER_ALPHA_MAX = {"cifar10": 100.0, "cifar100": 100.0, "embedded": 100.0,
                   "tinyimagenet": 5.0, "flowers102": 5.0, "flowers102-random": 5.0}


def default_alpha_max(image_shape: tuple[int, int, int], dataset: str | None = None) -> float:
    """alpha_max of ``dataset`` (``NAME`` or ``NAME:OPTION``) in PAPER_ALPHA_MAX, else 100 up to 32x32 and 5 above."""
    base = (dataset or "").partition(":")[0]
    if base in PAPER_ALPHA_MAX:
        return PAPER_ALPHA_MAX[base]
    return 100.0 if image_shape[1] * image_shape[2] <= SMALL_IMAGE_PIXELS else 5.0


#: the autocast dtypes of ``autocast_dtype``
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the fields that may hold a Fraction (:meth:`SparseAttackConfig.to_dict` writes them as ``"8/255"``)
FRACTION_FIELDS = ("eps", "beta", "init_step_size")


@dataclass(frozen=True)
class SparseAttackConfig:
    """Settings of :func:`sparse_attack`; defaults are justified in docs/attack.md.

    ``None`` means "derive from the image size or eps" (see :meth:`resolve`): ``beta`` and
    ``init_step_size`` default to ``eps / 4``, ``alpha_max`` to the paper's value for the dataset
    (:data:`PAPER_ALPHA_MAX`), else 100 for images of at most 32x32 pixels and 5 above (advmask.txt
    Sec. IV-B), ``encoder="auto"`` to ``linear`` up to 32x32 and
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
        init_attack_kind(self.init_attack)
        TARGETS.get(self.target)
        if self.encoder != "auto":
            ENCODERS.get(self.encoder)
        if self.encoder_scope not in ("batch", "image"):
            raise AdvpipeError(f"unknown encoder_scope {self.encoder_scope!r}; choose one of: batch, image")
        if self.autocast_dtype is not None and self.autocast_dtype not in AUTOCAST:
            raise AdvpipeError(f"unknown autocast_dtype {self.autocast_dtype!r}; choose one of: bf16, fp16 (or None)")
        for name in ("targeted", "keep_best", "straight_through"):
            if not isinstance(getattr(self, name), bool):
                raise AdvpipeError(f"sparse attack {name} must be true or false, got {getattr(self, name)!r}")

    def resolve(self, image_shape: tuple[int, int, int], dataset: str | None = None) -> "SparseAttackConfig":
        """Return a copy with every size-, dataset- or eps-derived default made concrete for (C,H,W) images."""
        small = image_shape[1] * image_shape[2] <= SMALL_IMAGE_PIXELS
        eps = self.eps
        return dataclasses.replace(
            self,
            beta=eps / 4 if self.beta is None else self.beta,
            init_step_size=eps / 4 if self.init_step_size is None else self.init_step_size,
            alpha_max=default_alpha_max(image_shape, dataset) if self.alpha_max is None else self.alpha_max,
            encoder=("linear" if small else "unet") if self.encoder == "auto" else self.encoder,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for provenance; Fractions are written as strings such as ``"8/255"``."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Fraction):
                out[key] = f"{value.numerator}/{value.denominator}"
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, name: str = "attack") -> "SparseAttackConfig":
        """The config :meth:`to_dict` wrote, fraction strings parsed; AdvpipeError naming ``name`` if unusable."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise AdvpipeError(f"{name} records fields this advpipe does not know: {unknown[:5]}; read it with "
                               "the advpipe version that wrote it")
        values = {key: parse_fraction(value, name=f"{name} {key}", high=math.inf)
                  if key in FRACTION_FIELDS and isinstance(value, str) else value for key, value in values.items()}
        try:
            return cls(**values)
        except TypeError as exc:  # e.g. a list where a name belongs: unhashable
            raise AdvpipeError(f"{name} is unusable: {exc}") from exc
