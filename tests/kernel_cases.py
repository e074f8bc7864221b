"""Inputs and error measures shared by the kernel tests (Triton, CUDA C), so both judge alike."""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.reference import last_layer_scores

# Largest relative error vs float64 each precision variant is allowed on the small random cases
# (the real-digits cases use the bounds each kernel module states for them).
ODD_SHAPE_BOUND = {"fp32": 1e-6, "bf16": 1e-2, "bf16x3": 1e-4, "fp16w": 1e-3, "bf16w": 1e-2}


class LastLayerCase(NamedTuple):
    features: torch.Tensor  # [B, D] float32, non-negative as after a ReLU
    probs: torch.Tensor  # [B, C] float32 softmax outputs
    labels: torch.Tensor  # [B] int64
    means: torch.Tensor  # [C, C*(D+1)] float64
    precision: torch.Tensor  # [C*(D+1), C*(D+1)] float64, symmetric positive definite
    reference: torch.Tensor  # [B] float64 scores


def random_last_layer_case(batch: int, classes: int, feature_dim: int, seed: int) -> LastLayerCase:
    """A seeded last-layer scoring problem of any size, with its float64 reference scores."""
    generator = torch.Generator().manual_seed(seed)
    dim = classes * (feature_dim + 1)
    features = torch.randn(batch, feature_dim, generator=generator).relu()
    probs = (2 * torch.randn(batch, classes, generator=generator)).softmax(dim=1)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    means = 0.1 * torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    root = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    precision = root @ root.T / dim + torch.eye(dim, dtype=torch.float64)
    reference = last_layer_scores(features.double(), probs.double(), labels, means, precision)
    return LastLayerCase(features, probs, labels, means, precision, reference)


def relative_error(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample |scores - reference| / |reference|, in float64."""
    return (scores.double() - reference).abs() / reference.abs()
