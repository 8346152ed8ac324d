"""Building blocks shared by the model zoo: weight initialisation and small conv helpers."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal init for convs (fan_out, ReLU gain), BN weight 1 / bias 0; returns ``model``.

    ``fan_out`` follows He et al. 2015 / torchvision's ResNets. Linear layers keep PyTorch's
    default init (uniform, fan_in), which is what the CIFAR reference trainings used.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free 3x3 convolution with padding 1 (a BN follows it everywhere in the zoo)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
