"""Pure-torch maths of the gradient-Mahalanobis scoring path.

These are the correctness references that fused Triton / CUDA kernels are tested against, so they
favour plain, obviously-right formulas over speed. The cross-entropy gradient of a final linear
layer z = W a + b has the closed form dL/dW = (softmax(z) - onehot(y)) a^T, dL/db = softmax(z) -
onehot(y): no autograd pass is needed to get per-sample gradients.
"""

from __future__ import annotations

import torch

from edge_runtime.errors import InputError


def softmax_residual(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """probs - onehot(labels), [B, C]: the gradient of cross-entropy w.r.t. the logits."""
    _check_probs_labels(probs, labels)
    residual = probs.clone()
    residual[torch.arange(len(labels), device=labels.device), labels] -= 1
    return residual


def last_layer_gradients(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient w.r.t. the final linear layer's [weight | bias], [B, C*(D+1)].

    Row-major flattening of the [C, D+1] matrix (probs - onehot) (outer) [features; 1]: entry
    c*(D+1) + d is dL/dW[c, d] for d < D and dL/db[c] for d = D.
    """
    if features.ndim != 2 or len(features) != len(probs):
        raise InputError(f"features must be [B, D] with B = {len(probs)} rows of probs, got {tuple(features.shape)}")
    residual = softmax_residual(probs, labels)
    augmented = torch.cat([features, features.new_ones(len(features), 1)], dim=1)
    return (residual.unsqueeze(2) * augmented.unsqueeze(1)).flatten(1)


def penultimate_gradients(weight: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient w.r.t. the final layer's input features, (probs - onehot) @ W, [B, D]."""
    if weight.ndim != 2 or weight.shape[0] != probs.shape[-1]:
        raise InputError(f"weight must be [C, D] with C = {probs.shape[-1]} classes of probs, got {tuple(weight.shape)}")
    return softmax_residual(probs, labels) @ weight


def mahalanobis_scores(
    x: torch.Tensor, means: torch.Tensor, labels: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """(x - mu_y)^T P (x - mu_y) per row, [B], with mu_y the mean of each row's label."""
    if x.ndim != 2 or means.ndim != 2 or means.shape[1] != x.shape[1]:
        raise InputError(f"x [B, K] and means [C, K] disagree: {tuple(x.shape)} vs {tuple(means.shape)}")
    if precision.shape != (x.shape[1], x.shape[1]):
        raise InputError(f"precision must be [{x.shape[1]}, {x.shape[1]}], got {tuple(precision.shape)}")
    _check_labels(labels, len(x), len(means))
    centred = x - means[labels]
    return ((centred @ precision) * centred).sum(dim=1)


def last_layer_scores(
    features: torch.Tensor,
    probs: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    precision: torch.Tensor,
) -> torch.Tensor:
    """Mahalanobis score of each sample's last-layer gradient: what a fused kernel must reproduce."""
    return mahalanobis_scores(last_layer_gradients(features, probs, labels), means, labels, precision)


def _check_probs_labels(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.ndim != 2:
        raise InputError(f"probs must be [B, C], got {tuple(probs.shape)}")
    _check_labels(labels, len(probs), probs.shape[1])


def _check_labels(labels: torch.Tensor, batch: int, num_classes: int) -> None:
    if labels.shape != (batch,) or labels.dtype != torch.long:
        raise InputError(f"labels must be int64 [{batch}], got {labels.dtype} {tuple(labels.shape)}")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
