"""Network builders for the classification examples (random init only, no downloads)."""

from __future__ import annotations

import torchvision
from torch import nn


def digits_cnn_layers(num_classes: int = 10, width: int = 32, in_channels: int = 1) -> list[nn.Module]:
    """The small BatchNorm CNN for 8×8 images, as a flat list of layers.

    Three 3×3 conv → BN → ReLU blocks (the convs are scale-invariant through their BN), of
    ``width``, ``2·width`` and ``2·width`` channels, a 2×2 max-pool after the second, global
    average pooling and a linear classifier (the last layer).
    """

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return [
        *block(in_channels, width),
        *block(width, 2 * width),
        nn.MaxPool2d(2),
        *block(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    ]


class DigitsCNN(nn.Module):
    """:func:`digits_cnn_layers` as ``features`` (everything up to the pooled vector) and ``fc``."""

    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        *features, fc = digits_cnn_layers(num_classes, width, in_channels)
        self.features = nn.Sequential(*features)
        self.fc = fc

    def forward(self, x):
        return self.fc(self.features(x))


def resnet18_cifar(num_classes: int = 10, zero_init_residual: bool = False) -> nn.Module:
    """torchvision ResNet18 with the CIFAR stem: 3×3 stride-1 first conv, no max-pool."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def build_classifier(arch: str, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """Build ``arch`` (``digits_cnn``, ``resnet18_cifar``, ``resnet18``, ``resnet50``, ``mobilenet_v2``)."""
    if arch == "digits_cnn":
        return DigitsCNN(num_classes)
    if arch == "resnet18_cifar":
        return resnet18_cifar(num_classes, zero_init_residual)
    if arch in ("resnet18", "resnet50"):
        return getattr(torchvision.models, arch)(
            weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
        )
    if arch == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    raise ValueError(
        f"model.arch={arch!r} is not known; use one of digits_cnn, resnet18_cifar, resnet18, resnet50, mobilenet_v2"
    )


def shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """Sub-modules to wrap with ``fully_shard`` before the root (residual / inverted blocks)."""
    kinds = (
        torchvision.models.resnet.BasicBlock,
        torchvision.models.resnet.Bottleneck,
        torchvision.models.mobilenetv2.InvertedResidual,
    )
    return [m for m in model.modules() if isinstance(m, kinds)]
