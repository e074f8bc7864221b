"""Baseline detectors on real data: a tiny MLP trained on digits 0-8, digit 9 held out as novel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from classifier_fixture import known_digits, train_digit_classifier
from edge_runtime.config import DetectorConfig
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.detectors.base import Detector, Observations
from edge_runtime.detectors.energy import EnergyDetector
from edge_runtime.detectors.feature_mahalanobis import FeatureMahalanobisDetector
from edge_runtime.detectors.gradnorm import GradNormDetector
from edge_runtime.detectors.knn import KNNDetector
from edge_runtime.detectors.max_logit import MaxLogitDetector
from edge_runtime.detectors.msp import MSPDetector
from edge_runtime.detectors.react import ReActDetector
from edge_runtime.detectors.registry import build_static_detector
from edge_runtime.detectors.vim import ViMDetector
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.metrics import ood_metrics


@pytest.fixture(scope="module")
def digits_setup():
    """(classifier, known training observations + labels, known test observations, novel test observations)."""
    known_train, _ = known_digits(load_digits_split("train"))
    known_test, novel_test = known_digits(load_digits_split("test"))
    classifier = train_digit_classifier(known_train, steps=300)

    def observe(images: np.ndarray) -> Observations:
        pixels = to_tensor(images)
        with torch.no_grad():
            features, logits = classifier.embed(pixels)
        return Observations(pixels, features, logits)

    train_labels = torch.from_numpy(known_train.labels)
    return classifier, observe(known_train.images), train_labels, observe(known_test.images), observe(novel_test.images)


DETECTORS = {
    "msp": lambda classifier: MSPDetector(classifier),
    "max_logit": lambda classifier: MaxLogitDetector(classifier),
    "energy": lambda classifier: EnergyDetector(classifier),
    "feature_mahalanobis": lambda classifier: FeatureMahalanobisDetector(classifier),
    "feature_mahalanobis_oas": lambda classifier: FeatureMahalanobisDetector(classifier, shrinkage="oas"),
    "knn": lambda classifier: KNNDetector(classifier, k=10),
    "react": lambda classifier: ReActDetector(classifier),
    "vim": lambda classifier: ViMDetector(classifier),
    "gradnorm": lambda classifier: GradNormDetector(classifier),
}


@pytest.mark.parametrize("key", sorted(DETECTORS))
def test_baseline_detects_the_held_out_digit(digits_setup, key):
    classifier, train, labels, known, novel = digits_setup
    detector: Detector = DETECTORS[key](classifier).fit(train, labels)
    assert detector.name == key.removesuffix("_oas")
    known_scores, novel_scores = detector.score(known), detector.score(novel)
    assert known_scores.shape == (len(known),) and known_scores.dtype == torch.float32
    assert torch.equal(detector.score_protocol(novel, "homogeneous_batches"), novel_scores)
    assert ood_metrics(known_scores.numpy(), novel_scores.numpy())["auroc"] > 0.6


def test_msp_max_logit_and_energy_follow_their_definitions(digits_setup):
    classifier, _train, _labels, known, _novel = digits_setup
    msp = MSPDetector(classifier).score(known)
    assert torch.all((msp >= -1.0) & (msp <= -1.0 / classifier.num_classes + 1e-6))
    probs = known.logits.softmax(dim=1)
    assert torch.equal(msp.argsort(), (-probs.max(dim=1).values).argsort())
    torch.testing.assert_close(MaxLogitDetector(classifier).score(known), -known.logits.max(dim=1).values, atol=0, rtol=0)
    # Adding a constant to every logit moves the max logit and the energy, not the softmax.
    shifted = Observations(known.images, known.features, known.logits + 3.0)
    torch.testing.assert_close(MSPDetector(classifier).score(shifted), msp)
    torch.testing.assert_close(MaxLogitDetector(classifier).score(shifted), MaxLogitDetector(classifier).score(known) - 3.0)
    hot = EnergyDetector(classifier, temperature=1000.0).score(known)
    # At a high temperature the energy tends to -T log C - mean(logits).
    torch.testing.assert_close(hot, -1000.0 * np.log(classifier.num_classes) - known.logits.mean(dim=1), atol=0.05, rtol=0)


def test_knn_score_is_the_kth_neighbour_distance_whatever_the_chunking(digits_setup):
    classifier, train, labels, _known, novel = digits_setup
    bank = torch.nn.functional.normalize(train.features, dim=1).double()
    queries = torch.nn.functional.normalize(novel.features, dim=1).double()
    expected = torch.cdist(queries, bank).sort(dim=1).values[:, 6].float()
    for chunk_size in (1, 7, 10_000):
        scores = KNNDetector(classifier, k=7, chunk_size=chunk_size).fit(train, labels).score(novel)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_feature_mahalanobis_scores_the_nearest_class_gaussian(digits_setup):
    classifier, train, labels, known, _novel = digits_setup
    detector = FeatureMahalanobisDetector(classifier, shrinkage="ridge", ridge=0.1).fit(train, labels)
    gaussian = detector.gaussian
    per_class = torch.stack(
        [gaussian.score(known.features, torch.full((len(known),), c)) for c in range(classifier.num_classes)], dim=1
    )
    torch.testing.assert_close(detector.score(known), per_class.min(dim=1).values, rtol=1e-4, atol=1e-4)


def test_gradnorm_is_the_l1_norm_of_the_final_weights_kl_gradient(digits_setup):
    """Against autograd, one sample at a time, on the official loss: cross-entropy to uniform targets."""
    classifier, _train, _labels, known, novel = digits_setup
    layer = classifier.final_linear
    samples = Observations.concat([known.select(torch.arange(5)), novel.select(torch.arange(5))])
    for temperature in (1.0, 2.5):
        expected = []
        for features in samples.features:
            weight = layer.weight.detach().double().clone().requires_grad_()
            logits = torch.nn.functional.linear(features.double(), weight, layer.bias.detach().double())
            uniform = torch.full_like(logits, 1.0 / len(logits))
            (-(uniform * (logits / temperature).log_softmax(dim=0)).sum()).backward()
            expected.append(-weight.grad.abs().sum())
        scores = GradNormDetector(classifier, temperature=temperature).score(samples)
        torch.testing.assert_close(scores, torch.stack(expected).float(), rtol=1e-4, atol=1e-6)


def test_react_clips_at_the_known_percentile_then_takes_the_energy(digits_setup):
    classifier, train, labels, known, novel = digits_setup
    layer = classifier.final_linear
    detector = ReActDetector(classifier, percentile=90).fit(train, labels)
    assert detector.clip == pytest.approx(float(np.percentile(train.features.double().numpy(), 90)), rel=1e-6)
    clipped = novel.features.double().clamp(max=detector.clip)
    logits = clipped @ layer.weight.detach().double().T + layer.bias.detach().double()
    torch.testing.assert_close(detector.score(novel), -torch.logsumexp(logits, dim=1).float(), rtol=1e-5, atol=1e-5)
    # Clipped at the largest known activation, the known training samples keep their logits: plain energy.
    unclipped = ReActDetector(classifier, percentile=100).fit(train, labels)
    torch.testing.assert_close(unclipped.score(train), EnergyDetector(classifier).score(train), rtol=1e-5, atol=1e-4)


def test_vim_matches_the_papers_formula_in_float64(digits_setup):
    classifier, train, labels, known, novel = digits_setup
    dim = 20
    detector = ViMDetector(classifier, dim=dim).fit(train, labels)
    weight = classifier.final_linear.weight.detach().double().numpy()
    bias = classifier.final_linear.bias.detach().double().numpy()
    origin = -np.linalg.pinv(weight) @ bias
    centred = train.features.double().numpy() - origin
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(centred))
    null_space = eigenvectors[:, np.argsort(-eigenvalues)[dim:]]
    alpha = train.logits.double().numpy().max(axis=1).mean() / np.linalg.norm(centred @ null_space, axis=1).mean()
    for batch in (known, novel):
        virtual = alpha * np.linalg.norm((batch.features.double().numpy() - origin) @ null_space, axis=1)
        energy = np.log(np.exp(batch.logits.double().numpy()).sum(axis=1))
        torch.testing.assert_close(detector.score(batch), torch.from_numpy(virtual - energy).float(), rtol=1e-4, atol=1e-4)
    assert ViMDetector(classifier).dim == classifier.feature_dim // 2


def test_detectors_refuse_misuse(digits_setup):
    classifier, train, labels, known, _novel = digits_setup
    with pytest.raises(StateError, match="before fit"):
        FeatureMahalanobisDetector(classifier).score(known)
    with pytest.raises(StateError, match="before fit"):
        KNNDetector(classifier).score(known)
    with pytest.raises(ConfigError, match="exceeds the 5 known samples"):
        KNNDetector(classifier, k=10).fit(train.select(torch.arange(5)), labels[:5])
    with pytest.raises(ConfigError, match="temperature"):
        EnergyDetector(classifier, temperature=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        GradNormDetector(classifier, temperature=-1.0)
    with pytest.raises(ConfigError, match="percentile"):
        ReActDetector(classifier, percentile=0.0)
    with pytest.raises(ConfigError, match="principal dim"):
        ViMDetector(classifier, dim=classifier.feature_dim)
    for unfitted in (ReActDetector(classifier), ViMDetector(classifier)):
        with pytest.raises(StateError, match="before fit"):
            unfitted.score(known)
    with pytest.raises(InputError, match="at least 2"):
        ViMDetector(classifier).fit(train.select(torch.arange(1)), labels[:1])
    with pytest.raises(InputError, match="at least one"):
        ReActDetector(classifier).fit(train.select(torch.arange(0)), labels[:0])
    wrong = Observations(None, known.features[:, :3], known.logits)
    with pytest.raises(InputError, match="features must be"):
        KNNDetector(classifier, k=5).fit(train, labels).score(wrong)
    with pytest.raises(InputError, match="features must be"):
        FeatureMahalanobisDetector(classifier).fit(train, labels).score(wrong)
    for detector in (ReActDetector(classifier), ViMDetector(classifier), GradNormDetector(classifier)):
        with pytest.raises(InputError, match="features must be"):
            detector.fit(train, labels).score(wrong)


def test_registry_passes_the_config_to_the_activation_baselines(digits_setup):
    classifier = digits_setup[0]
    config = DetectorConfig(react_percentile=99.0, vim_dim=7)
    assert build_static_detector("react", classifier, config).percentile == 99.0
    assert build_static_detector("vim", classifier, config).dim == 7
    assert isinstance(build_static_detector("gradnorm", classifier, config), GradNormDetector)
