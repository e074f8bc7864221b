"""Streaming moments, shrinkage, safe inversion, tied Gaussians and thresholds.

Moments and shrinkage are checked on real 8x8 digits pixels against two-pass numpy and
scikit-learn; random tensors appear only where an algebraic identity is being checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.covariance import ledoit_wolf, oas
from sklearn.datasets import load_digits

from calibration.gaussian import TiedGaussian, fit_tied_gaussian
from calibration.moments import ClassMoments
from calibration.precision import safe_precision, shrink
from calibration.threshold import threshold_at_fpr, threshold_for_accuracy
from edge_runtime.errors import ConfigError, InputError, StateError
from kernels.reference import last_layer_gradients

UNEVEN_BATCHES = (1, 7, 60, 3, 250, 31, 400, 2)


@pytest.fixture(scope="module")
def digits():
    """Digits pixels (float64 [N, 64]) sorted so early batches miss some classes entirely."""
    bunch = load_digits()
    order = np.argsort(bunch.target, kind="stable")
    return bunch.data[order].astype(np.float64), bunch.target[order].astype(np.int64)


def stream(x: np.ndarray, labels: np.ndarray, num_classes: int, fourth_moments: bool = True) -> ClassMoments:
    moments = ClassMoments(num_classes, x.shape[1], fourth_moments=fourth_moments)
    start = 0
    for size in UNEVEN_BATCHES * (len(x) // sum(UNEVEN_BATCHES) + 1):
        if start >= len(x):
            break
        moments.update(torch.from_numpy(x[start : start + size]), torch.from_numpy(labels[start : start + size]))
        start += size
    return moments


def pooled_centred(x: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Two-pass reference: every sample minus its class mean."""
    means = np.stack([x[labels == c].mean(axis=0) for c in range(num_classes)])
    return x - means[labels]


def test_streamed_moments_match_two_pass_reference(digits):
    x, labels = digits
    x = x + 1e4  # a large common offset: naive sum-of-squares accumulation would lose digits
    moments = stream(x, labels, 10)
    centred = pooled_centred(x, labels, 10)
    assert moments.counts.tolist() == np.bincount(labels).tolist()
    np.testing.assert_allclose(moments.means.numpy(), np.stack([x[labels == c].mean(0) for c in range(10)]), rtol=1e-13)
    np.testing.assert_allclose(moments.covariance.numpy(), centred.T @ centred / len(x), atol=1e-9)
    fourth = ((centred**2).sum(axis=1) ** 2).sum()
    assert moments.fourth_moment_sum == pytest.approx(fourth, rel=1e-9)


def test_pooled_only_moments_give_the_same_covariance_but_no_ledoit_wolf(digits):
    x, labels = digits
    full, pooled = stream(x, labels, 10), stream(x, labels, 10, fourth_moments=False)
    torch.testing.assert_close(pooled.covariance, full.covariance, rtol=1e-12, atol=1e-10)
    with pytest.raises(StateError, match="fourth_moments=False"):
        shrink(pooled, "ledoit_wolf", 0.0)


def test_state_dict_resumes_the_stream_exactly(digits):
    x, labels = digits
    half = len(x) // 2
    first = stream(x[:half], labels[:half], 10)
    resumed = ClassMoments(10, 64)
    resumed.load_state_dict(first.state_dict())
    resumed.update(torch.from_numpy(x[half:]), torch.from_numpy(labels[half:]))
    reference = stream(x, labels, 10)
    torch.testing.assert_close(resumed.covariance, reference.covariance, rtol=1e-12, atol=1e-10)
    assert resumed.fourth_moment_sum == pytest.approx(reference.fourth_moment_sum, rel=1e-12)
    with pytest.raises(StateError, match="'scatter' has shape"):
        ClassMoments(10, 64, fourth_moments=False).load_state_dict(first.state_dict())


