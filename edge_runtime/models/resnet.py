"""CIFAR-style ResNets: torchvision's blocks with a 3x3 stride-1 stem and no max-pool.

ImageNet's 7x7 stride-2 stem plus max-pool would shrink a 32x32 image to 8x8 before the first
block; the CIFAR variant keeps full resolution there, which is what small images need.
"""

from __future__ import annotations

from typing import Literal

import torch
import torchvision
from torch import nn

from edge_runtime.models.base import Normalize

_BUILDERS = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34}


class CifarResNet(nn.Module):
    """Normalize -> torchvision ResNet trunk -> `fc`.

    The trunk's own `fc` is lifted to the top level (its slot becomes an identity), so the final
    linear layer is addressed as `fc` like every built-in architecture, with the same maths as
    torchvision's forward.
    """

    def __init__(self, depth: Literal["resnet18", "resnet34"], num_classes: int, in_channels: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        trunk = _BUILDERS[depth](num_classes=num_classes)
        trunk.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")
        trunk.maxpool = nn.Identity()
        self.normalize = Normalize(mean, std)
        self.fc: nn.Linear = trunk.fc
        trunk.fc = nn.Identity()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(self.normalize(x)))
