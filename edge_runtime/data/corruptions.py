"""Novel conditions made from real images: lens blur, Gaussian blur, noise, haze and rain streaks.

A camera that keeps seeing known objects under a new condition (a smeared lens, fog, rain) faces a
novel *condition*, not a novel class. These corruptions turn clean test images into such streams at
five severity levels each. Sizes (blur radii, streak lengths) are given for 32-pixel images and
scaled with the image side, so a level means the same on 28x28 digits and 64x64 crops. Every
corruption is a batched tensor operation on [N, C, H, W] images in [0, 1] and is reproducible from
its seed. `condition_split` makes such a condition the novel input type of a 9+1 run
(`data.novel_condition` in the config).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.config import CorruptionName
from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.splits import NovelClassSplit
from edge_runtime.data.transforms import to_tensor
from edge_runtime.errors import InputError

CORRUPTIONS = get_args(CorruptionName)
LEVELS = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 32

# Severity tables, index = level - 1.
LENS_BLUR_RADIUS = (0.75, 1.0, 1.5, 2.0, 2.5)  # defocus disk radius, pixels at 32 px
GAUSSIAN_BLUR_SIGMA = (0.5, 0.75, 1.0, 1.5, 2.0)  # pixels at 32 px
NOISE_STD = (0.04, 0.08, 0.12, 0.18, 0.26)
HAZE_DENSITY = (0.5, 0.8, 1.2, 1.7, 2.3)  # scattering coefficient; transmission = exp(-density * depth)
HAZE_AIRLIGHT = 0.85
RAIN_DENSITY = (0.01, 0.02, 0.03, 0.045, 0.06)  # fraction of pixels that seed a streak
RAIN_LENGTH = (4, 6, 8, 10, 12)  # streak length, pixels at 32 px
RAIN_BRIGHTNESS = 0.8
RAIN_MAX_TILT_DEGREES = 20.0


def corrupt(images: torch.Tensor, kind: str, level: int, seed: int = 0) -> torch.Tensor:
    """`images` [N, C, H, W] in [0, 1] under corruption `kind` at severity `level` (1..5), same shape."""
    if kind not in CORRUPTIONS:
        raise InputError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    if level not in LEVELS:
        raise InputError(f"corruption level must be one of {LEVELS}, got {level!r}")
    if images.ndim != 4 or not images.is_floating_point():
        raise InputError(f"images must be a float [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    scale = min(images.shape[2:]) / REFERENCE_SIDE
    step = level - 1
    if kind == "lens_blur":
        out = _depthwise(images, _disk_kernel(LENS_BLUR_RADIUS[step] * scale))
    elif kind == "gaussian_blur":
        out = _depthwise(images, _gaussian_kernel(GAUSSIAN_BLUR_SIGMA[step] * scale))
    elif kind == "gaussian_noise":
        out = images + NOISE_STD[step] * torch.randn(images.shape, generator=generator).to(images)
    elif kind == "haze":
        out = _haze(images, HAZE_DENSITY[step], generator)
    else:
        out = _rain(images, RAIN_DENSITY[step], max(2, round(RAIN_LENGTH[step] * scale)), generator)
    return out.clamp(0.0, 1.0)


def corrupt_set(data: ImageSet, kind: str, level: int, seed: int = 0, chunk: int = 2048) -> ImageSet:
    """A uint8 ImageSet under a corruption (labels and classes unchanged), processed in chunks."""
    parts = []
    for number, start in enumerate(range(0, len(data), chunk)):
        images = corrupt(to_tensor(data.images[start:start + chunk]), kind, level, seed + number)
        parts.append((images * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    images = np.concatenate(parts) if parts else data.images.copy()
    return ImageSet(images, data.labels, data.classes, f"{data.name}-{kind}{level}")


def condition_split(split: NovelClassSplit, kind: str, level: int, novel_samples: int, seed: int = 0) -> NovelClassSplit:
    """The 9+1 split with the condition '<kind>-<level>' as the novel input type (label K).

    Its stream pool is `novel_samples` known training images under the corruption (the classifier
    trained on their clean versions); its test split is every known test image clean plus a
    corrupted copy of each. Images of a held-out class, if any, take no part.
    """
    known = len(split.known_classes)
    classes = split.known_classes + (f"{kind}-{level}",)
    pick = np.random.default_rng(seed).choice(len(split.train), min(novel_samples, len(split.train)), replace=False)
    novel_train = corrupt_set(split.train.subset(np.sort(pick)), kind, level, seed)
    known_test = split.test.subset(split.test.labels < known)
    corrupted_test = corrupt_set(known_test, kind, level, seed + 1)
    test = ImageSet(np.concatenate([known_test.images, corrupted_test.images]),
                    np.concatenate([known_test.labels, np.full(len(corrupted_test), known, np.int64)]), classes,
                    f"{split.test.name}-{kind}{level}")
    novel = ImageSet(novel_train.images, np.full(len(novel_train), known, np.int64), classes, novel_train.name)
    return replace(split, novel_class=classes[-1], novel_train=novel, test=test)


def _depthwise(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel with one odd-sized 2-D kernel, edges reflected."""
    channels = images.shape[1]
    pad = kernel.shape[0] // 2
    weight = kernel.to(images).expand(channels, 1, *kernel.shape)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect" if pad < min(images.shape[2:]) else "replicate")
    return F.conv2d(padded, weight, groups=channels)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    axis = torch.arange(-radius, radius + 1, dtype=torch.float64)
    line = torch.exp(-axis.square() / (2 * sigma * sigma))
    kernel = line[:, None] * line[None, :]
    return (kernel / kernel.sum()).float()


