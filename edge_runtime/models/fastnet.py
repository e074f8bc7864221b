"""A small, fast, BatchNorm-heavy conv net for CIFAR-sized images.

The ideas come from the fast CIFAR-10 training literature (see DESIGN.md): a first convolution
fixed to a patch-whitening transform computed from the training images, so the trainable layers
start from decorrelated inputs; three conv groups, each halving the resolution with a max-pool
and normalising with BatchNorm, with GELU activations; identity-initialised convolutions so the
signal passes through the untrained net; global max-pooling into a linear `fc`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.errors import ConfigError, InputError
from edge_runtime.models.base import FrozenClassifier, Normalize

WHITEN_KERNEL = 2
MIN_INPUT_SIZE = WHITEN_KERNEL + 7  # the 2x2 valid conv and three 2x2 pools must leave >= 1 pixel
_WHITEN_EPS = 5e-4  # floor on patch-covariance eigenvalues, so near-constant directions are not blown up
_WHITEN_MAX_IMAGES = 10_000
_WHITEN_CHUNK = 1_000


class ConvGroup(nn.Module):
    """conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU; halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.act = nn.GELU()
        for conv in (self.conv1, self.conv2):
            _identity_init(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    """Normalize -> whitening conv (frozen weights, trained bias) -> GELU -> 3 ConvGroups -> max-pool -> `fc`.

    Group widths are 2, 8 and 8 times `width` (64/256/256 at the default 32).
    """

    def __init__(self, num_classes: int, in_channels: int, width: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        whiten_channels = 2 * in_channels * WHITEN_KERNEL ** 2
        widths = (2 * width, 8 * width, 8 * width)
        self.normalize = Normalize(mean, std)
        self.whiten = nn.Conv2d(in_channels, whiten_channels, kernel_size=WHITEN_KERNEL, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        self.groups = nn.Sequential(OrderedDict(
            group1=ConvGroup(whiten_channels, widths[0]),
            group2=ConvGroup(widths[0], widths[1]),
            group3=ConvGroup(widths[1], widths[2]),
        ))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.whiten(self.normalize(x)))
        return self.fc(self.pool(self.groups(x)).flatten(1))


@torch.no_grad()
def init_whitening(model: FrozenClassifier, images: torch.Tensor) -> None:
    """Set a fastnet's first conv to whiten 2x2 patches of `images` ([N,C,H,W] pixels in [0, 1]).

    With eigen-decomposition cov = V diag(lambda) V^T of the normalised patches, the filters are
    the rows of diag(lambda + eps)^-1/2 V^T and their negatives (so GELU keeps both signs).
    At most 10,000 evenly spaced images are used; the covariance is accumulated in float64.
    """
    network = model.network
    if not isinstance(network, FastNet):
        raise ConfigError(f"init_whitening needs a model built with model.arch 'fastnet', got a {type(network).__name__}")
    whiten_first_conv(network, images)


@torch.no_grad()
def whiten_first_conv(network: FastNet, images: torch.Tensor) -> None:
    """init_whitening for a bare FastNet (one that is not a frozen classifier: a detector's own net)."""
    conv = network.whiten
    if images.ndim != 4 or images.shape[1] != conv.in_channels or min(images.shape[2:]) < WHITEN_KERNEL:
        raise InputError(f"init_whitening: images must be [N,{conv.in_channels},H,W] with H,W >= {WHITEN_KERNEL}, "
                         f"got {tuple(images.shape)}")
    step = max(1, len(images) // _WHITEN_MAX_IMAGES)
    sample = images[::step][:_WHITEN_MAX_IMAGES]
    dim = conv.in_channels * WHITEN_KERNEL ** 2
    total = torch.zeros(dim, dtype=torch.float64, device=conv.weight.device)
    outer = torch.zeros(dim, dim, dtype=torch.float64, device=conv.weight.device)
    count = 0
    for start in range(0, len(sample), _WHITEN_CHUNK):
        chunk = network.normalize(sample[start:start + _WHITEN_CHUNK].to(conv.weight.device, torch.float32))
        patches = F.unfold(chunk, kernel_size=WHITEN_KERNEL).transpose(1, 2).reshape(-1, dim).double()
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = eigenvectors.T / (eigenvalues.clamp_min(0) + _WHITEN_EPS).sqrt()[:, None]
    filters = filters.reshape(dim, conv.in_channels, WHITEN_KERNEL, WHITEN_KERNEL)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
    conv.bias.zero_()


def _identity_init(conv: nn.Conv2d) -> None:
    """Make the first min(in, out) filters pass their input channel through unchanged."""
    shared = min(conv.in_channels, conv.out_channels)
    nn.init.dirac_(conv.weight.data[:shared])
