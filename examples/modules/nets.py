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


#: Images smaller than this get the small-image stem (3×3 stride-1 first conv, no max-pool)
#: instead of torchvision's ImageNet stem, which divides the resolution by 4 at once.
SMALL_IMAGE = 64
ARCHS = ("digits_cnn", "resnet18_cifar", "resnet18", "resnet50", "mobilenet_v2")


def _conv_init(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def build_adapted(
    arch: str, num_classes: int, zero_init_residual: bool = False, in_channels: int = 3,
    image_size: int | None = None,
) -> tuple[nn.Module, list[str], int]:
    """Build ``arch`` for images of ``in_channels`` × ``image_size`` px.

    Returns ``(network, adaptations, min_size)``: the notes say what differs from the stock
    torchvision network (first conv's channels, small-image stem); ``min_size`` is the smallest
    input side the network takes (its total stride: the last stage sees at least 1×1), to which
    smaller images must be upsampled.
    """
    small = image_size is not None and image_size < SMALL_IMAGE
    notes: list[str] = []
    if arch == "digits_cnn":
        return DigitsCNN(num_classes, in_channels=in_channels), notes, 2
    if arch == "resnet18_cifar":
        model = resnet18_cifar(num_classes, zero_init_residual)
        small, min_size = True, 8
    elif arch in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, arch)(
            weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
        )
        min_size = 8 if small else 32
        if small:
            model.maxpool = nn.Identity()
            notes.append(f"small-image stem for {image_size} px (3×3 stride-1 first conv, no max-pool)")
    elif arch == "mobilenet_v2":
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
        min_size = 16 if small else 32
        if small:
            notes.append(f"small-image stem for {image_size} px (first conv stride 1)")
    else:
        raise ValueError(f"model.arch={arch!r} is not known; use one of {', '.join(ARCHS)}")
    if in_channels != 3:
        notes.append(f"first conv takes {in_channels} channel{'s' if in_channels != 1 else ''}")
    if arch == "mobilenet_v2":
        if small or in_channels != 3:
            old = model.features[0][0]
            model.features[0][0] = _conv_init(nn.Conv2d(in_channels, old.out_channels, 3, 1 if small else 2, 1, bias=False))
    elif (small and arch != "resnet18_cifar") or in_channels != 3:  # resnet18_cifar has the small stem
        kernel, stride, pad = (3, 1, 1) if small else (7, 2, 3)
        model.conv1 = _conv_init(nn.Conv2d(in_channels, 64, kernel, stride, pad, bias=False))
    return model, notes, min_size


def build_classifier(
    arch: str, num_classes: int, zero_init_residual: bool = False, in_channels: int = 3,
    image_size: int | None = None,
) -> nn.Module:
    """Build ``arch`` (``digits_cnn``, ``resnet18_cifar``, ``resnet18``, ``resnet50``, ``mobilenet_v2``)
    for ``in_channels``-channel images of ``image_size`` px (see :func:`build_adapted`)."""
    return build_adapted(arch, num_classes, zero_init_residual, in_channels, image_size)[0]


def shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """Sub-modules to wrap with ``fully_shard`` before the root (residual / inverted blocks)."""
    kinds = (
        torchvision.models.resnet.BasicBlock,
        torchvision.models.resnet.Bottleneck,
        torchvision.models.mobilenetv2.InvertedResidual,
    )
    return [m for m in model.modules() if isinstance(m, kinds)]
