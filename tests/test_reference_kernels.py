"""Closed-form gradient and Mahalanobis references against autograd and explicit float64 maths, and
the whitened precision variants of the closed-form scoring path on real digits gradients.

Random tensors here only check algebra against a float64 reference; no detection or accuracy claim
rests on them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from classifier_fixture import fitted_digits_moments
from torch import nn

from calibration.gaussian import TiedGaussian, fit_tied_gaussian
from edge_runtime.errors import InputError
from kernels.reference import (
    closed_form_scores,
    kernel_order,
    last_layer_gradients,
    last_layer_scores,
    mahalanobis_scores,
    penultimate_gradients,
    prepare_last_layer_stats,
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


# --- Whitened precision variants on real digits -------------------------------------------------------------------

# Largest relative errors stated in kernels/triton_fused.py for the digits case (Ledoit-Wolf), with 3x room.
STATED_MAX_ERROR = {"fp16w": 5e-4, "bf16w": 4e-3}


@pytest.fixture(scope="module")
def digits_fit(single_thread):
    """(test features, softmax outputs, moments) of the shared digits case; each test fits its own shrinkage:
    Ledoit-Wolf (condition 1.7e3), ridge 1e-3 (condition 2e5), or ridge 0, a singular covariance's pseudo-inverse."""
    features, logits, moments = fitted_digits_moments()
    return features, logits.softmax(dim=1), moments


def _closed_form_error(features: torch.Tensor, probs: torch.Tensor, gaussian: TiedGaussian,
                       variant: str) -> torch.Tensor:
    """Relative error per sample of the closed-form path in `variant` vs float64, predicted labels."""
    labels = probs.argmax(dim=1)
    reference = last_layer_scores(features.double(), probs.double(), labels, gaussian.means.double(),
                                  gaussian.precision.double())
    stats = prepare_last_layer_stats(gaussian.means, gaussian.precision, variant)
    return (closed_form_scores(features, probs, labels, stats).double() - reference).abs() / reference.abs()


@pytest.mark.parametrize("variant", list(STATED_MAX_ERROR))
def test_whitened_closed_form_matches_float64_on_real_digits(digits_fit, variant):
    features, probs, moments = digits_fit
    error = _closed_form_error(features, probs, fit_tied_gaussian(moments, "ledoit_wolf", 1e-3), variant)
    assert error.max() <= 3 * STATED_MAX_ERROR[variant], f"{variant}: max relative error {error.max():.2e}"


@pytest.mark.parametrize("variant", list(STATED_MAX_ERROR))
def test_whitened_stats_hold_a_lower_cholesky_factor_of_p(digits_fit, variant):
    _, _, moments = digits_fit
    gaussian = fit_tied_gaussian(moments, "ledoit_wolf", 1e-3)
    stats = prepare_last_layer_stats(gaussian.means, gaussian.precision, variant)
    (factor,) = stats.precision_parts
    assert factor.dtype == {"fp16w": torch.float16, "bf16w": torch.bfloat16}[variant]
    assert torch.all(factor.triu(1) == 0) and factor.abs().max() <= 1
    root = stats.precision_scale ** 0.5
    assert root == 2.0 ** round(torch.log2(torch.tensor(root)).item())  # scaling by it is exact
    order = kernel_order(9, 64)
    precision = gaussian.precision.double()[order][:, order]
    restored = factor.double() @ factor.double().T * stats.precision_scale
    unit = {"fp16w": 2.0 ** -11, "bf16w": 2.0 ** -8}[variant]
    torch.testing.assert_close(restored, (precision + precision.T) / 2, rtol=0,
                               atol=4 * unit * float(precision.abs().max()))


def test_whitened_variants_refuse_a_singular_precision_clearly(digits_fit):
    _, _, moments = digits_fit
    gaussian = fit_tied_gaussian(moments, "ridge", 0.0)
    assert gaussian.inverse == "pinv"  # the covariance of last-layer gradients is singular
    for variant in STATED_MAX_ERROR:
        with pytest.raises(InputError, match=f"'{variant}'.*not positive definite.*fp32, .*bf16x3"):
            prepare_last_layer_stats(gaussian.means, gaussian.precision, variant)
    prepare_last_layer_stats(gaussian.means, gaussian.precision, "fp16")  # the plain variants take it


@pytest.mark.parametrize(("whitened", "plain", "gain"), [("fp16w", "fp16", 4), ("bf16w", "bf16", 2)])
def test_whitening_cuts_the_rounding_error_of_an_ill_conditioned_precision(digits_fit, whitened, plain, gain):
    """Ridge precision, condition 2e5: rounding P leaks its large eigenvalues, rounding its factor much less."""
    features, probs, moments = digits_fit
    gaussian = fit_tied_gaussian(moments, "ridge", 1e-3)
    whitened_error = _closed_form_error(features, probs, gaussian, whitened).max()
    plain_error = _closed_form_error(features, probs, gaussian, plain).max()
    assert gain * whitened_error < plain_error, f"{whitened} {whitened_error:.1e} vs {plain} {plain_error:.1e}"
