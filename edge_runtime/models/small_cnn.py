"""A small BatchNorm conv net for tiny grey images (8x8 digits, 28x28 MNIST-like sets).

Two conv stages with a 2x2 max-pool after each, then global average pooling, so the same
weight shapes work for any input of at least 8x8 pixels.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from edge_runtime.models.base import Normalize


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def small_cnn(num_classes: int, in_channels: int, width: int,
              mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Sequential:
    """Normalize, two stages of (conv, conv, pool) at `width` and `2*width` channels, pool, `fc`."""
    return nn.Sequential(OrderedDict(
        normalize=Normalize(mean, std),
        stage1=nn.Sequential(_conv_bn_relu(in_channels, width), _conv_bn_relu(width, width), nn.MaxPool2d(2)),
        stage2=nn.Sequential(_conv_bn_relu(width, 2 * width), _conv_bn_relu(2 * width, 2 * width), nn.MaxPool2d(2)),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(2 * width, num_classes),
    ))
