"""Closed-form gradient and Mahalanobis references against autograd and explicit float64 maths.

Random tensors here only check algebra against a float64 reference; no detection claim rests on them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.errors import InputError
from kernels.reference import (
    last_layer_gradients,
    last_layer_scores,
    mahalanobis_scores,
    penultimate_gradients,
    softmax_residual,
)

B, D, C = 6, 5, 4


@pytest.fixture
def linear_batch():
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(D, C).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(C, D, generator=generator, dtype=torch.float64))
        layer.bias.copy_(torch.randn(C, generator=generator, dtype=torch.float64))
    features = torch.randn(B, D, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 3, 0])
    return layer, features, labels


def test_last_layer_gradients_match_autograd_per_sample(linear_batch):
    layer, features, labels = linear_batch
    probs = layer(features).softmax(dim=1).detach()
    closed_form = last_layer_gradients(features, probs, labels)
    assert closed_form.shape == (B, C * (D + 1))
    for i in range(B):
        layer.zero_grad()
        F.cross_entropy(layer(features[i : i + 1]), labels[i : i + 1]).backward()
        expected = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).flatten()
        torch.testing.assert_close(closed_form[i], expected, rtol=1e-12, atol=1e-12)


def test_penultimate_gradients_match_autograd(linear_batch):
    layer, features, labels = linear_batch
    features = features.clone().requires_grad_(True)
    logits = layer(features)
    # Samples do not interact, so the gradient of the summed loss row i is sample i's own gradient.
    F.cross_entropy(logits, labels, reduction="sum").backward()
    closed_form = penultimate_gradients(layer.weight.detach(), logits.softmax(dim=1).detach(), labels)
    torch.testing.assert_close(closed_form, features.grad, rtol=1e-12, atol=1e-12)


def test_softmax_residual_sums_to_zero_and_leaves_probs_untouched(linear_batch):
    layer, features, labels = linear_batch
    probs = layer(features).softmax(dim=1).detach()
    before = probs.clone()
    residual = softmax_residual(probs, labels)
    torch.testing.assert_close(residual.sum(dim=1), torch.zeros(B, dtype=torch.float64), atol=1e-15, rtol=0)
    assert torch.equal(probs, before)


def test_mahalanobis_scores_match_explicit_quadratic_forms():
    generator = torch.Generator().manual_seed(1)
    k = 7
    x = torch.randn(B, k, generator=generator, dtype=torch.float64)
    means = torch.randn(C, k, generator=generator, dtype=torch.float64)
    root = torch.randn(k, k, generator=generator, dtype=torch.float64)
    precision = root @ root.T + torch.eye(k, dtype=torch.float64)
    labels = torch.tensor([3, 0, 1, 1, 2, 0])
    scores = mahalanobis_scores(x, means, labels, precision)
    for i in range(B):
        d = x[i] - means[labels[i]]
        assert scores[i].item() == pytest.approx(float(d @ precision @ d), rel=1e-12)
    assert torch.all(mahalanobis_scores(means[labels], means, labels, precision) == 0)


def test_last_layer_scores_compose_gradients_and_mahalanobis(linear_batch):
    layer, features, labels = linear_batch
    probs = layer(features).softmax(dim=1).detach()
    k = C * (D + 1)
    generator = torch.Generator().manual_seed(2)
    means = torch.randn(C, k, generator=generator, dtype=torch.float64)
    precision = torch.eye(k, dtype=torch.float64) * 2
    gradients = last_layer_gradients(features, probs, labels)
    expected = 2 * ((gradients - means[labels]) ** 2).sum(dim=1)
    torch.testing.assert_close(last_layer_scores(features, probs, labels, means, precision), expected)


def test_shape_and_label_errors_name_the_tensor(linear_batch):
    layer, features, labels = linear_batch
    probs = layer(features).softmax(dim=1).detach()
    with pytest.raises(InputError, match="labels must lie in"):
        last_layer_gradients(features, probs, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(InputError, match="labels must be int64"):
        last_layer_gradients(features, probs, labels.float())
    with pytest.raises(InputError, match="features must be"):
        last_layer_gradients(features[:3], probs, labels)
    with pytest.raises(InputError, match="weight must be"):
        penultimate_gradients(layer.weight.detach().T, probs, labels)
    with pytest.raises(InputError, match="precision must be"):
        mahalanobis_scores(features, features[:C], labels, torch.eye(D + 1, dtype=torch.float64))
