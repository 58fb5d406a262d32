"""Hand-written layer patterns held back from the rules: detection must generalize to them.

Each pattern is one a real architecture uses and none of the detection rules names: a
normalization outside BN/GN/LN (filter-response normalization), depthwise convs on channel
splits concatenated with an identity branch, ``Linear`` → ``BatchNorm1d`` on a reshaped view,
a norm's γ reaching another norm through a 1×1 conv, conv → BN pairs inside multiplicative
gating, pooling or upsampling between a conv and its norm. Scored against the brute-force oracle
(``tests/oracle.py``) like the zoo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo import ZooModel, _classifier


class FRN(nn.Module):
    """Filter response normalization + TLU (Singh & Krishnan 2020): ``x / sqrt(mean(x²) + eps)``
    over each channel's spatial positions, no centring."""

    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.tau = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.eps = eps

    def forward(self, x):
        nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
        x = x * torch.rsqrt(nu2 + self.eps)
        return torch.max(self.gamma * x + self.beta, self.tau)


class FRNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.frn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), FRN(8)
        self.conv2, self.frn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), FRN(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.frn2(self.conv2(self.frn1(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


class SplitConcat(nn.Module):
    """Shuffle-style: half the channels pass, the other half go through a depthwise conv; one BN after the concat."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2, bias=False)
        self.pw = nn.Conv2d(c // 2, c // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return F.relu(self.bn(torch.cat([a, self.pw(self.dw(b))], dim=1)))


class SplitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.block1, self.block2 = SplitConcat(16), SplitConcat(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.block1(F.relu(self.bn(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))


class TokenMixer(nn.Module):
    """Linear on tokens ``(B, N, C)`` → BatchNorm1d on the ``(B·N, C)`` view → back (LeViT-style)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, 2 * c, bias=False)
        self.bn = nn.BatchNorm1d(2 * c)
        self.proj = nn.Linear(2 * c, c)

    def forward(self, x):
        b, n, c = x.shape
        y = self.bn(self.fc(x).flatten(0, 1)).view(b, n, -1)
        return x + self.proj(F.gelu(y))


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.mix1, self.mix2 = TokenMixer(16), TokenMixer(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.bn(self.patch(x)).flatten(2).transpose(1, 2)
        return self.head(self.mix2(self.mix1(x)).mean(dim=1))


class GammaThroughPointwise(nn.Module):
    """conv → BN → 1×1 conv (with bias) → BN: the first BN's γ reaches the second through a linear map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pw, self.bn2 = nn.Conv2d(8, 16, 1, bias=True), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.bn2(self.pw(self.bn1(self.conv1(x))))
        x = F.relu(self.bn3(self.conv3(F.relu(x))))
        return self.head(x.mean(dim=(2, 3)))


class GatedBlock(nn.Module):
    """``act(f1(x)) * f2(x)`` with conv → BN inside each branch, then a 1×1 projection → BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.f2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.proj, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        gated = F.silu(self.bn1(self.f1(x))) * self.bn2(self.f2(x))
        return x + self.bn3(self.proj(gated))


class GatedProductNorm(nn.Module):
    """``relu(f1(x)) * f2(x)`` → BN: the product is positively homogeneous in each branch's weight."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f1 = nn.Conv2d(c, c, 1, bias=False)
        self.f2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(F.relu(self.f1(x)) * self.f2(x))


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.gate1, self.gate2 = GatedBlock(8), GatedProductNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.gate2(self.gate1(F.relu(self.bn(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))


class PoolBetween(nn.Module):
    """conv → max-pool → BN, conv → avg-pool → BN, conv → nearest / bilinear upsampling → BN."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.n2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.n3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c4, self.n4 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.n1(self.pool(self.c1(x))))
        x = F.relu(self.n2(F.avg_pool2d(self.c2(x), 2)))
        x = F.relu(self.n3(self.up(self.c3(x))))
        x = F.relu(self.n4(F.interpolate(self.c4(x), scale_factor=2, mode="bilinear", align_corners=False)))
        return self.head(x.mean(dim=(2, 3)))


def heldout_zoo() -> list[ZooModel]:
    return [
        _classifier("held/frn", FRNNet, size=16, fast=True),
        _classifier("held/split_concat", SplitNet, size=16, fast=True),
        _classifier("held/linear_bn1d_view", TokenNet, size=16, fast=True),
        _classifier("held/gamma_through_1x1", GammaThroughPointwise, size=16, fast=True),
        _classifier("held/gated", GatedNet, size=16, fast=True),
        _classifier("held/pool_upsample", PoolBetween, size=16, fast=True),
    ]
