"""Models of other libraries: ``timm:NAME`` and ``torchvision:NAME``, and the small-input stem.

An architecture string is either a registered advpipe name (``resnet20``), a bare torchvision
name that advpipe does not register (``mobilenet_v3_small``), or a library prefix and a name:
``timm:resnet18`` (any ``timm.list_models()`` name, with an optional pretrained tag such as
``timm:resnet18.tv_in1k``) or ``torchvision:resnet18`` (torchvision's own ResNet-18, which the
CIFAR ``resnet18`` of the registry otherwise shadows). Both are built with fresh weights
(timm ``pretrained=False``, torchvision ``weights=None``); :mod:`advpipe.models.pretrained` loads
weights afterwards.
"""

from __future__ import annotations

from torch import nn

from advpipe.errors import AdvpipeError

TIMM_PREFIX = "timm:"
TORCHVISION_PREFIX = "torchvision:"


def split_arch(arch: str) -> tuple[str, str]:
    """``("timm", name)``, ``("torchvision", name)`` or ``("advpipe", arch)`` for an architecture string."""
    for library, prefix in (("timm", TIMM_PREFIX), ("torchvision", TORCHVISION_PREFIX)):
        if arch.startswith(prefix):
            name = arch[len(prefix):]
            if not name:
                raise AdvpipeError(f"model {arch!r} names no {library} model; e.g. {prefix}resnet18",
                                   fields=("model",))
            return library, name
    return "advpipe", arch


def torchvision_names() -> list[str]:
    """torchvision's classification model names (imported lazily: it is slow to import)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def create_timm(name: str, num_classes: int) -> nn.Module:
    """timm model ``name`` (with an optional ``.tag``) with fresh weights and ``num_classes`` outputs."""
    import timm

    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        close = timm.list_models(f"*{base[:6]}*")[:8]
        raise AdvpipeError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else "")
                           + " (timm.list_models() lists them all)", fields=("model",))
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:  # an unknown pretrained tag
        raise AdvpipeError(f"timm cannot build {name!r}: {str(exc).splitlines()[0][:160]}", fields=("model",)) from exc


def create_torchvision(name: str, num_classes: int) -> nn.Module:
    """torchvision classification model ``name`` with ``weights=None`` (never a download)."""
    import torchvision

    if name not in torchvision_names():
        raise AdvpipeError(f"unknown torchvision model {name!r}; see "
                           "torchvision.models.list_models(module=torchvision.models)", fields=("model",))
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def adapt_small_stem(model: nn.Module, arch: str) -> nn.Module:
    """Make a ResNet-style stem keep resolution: the first stem conv gets stride 1 and the max-pool goes.

    The total downsampling drops from 32x to 8x, so a 64x64 image still reaches the last stage as
    8x8 instead of 2x2 (AdvMask fine-tunes its ImageNet ResNets on 64x64 Tiny-ImageNet this way).
    The kernel is kept (7x7 in torchvision/timm ResNets, 3x3 in timm's deep stems), so the
    pretrained stem weights still load. Works for models with ``conv1`` and ``maxpool``
    (torchvision's and timm's ResNet, ResNeXt and Wide-ResNet); others raise AdvpipeError.
    """
    conv1, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    first = conv1 if isinstance(conv1, nn.Conv2d) else next(
        (m for m in conv1.modules() if isinstance(m, nn.Conv2d)), None) if isinstance(conv1, nn.Module) else None
    if first is None or pool is None:
        raise AdvpipeError(f"small_stem adapts ResNet-style stems (conv1 and maxpool, as in the ResNets of "
                           f"torchvision and timm); {arch} has no such stem", fields=("small_stem", "model"))
    first.stride = (1, 1)
    model.maxpool = nn.Identity()
    return model
