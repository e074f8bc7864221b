"""DROCC / DROCC-LF: annulus projections against float64 references, the adversarial search, the
synthetic sets, and one-class detection on real digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import ONE_CLASS_DIGIT
from edge_runtime.config import DROCCConfig, config_from_dict, evolve_config
from edge_runtime.detectors.base import Observations
from edge_runtime.detectors.drocc import (DROCCDetector, adversarial_negatives, input_gradient_weights, learning_rate,
                                          mlp, project_annulus, project_weighted_annulus)
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.metrics import ood_metrics
from edge_runtime.one_class import observations_of
from edge_runtime.synthetic import SINE_X_RANGE, sine_manifold, sphere

NORMAL_DIGIT = ONE_CLASS_DIGIT  # the class one_class_digits trains on
DIGITS_CONFIG = DROCCConfig(radius=4.0, epochs=12, ce_epochs=2, ascent_steps=5, projection_interval=5,
                            batch_size=64, width=8)


def _weighted_norms(h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights * h.square()).sum(dim=1).sqrt()


def _nearest_on_ellipse(point: np.ndarray, weights: np.ndarray, level: float, samples: int = 200_000) -> float:
    """Brute force: the smallest Euclidean distance from `point` to {||y||_S = level} in 2-D, float64."""
    angles = np.linspace(0, 2 * np.pi, samples, endpoint=False)
    boundary = np.stack([level * np.cos(angles) / np.sqrt(weights[0]), level * np.sin(angles) / np.sqrt(weights[1])], 1)
    return float(np.linalg.norm(boundary - point, axis=1).min())


def test_project_annulus_clamps_norms_and_keeps_directions():
    h = torch.randn(200, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 200).view(-1, 1, 1, 1)
    projected = project_annulus(h, radius=2.0, gamma=2.0)
    norms = projected.flatten(1).norm(dim=1)
    assert bool(((norms >= 2.0 - 1e-5) & (norms <= 4.0 + 1e-5)).all())
    cosine = torch.nn.functional.cosine_similarity(projected.flatten(1), h.flatten(1), dim=1)
    assert torch.allclose(cosine, torch.ones(200), atol=1e-5)
    inside = (h.flatten(1).norm(dim=1) >= 2.0) & (h.flatten(1).norm(dim=1) <= 4.0)
    assert torch.equal(projected[inside], h[inside])


def test_weighted_projection_is_the_nearest_point_of_the_weighted_annulus():
    generator = torch.Generator().manual_seed(1)
    h = (torch.randn(40, 2, generator=generator) * 3).double()
    weights = (torch.rand(40, 2, generator=generator) * 3 + 0.05).double()
    radius, gamma = 1.0, 1.5
    projected = project_weighted_annulus(h, weights, radius, gamma)
    norms, projected_norms = _weighted_norms(h, weights), _weighted_norms(projected, weights)
    assert bool(((projected_norms >= radius - 1e-9) & (projected_norms <= gamma * radius + 1e-9)).all())
    moved = 0
    for row in range(len(h)):
        if radius <= float(norms[row]) <= gamma * radius:
            assert torch.equal(projected[row], h[row])
            continue
        level = gamma * radius if float(norms[row]) > gamma * radius else radius
        best = _nearest_on_ellipse(h[row].numpy(), weights[row].numpy(), level)
        assert float((projected[row] - h[row]).norm()) == pytest.approx(best, abs=1e-4)
        moved += 1
    assert moved > 20  # both sides of the annulus were exercised


def test_weighted_projection_with_unit_weights_is_the_euclidean_one():
    h = torch.randn(50, 7, generator=torch.Generator().manual_seed(2)).double() * 4
    assert torch.allclose(project_weighted_annulus(h, torch.ones_like(h), 2.0, 2.0), project_annulus(h, 2.0, 2.0),
                          atol=1e-9)
    with pytest.raises(InputError, match="positive"):
        project_weighted_annulus(h, torch.zeros_like(h), 1.0, 2.0)


def test_input_gradient_weights_have_mean_one_and_follow_the_gradient():
    network = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False), torch.nn.Flatten(0))
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([[3.0, -1.0, 0.0]]))
    weights = input_gradient_weights(network, torch.randn(4, 3))
    assert torch.allclose(weights, torch.tensor([[2.25, 0.75, 1e-3]]).expand(4, 3))


@pytest.mark.parametrize("feature_weighted", [False, True])
def test_adversarial_negatives_lie_in_the_annulus(feature_weighted):
    torch.manual_seed(0)
    network = mlp(2, 16)
    positives = sine_manifold(64, seed=0)
    config = DROCCConfig(radius=0.3, gamma=2.0, ascent_steps=7, ascent_step_size=0.05, projection_interval=3)
    weights = input_gradient_weights(network, positives) if feature_weighted else None
    negatives = adversarial_negatives(network, positives, config, weights, torch.Generator().manual_seed(0))
    offsets = negatives - positives
    norms = offsets.norm(dim=1) if weights is None else _weighted_norms(offsets, weights)
    assert bool(((norms >= 0.3 - 1e-4) & (norms <= 0.6 + 1e-4)).all())
    assert network.training  # the search restores the mode it found


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_search_batchnorm_decides_whose_statistics_the_search_reads(mode, one_class_digits):
    torch.manual_seed(0)
    network = DROCCDetector((1, 8, 8), DIGITS_CONFIG).network[1]
    positives = one_class_digits[0][:32]
    network.train()
    network(positives)  # running statistics of the positives only
    stored = [module.running_mean.clone() for module in network.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    config = evolve_config(DIGITS_CONFIG, search_batchnorm=mode)
    negatives = adversarial_negatives(network, positives, config, None, torch.Generator().manual_seed(0))
    after = [module.running_mean for module in network.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    changed = any(not torch.equal(before, now) for before, now in zip(stored, after))
    assert changed == (mode == "train")  # the authors' handling folds the candidates into the stored statistics
    norms = (negatives - positives).flatten(1).norm(dim=1)
    assert bool(((norms >= config.radius - 1e-3) & (norms <= config.gamma * config.radius + 1e-3)).all())
    assert network.training


def test_learning_rate_follows_the_papers_steps():
    config = DROCCConfig(lr=1.0, epochs=12, ce_epochs=2)
    assert [learning_rate(config, e) for e in range(12)] == [1.0] * 6 + [0.1] * 4 + [0.01] * 2


def test_config_rejects_ce_epochs_that_leave_no_adversarial_epoch():
    with pytest.raises(ConfigError, match="ce_epochs"):
        config_from_dict({"detector": {"drocc": {"epochs": 5, "ce_epochs": 5}}})


def test_synthetic_sets_lie_where_they_should():
    points = sine_manifold(500, seed=3, displacement=0.4)
    assert torch.allclose((points[:, 1] - torch.sin(points[:, 0])).abs(), torch.full((500,), 0.4), atol=1e-5)
    assert float(points[:, 0].min()) >= SINE_X_RANGE[0] and float(points[:, 0].max()) <= SINE_X_RANGE[1]
    assert torch.allclose(sphere(100, 5, 1.6, seed=0).norm(dim=1), torch.full((100,), 1.6))


@pytest.fixture(scope="module")
def fitted(one_class_digits) -> DROCCDetector:
    return DROCCDetector((1, 8, 8), DIGITS_CONFIG, "drocc", seed=0).fit(observations_of(one_class_digits[0]))


def test_drocc_detects_other_digits_one_class(fitted, one_class_digits):
    _, images, labels = one_class_digits
    scores = fitted.score(observations_of(images)).numpy()
    normal = labels == NORMAL_DIGIT
    assert ood_metrics(scores[normal], scores[~normal])["auroc"] > 0.75


def test_scores_are_per_sample(fitted, one_class_digits):
    images = one_class_digits[1][:40]
    alone = torch.cat([fitted.score(observations_of(images[i:i + 1])) for i in range(5)])
    assert torch.allclose(alone, fitted.score(observations_of(images))[:5], atol=1e-5)


def test_state_dict_round_trip_and_misuse(fitted, one_class_digits):
    copy = DROCCDetector((1, 8, 8), DIGITS_CONFIG, "drocc", seed=3)
    copy.load_state_dict(fitted.state_dict())
    batch = observations_of(one_class_digits[1][:30])
    assert torch.allclose(copy.score(batch), fitted.score(batch))
    with pytest.raises(StateError, match="'drocc'"):
        DROCCDetector((1, 8, 8), DIGITS_CONFIG, "drocc_lf").load_state_dict(fitted.state_dict())
    with pytest.raises(StateError, match="not fitted"):
        DROCCDetector((1, 8, 8), DIGITS_CONFIG).score(batch)
    with pytest.raises(ConfigError, match="variant"):
        DROCCDetector((1, 8, 8), DIGITS_CONFIG, "drocc_xx")
    with pytest.raises(InputError, match="no images"):
        fitted.score(Observations(None, torch.zeros(2, 1), torch.zeros(2, 1)))
    with pytest.raises(InputError, match=r"\(1, 8, 8\)"):
        fitted.score(observations_of(torch.rand(2, 3, 8, 8)))


def test_drocc_lf_detector_trains_on_digits_with_stand_in_negatives(one_class_digits):
    detector = DROCCDetector((1, 8, 8), evolve_config(DIGITS_CONFIG, epochs=6, lf_negatives=16), "drocc_lf")
    detector.fit(observations_of(one_class_digits[0]))
    scores = detector.score(observations_of(one_class_digits[1])).numpy()
    assert np.isfinite(scores).all() and scores.std() > 0
    assert not math.isnan(ood_metrics(scores[one_class_digits[2] == NORMAL_DIGIT], scores[one_class_digits[2] != NORMAL_DIGIT])["auroc"])
