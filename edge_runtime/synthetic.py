"""DROCC's synthetic one-class data: a 1-D sine manifold in the plane and a sphere in R^d.

Both put the positives on a low-dimensional manifold, the situation DROCC's annulus assumption is
written for: points a little off the manifold are negatives even though they are close to it in
Euclidean distance (a vertical shift of the sine wave passes near other parts of the curve).
"""

from __future__ import annotations

import math

import torch

SINE_X_RANGE = (-2 * math.pi, 2 * math.pi)
SINE_DISPLACEMENTS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
SPHERE_RADII = (1.2, 1.4, 1.6, 1.8, 2.0)


def sine_manifold(count: int, seed: int, displacement: float = 0.0) -> torch.Tensor:
    """[count, 2] points (x, sin x + s * displacement), x uniform on SINE_X_RANGE, s = +-1 at random.

    displacement 0 gives the positives; a positive displacement gives negatives at that vertical
    distance above or below the curve.
    """
    generator = torch.Generator().manual_seed(seed)
    low, high = SINE_X_RANGE
    x = low + (high - low) * torch.rand(count, generator=generator)
    side = torch.randint(0, 2, (count,), generator=generator).float() * 2 - 1
    return torch.stack([x, torch.sin(x) + side * displacement], dim=1)


def sphere(count: int, dim: int, radius: float, seed: int) -> torch.Tensor:
    """[count, dim] points uniform on the sphere of `radius` centred at the origin."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(count, dim, generator=generator)
    return radius * directions / directions.norm(dim=1, keepdim=True)