def _disk_kernel(radius: float, supersample: int = 8) -> torch.Tensor:
    """A defocus (pillbox) kernel: the disk's area inside each pixel, so sub-pixel radii stay smooth."""
    half = math.ceil(radius)
    fine = (torch.arange(-(half + 0.5) * supersample + 0.5, (half + 0.5) * supersample, dtype=torch.float64)
            / supersample)
    inside = (fine[:, None].square() + fine[None, :].square() <= radius * radius).double()
    side = 2 * half + 1
    kernel = inside.view(side, supersample, side, supersample).mean(dim=(1, 3))
    return (kernel / kernel.sum()).float()


def _haze(images: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Atmospheric scattering I = J t + A (1 - t), t = exp(-density * depth).

    Depth grows from the bottom row (near, 0) to the top (far, 1), tilted by a random small
    horizontal slope per image, as in a ground-level camera view.
    """
    count, _, height, width = images.shape
    rows = torch.linspace(1.0, 0.0, height).view(1, height, 1)
    cols = torch.linspace(-0.5, 0.5, width).view(1, 1, width)
    tilt = 0.3 * (torch.rand(count, 1, 1, generator=generator) - 0.5)
    depth = (rows + tilt * cols).clamp(0.0, 1.0)
    transmission = torch.exp(-density * depth).unsqueeze(1).to(images)
    return images * transmission + HAZE_AIRLIGHT * (1.0 - transmission)


def _rain(images: torch.Tensor, density: float, length: int, generator: torch.Generator) -> torch.Tensor:
    """Bright motion-blurred streaks: sparse seeds smeared along a line tilted per image, screen-blended.

    Each image gets its own tilt, applied in one grouped convolution over the whole batch.
    """
    count, _, height, width = images.shape
    seeds = (torch.rand(count, 1, height, width, generator=generator) < density).float()
    tilt = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(RAIN_MAX_TILT_DEGREES)
    kernels = _line_kernels(length, tilt)
    pad = kernels.shape[-1] // 2
    streaks = F.conv2d(F.pad(seeds.view(1, count, height, width), (pad, pad, pad, pad)), kernels.unsqueeze(1),
                       groups=count).view(count, 1, height, width)
    streaks = (streaks * RAIN_BRIGHTNESS * length / 2).clamp(0.0, 1.0).to(images)
    return 1.0 - (1.0 - images) * (1.0 - streaks)


def _line_kernels(length: int, angles: torch.Tensor) -> torch.Tensor:
    """One normalised line kernel [K, K] per angle (0 = vertical), anti-aliased by distance to the line."""
    side = length | 1  # odd
    axis = torch.arange(side, dtype=torch.float32) - side // 2
    ys, xs = axis.view(1, side, 1), axis.view(1, 1, side)
    sin, cos = angles.sin().view(-1, 1, 1), angles.cos().view(-1, 1, 1)
    across = (xs * cos - ys * sin).abs()  # distance from the line through the centre
    along = (xs * sin + ys * cos).abs()
    kernels = (1.0 - across).clamp_min(0.0) * (along <= length / 2).float()
    return kernels / kernels.sum(dim=(1, 2), keepdim=True)