def test_bad_batches_are_rejected_with_the_tensor_named():
    moments = ClassMoments(3, 4)
    with pytest.raises(InputError, match=r"x must be \[B, 4\]"):
        moments.update(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(InputError, match="labels must lie in"):
        moments.update(torch.zeros(2, 4), torch.tensor([0, 3]))
    with pytest.raises(InputError, match="non-finite"):
        moments.update(torch.full((1, 4), float("nan")), torch.tensor([1]))
    with pytest.raises(StateError, match="no samples"):
        _ = moments.covariance


@pytest.mark.parametrize("method, reference", [("ledoit_wolf", ledoit_wolf), ("oas", oas)])
@pytest.mark.parametrize("subset", [120, 1797])
def test_shrinkage_matches_sklearn_on_pooled_centred_data(digits, subset, method, reference):
    rng = np.random.default_rng(subset)
    index = np.sort(rng.choice(len(digits[0]), subset, replace=False))
    x, labels = digits[0][index], digits[1][index]
    expected, expected_intensity = reference(pooled_centred(x, labels, 10))
    assert 0.0 < expected_intensity < 1.0
    shrunk = shrink(stream(x, labels, 10), method, ridge=0.5)
    np.testing.assert_allclose(shrunk.numpy(), expected, atol=1e-9)


def test_ridge_adds_a_fraction_of_the_mean_variance(digits):
    moments = stream(*digits, 10)
    covariance = moments.covariance
    expected = covariance + 0.1 * torch.diagonal(covariance).mean() * torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(shrink(moments, "ridge", 0.1), expected)
    with pytest.raises(ConfigError, match="shrinkage must be one of"):
        shrink(moments, "graphical_lasso", 0.1)


def test_safe_precision_inverts_a_well_conditioned_covariance_by_cholesky(digits):
    covariance = shrink(stream(*digits, 10), "ledoit_wolf", 0.0)
    precision, how = safe_precision(covariance.float())
    assert how == "cholesky" and precision.dtype == torch.float64
    torch.testing.assert_close(precision @ covariance, torch.eye(64, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def digit_gradients(digits):
    """Last-layer gradients of a fixed linear softmax over digits pixels, with true labels."""
    x, labels = digits
    features = torch.from_numpy(x[:, ::4])  # 16 pixels: D = 16, C = 10, K = 170
    generator = torch.Generator().manual_seed(0)
    logits = features @ torch.randn(16, 10, generator=generator, dtype=torch.float64) * 0.1
    labels = torch.from_numpy(labels)
    return last_layer_gradients(features, logits.softmax(dim=1), labels), labels


def test_gradient_covariance_is_singular_and_takes_the_pinv_path(digit_gradients):
    gradients, labels = digit_gradients
    moments = ClassMoments(10, gradients.shape[1])
    moments.update(gradients, labels)
    covariance = shrink(moments, "ridge", 0.0)
    precision, how = safe_precision(covariance)
    assert how == "pinv"
    assert torch.isfinite(precision).all()
    # Moore-Penrose identities of a true pseudo-inverse, in relative Frobenius norm.
    assert (covariance @ precision @ covariance - covariance).norm() < 1e-9 * covariance.norm()
    assert (precision @ covariance @ precision - precision).norm() < 1e-6 * precision.norm()
    # Summing a gradient over classes gives zero: that direction must carry no weight.
    null = torch.zeros(10, 17, dtype=torch.float64)
    null[:, 0] = 1.0
    assert (precision @ null.flatten()).abs().max() < 1e-6 * precision.abs().max()
    gaussian = fit_tied_gaussian(moments, "ridge", 0.0)
    assert gaussian.inverse == "pinv"
    scores, _closest = gaussian.min_score(gradients.float())
    assert torch.isfinite(scores).all() and (scores >= 0).all()


def test_shrinkage_makes_the_gradient_covariance_invertible(digit_gradients):
    gradients, labels = digit_gradients
    moments = ClassMoments(10, gradients.shape[1])
    moments.update(gradients, labels)
    for method in ("ledoit_wolf", "oas"):
        assert fit_tied_gaussian(moments, method, 0.0).inverse == "cholesky"


def gaussian_classes(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated random Gaussian classes in 6-D (algebra checks only)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(100)
    centres = 4 * torch.randn(3, 6, generator=generator, dtype=torch.float64)
    x = torch.randn(300, 6, generator=generator, dtype=torch.float64) + centres[labels]
    return x, labels


def fitted(x: torch.Tensor, labels: torch.Tensor, shrinkage: str = "ridge", ridge: float = 0.0) -> TiedGaussian:
    moments = ClassMoments(3, x.shape[1])
    moments.update(x, labels)
    return fit_tied_gaussian(moments, shrinkage, ridge)


def test_mahalanobis_score_is_invariant_under_an_affine_map():
    x, labels = gaussian_classes(0)
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(6, 6, generator=generator, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    offset = torch.randn(6, generator=generator, dtype=torch.float64) * 10
    queries, query_labels = gaussian_classes(2)
    plain = fitted(x, labels).score(queries, query_labels)
    mapped = fitted(x @ matrix.T + offset, labels).score(queries @ matrix.T + offset, query_labels)
    torch.testing.assert_close(mapped, plain, rtol=1e-3, atol=1e-3)


def test_score_is_zero_at_a_class_mean_and_min_score_finds_the_closest_class():
    x, labels = gaussian_classes(0)
    gaussian = fitted(x, labels, "ledoit_wolf")
    classes = torch.arange(3)
    assert torch.all(gaussian.score(gaussian.means, classes) == 0)
    at_means, closest = gaussian.min_score(gaussian.means)
    assert torch.all(at_means == 0) and torch.equal(closest, classes)
    every_class = torch.stack([gaussian.score(x, torch.full((300,), c)) for c in range(3)], dim=1)
    scores, closest = gaussian.min_score(x)
    torch.testing.assert_close(scores, every_class.min(dim=1).values)
    assert torch.equal(closest, every_class.argmin(dim=1))


def test_tied_gaussian_round_trips_through_safetensors(tmp_path):
    x, labels = gaussian_classes(0)
    gaussian = fitted(x, labels, "oas")
    state = gaussian.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    strings = {k: v for k, v in state.items() if isinstance(v, str)}
    save_file(tensors, tmp_path / "gaussian.safetensors", metadata=strings)
    with safe_open(tmp_path / "gaussian.safetensors", framework="pt") as handle:
        loaded = {key: handle.get_tensor(key) for key in handle.keys()} | handle.metadata()
    restored = TiedGaussian.from_state_dict(loaded)
    assert (restored.method, restored.inverse) == ("oas", "cholesky")
    assert torch.equal(restored.min_score(x.float())[0], gaussian.min_score(x.float())[0])
    with pytest.raises(StateError, match="lacks precision"):
        TiedGaussian.from_state_dict({k: v for k, v in state.items() if k != "precision"})


def test_fit_refuses_classes_without_samples():
    x, labels = gaussian_classes(0)
    moments = ClassMoments(4, 6)
    moments.update(x, labels)
    with pytest.raises(StateError, match=r"classes \[3\] have no samples"):
        fit_tied_gaussian(moments, "ledoit_wolf", 0.0)


def test_threshold_holds_the_false_alarm_rate_on_held_out_samples():
    rng = np.random.default_rng(0)
    known, held_out = rng.gamma(2.0, size=2000), rng.gamma(2.0, size=200_000)
    threshold = threshold_at_fpr(torch.from_numpy(known), 0.05)
    assert np.mean(known > threshold) <= 0.05
    assert abs(np.mean(held_out > threshold) - 0.05) < 0.015


def test_threshold_is_conservative_on_average_for_small_samples():
    # Uniform scores: P(fresh > t) = 1 - t exactly. With n = 95 and a 10% target the conformal
    # order statistic (the 87th) averages 9/96 false alarms; the plain empirical quantile (the
    # 86th) would average 10/96, above the target.
    rng = np.random.default_rng(1)
    fresh_alarm_rates = [1.0 - threshold_at_fpr(rng.random(95), 0.1) for _ in range(4000)]
    assert np.mean(fresh_alarm_rates) == pytest.approx(9 / 96, abs=0.002)


@pytest.mark.parametrize(
    ("scores", "target", "message"),
    [
        (np.array([]), 0.05, "known_scores is empty"),
        (np.array([1.0, np.nan] * 20), 0.05, "NaN"),
        (np.arange(10.0), 0.05, "need at least 19"),
        (np.arange(10.0), 1.5, "target_fpr must lie in"),
    ],
)
def test_threshold_rejects_unusable_input(scores, target, message):
    with pytest.raises(ValueError, match=message):
        threshold_at_fpr(scores, target)


def _router_accuracy(t, known, correct, pool, share, prior):
    """A(t) of threshold_for_accuracy, written out directly."""
    novel_above = 1.0 - (np.mean(pool <= t) - (1.0 - share) * np.mean(known <= t)) / share
    return (1.0 - prior) * np.mean(correct & (known <= t)) + prior * np.clip(novel_above, 0.0, 1.0)


def _gaussian_mixture(seed: int, n: int = 20_000, share: float = 0.7):
    """Known scores N(0, 1); a pool with `share` novel scores N(2, 1)."""
    rng = np.random.default_rng(seed)
    known = rng.normal(0.0, 1.0, n)
    novel = rng.random(n) < share
    pool = np.where(novel, rng.normal(2.0, 1.0, n), rng.normal(0.0, 1.0, n))
    return known, pool


def test_accuracy_threshold_maximises_the_estimate_over_every_candidate():
    known, pool = _gaussian_mixture(2, n=300)
    correct = np.random.default_rng(3).random(300) < 0.9
    t = threshold_for_accuracy(known, correct, pool, 0.7, 0.1)
    best = max(_router_accuracy(c, known, correct, pool, 0.7, 0.1) for c in np.concatenate([known, pool]))
    assert _router_accuracy(t, known, correct, pool, 0.7, 0.1) == pytest.approx(best, abs=1e-12)


def test_accuracy_threshold_finds_the_bayes_threshold_of_a_known_mixture():
    # Known N(0, 1) against novel N(2, 1) at prior 0.1: 0.9 phi(t) = 0.1 phi(t - 2), so t = 1 + ln(9) / 2.
    known, pool = _gaussian_mixture(4)
    t = threshold_for_accuracy(torch.from_numpy(known), np.ones(len(known), bool), torch.from_numpy(pool), 0.7, 0.1)
    assert t == pytest.approx(1.0 + np.log(9.0) / 2.0, abs=0.15)
    # A likelier novel class is worth more false alarms: at prior 0.5 the threshold is the midpoint 1.
    assert threshold_for_accuracy(known, np.ones(len(known), bool), pool, 0.7, 0.5) == pytest.approx(1.0, abs=0.15)


def test_accuracy_threshold_flags_what_the_classifier_gets_wrong_anyway():
    # Every known sample scored above 0 is misclassified: flagging it costs nothing, so t drops to 0.
    known, pool = _gaussian_mixture(5)
    t = threshold_for_accuracy(known, known < 0.0, pool, 0.7, 0.1)
    assert t == pytest.approx(0.0, abs=0.1)


@pytest.mark.parametrize(
    ("known", "correct", "share", "prior", "message"),
    [
        (np.array([]), np.array([], bool), 0.5, 0.1, "known_scores is empty"),
        (np.array([1.0, np.nan]), np.ones(2, bool), 0.5, 0.1, "known_scores holds 1 NaN"),
        (np.arange(4.0), np.ones(3, bool), 0.5, 0.1, "known_correct must match"),
        (np.arange(4.0), np.ones(4, bool), 1.0, 0.1, "novel_share must lie in"),
        (np.arange(4.0), np.ones(4, bool), 0.5, 0.0, "novel_prior must lie in"),
    ],
)
def test_accuracy_threshold_rejects_unusable_input(known, correct, share, prior, message):
    with pytest.raises(ValueError, match=message):
        threshold_for_accuracy(known, correct, np.arange(5.0), share, prior)
