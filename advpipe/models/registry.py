"""The model family: ``MODELS`` registry, ``create_model`` and ``feature_layer_name``.

Every factory has the signature ``factory(num_classes, image_size) -> nn.Module`` and returns a
model mapping normalized (B,3,H,W) float images to (B,num_classes) raw logits (normalization is
a separate wrapper). Names not registered here fall back to torchvision's classification
models, always built with ``weights=None``; registered CIFAR models take precedence over the
torchvision models of the same name (``resnet18/34/50``, ``vgg11/13/16/19``), which
``torchvision:resnet18`` names explicitly. ``timm:NAME`` builds any timm model
(:mod:`advpipe.models.external`); pretrained weights are loaded by :mod:`advpipe.models.pretrained`.

Example::

    model = create_model("resnet20", num_classes=10)
    stage = getattr(model, feature_layer_name("resnet20"))  # model.layer3, where A-FAN perturbs
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from advpipe.errors import AdvpipeError
from advpipe.models.external import (adapt_small_stem, create_timm, create_torchvision, split_arch,
                                     torchvision_names)
from advpipe.models.resnet import BasicBlock, Bottleneck, HeResNet, ResNet
from advpipe.models.shake_shake import ShakeShakeNet
from advpipe.models.vgg import VGG
from advpipe.models.wrn import WideResNet
from advpipe.registry import Registry

ModelFactory = Callable[[int, int], nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")
_FEATURE_LAYERS: dict[str, str] = {}

#: torchvision families whose last residual stage is ``layer4``
_TORCHVISION_LAYER4 = ("resnet", "resnext", "wide_resnet")


def register_model(
    name: str, *, feature_layer: str | None = None
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(num_classes, image_size)`` under ``name``; duplicates raise.

    ``feature_layer`` names the attribute holding the model's last feature stage (see
    :func:`feature_layer_name`).
    """

    def add(factory: ModelFactory) -> ModelFactory:
        MODELS.register(name, factory)  # raises on duplicates before we record anything
        if feature_layer is not None:
            _FEATURE_LAYERS[name] = feature_layer
        return factory

    return add


def list_models(*, include_torchvision: bool = False) -> list[str]:
    """Return the registered model names, sorted (optionally with torchvision's names too)."""
    names = set(MODELS.names())
    if include_torchvision:
        names |= set(torchvision_names())
    return sorted(names)


def create_model(name: str, num_classes: int, image_size: int = 32, *, small_stem: bool = False) -> nn.Module:
    """Build model ``name`` with fresh weights for ``num_classes`` classes and square inputs.

    ``name`` is a registered name, a torchvision name, ``torchvision:NAME`` or ``timm:NAME``.
    ``small_stem`` adapts a ResNet stem for small inputs (:func:`~advpipe.models.external.adapt_small_stem`).
    Raises AdvpipeError for unknown names (listing the choices) and invalid sizes.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise AdvpipeError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise AdvpipeError(f"image_size must be a positive integer, got {image_size!r}")
    library, bare = split_arch(name)
    if library == "timm":
        model = create_timm(bare, num_classes)
    elif library == "torchvision" or (name not in MODELS and name in torchvision_names()):
        # weights=None: never download; torchvision then initialises the model itself
        model = create_torchvision(bare, num_classes)
    else:
        try:
            factory = MODELS.get(name)
        except AdvpipeError as err:
            raise AdvpipeError(
                f"{err}; or any torchvision classification model "
                "(torchvision.models.list_models(module=torchvision.models)), or timm:NAME for any timm model"
            ) from err
        model = factory(num_classes, image_size)
    return adapt_small_stem(model, name) if small_stem else model


def feature_layer_name(model_name: str) -> str:
    """Return the attribute name of ``model_name``'s last residual stage (VGG: ``features``).

    A-FAN (Sec. 4, "the last block") perturbs this module's output. torchvision ResNet/ResNeXt/
    Wide-ResNet names (also as ``torchvision:``/``timm:``) map to ``layer4``; other models raise AdvpipeError.
    """
    if model_name in _FEATURE_LAYERS:
        return _FEATURE_LAYERS[model_name]
    library, bare = split_arch(model_name)
    if library != "advpipe" or (model_name not in MODELS and model_name in torchvision_names()):
        if bare.startswith(_TORCHVISION_LAYER4):  # timm's ResNets name their stages as torchvision does
            return "layer4"
    libraries = ("torchvision ", "timm:")
    supported = sorted(_FEATURE_LAYERS) + [f"{lib}{p}*" for lib in libraries for p in _TORCHVISION_LAYER4]
    raise AdvpipeError(
        f"no known feature layer for model {model_name!r}; supported: {', '.join(supported)}"
    )


def _check_size(name: str, image_size: int, minimum: int) -> None:
    """Raise AdvpipeError if ``image_size`` is below what the architecture can downsample."""
    if image_size < minimum:
        raise AdvpipeError(f"model {name!r} needs image_size >= {minimum}, got {image_size}")


def _vgg(depth: int, num_classes: int, image_size: int) -> nn.Module:
    # five 2x2 max-pools: anything below 32 pixels collapses to an empty map
    _check_size(f"vgg{depth}", image_size, 32)
    return VGG(depth, num_classes)


for _depth in (11, 13, 16, 19):
    register_model(f"vgg{_depth}", feature_layer="features")(partial(_vgg, _depth))

# the CIFAR ResNets end in a global average pool, so any image size works
register_model("resnet18", feature_layer="layer4")(
    lambda num_classes, image_size: ResNet(BasicBlock, (2, 2, 2, 2), num_classes)
)
register_model("resnet34", feature_layer="layer4")(
    lambda num_classes, image_size: ResNet(BasicBlock, (3, 4, 6, 3), num_classes)
)
register_model("resnet50", feature_layer="layer4")(
    lambda num_classes, image_size: ResNet(Bottleneck, (3, 4, 6, 3), num_classes)
)
for _depth in (20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", feature_layer="layer3")(
        partial(lambda depth, num_classes, image_size: HeResNet(depth, num_classes), _depth)
    )
register_model("wrn-28-10", feature_layer="block3")(
    lambda num_classes, image_size: WideResNet(28, 10, num_classes, dropout=0.0)
)
register_model("shake-shake-26-2x32d", feature_layer="layer3")(
    lambda num_classes, image_size: ShakeShakeNet(26, 32, num_classes)
)
