"""Gradient sites against autograd, the y_opt rule, and gradient Mahalanobis on real digits (scored through the kernel dispatch)."""

from __future__ import annotations

import copy
from typing import get_args, get_type_hints

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calibration.gaussian import fit_tied_gaussian
from calibration.moments import ClassMoments
from classifier_fixture import known_digits, train_digit_classifier
from edge_runtime.config import DetectorConfig
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.detectors.base import Observations
from edge_runtime.detectors.grad_mahalanobis import GradientMahalanobis
from edge_runtime.detectors.gradient_sites import LastConvSite, LastLinearSite, PenultimateSite, build_site
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.metrics import ood_metrics
from edge_runtime.models.base import FrozenClassifier
from kernels.dispatch import SCORE_IMPLEMENTATIONS
from kernels.reference import PRECISION_VARIANTS, last_layer_gradients, mahalanobis_scores


def _observe(classifier: FrozenClassifier, images: np.ndarray, dtype: torch.dtype = torch.float32) -> Observations:
    pixels = to_tensor(images).to(dtype)
    with torch.no_grad():
        features, logits = classifier.embed(pixels)
    return Observations(pixels, features, logits)


@pytest.fixture(scope="module")
def digits():
    """(classifier, known train obs + labels, known test obs, novel test obs); digit 9 is novel."""
    known_train, _ = known_digits(load_digits_split("train"))
    known_test, novel_test = known_digits(load_digits_split("test"))
    classifier = train_digit_classifier(known_train)
    return (classifier, _observe(classifier, known_train.images), torch.from_numpy(known_train.labels),
            _observe(classifier, known_test.images), _observe(classifier, novel_test.images))


@pytest.fixture(scope="module")
def digits64(digits):
    """A float64 copy of the digits classifier and 12 known test images (labels: predicted and not)."""
    classifier = digits[0]
    classifier64 = FrozenClassifier(copy.deepcopy(classifier.network).double().eval(), "fc")
    images = load_digits_split("test").images[:12]
    batch = _observe(classifier64, images, torch.float64)
    labels = (batch.logits.argmax(dim=1) + torch.arange(12) % 3) % classifier64.num_classes
    return classifier64, batch, labels


def test_last_linear_site_matches_autograd(digits64):
    classifier, batch, labels = digits64
    site = LastLinearSite(classifier)
    fc = classifier.final_linear
    expected = []
    for image, label in zip(batch.images, labels):
        loss = F.cross_entropy(classifier(image[None]), label[None])
        weight_grad, bias_grad = torch.autograd.grad(loss, [fc.weight, fc.bias])
        expected.append(torch.cat([weight_grad, bias_grad[:, None]], dim=1).flatten())
    got = site.gradients(batch, labels)
    assert got.shape == (12, site.dim) and site.dim == 9 * 65
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-10, atol=1e-12)


def test_penultimate_site_matches_autograd(digits64):
    classifier, batch, labels = digits64
    site = PenultimateSite(classifier)
    features = batch.features.clone().requires_grad_(True)
    losses = F.cross_entropy(classifier.final_linear(features), labels, reduction="sum")
    (expected,) = torch.autograd.grad(losses, features)  # the sum separates per sample
    got = site.gradients(batch, labels)
    assert got.shape == (12, site.dim) and site.dim == 64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_conv_net():
    """A 2-conv digits classifier trained for a few steps (float64), and 3 real test digits."""
    known_train, _ = known_digits(load_digits_split("train"))
    torch.manual_seed(0)
    network = nn.Sequential()
    network.add_module("conv1", nn.Conv2d(1, 4, 3, padding=1))
    network.add_module("act1", nn.ReLU())
    network.add_module("conv2", nn.Conv2d(4, 4, 3, padding=1))
    network.add_module("act2", nn.ReLU())
    network.add_module("pool", nn.AdaptiveAvgPool2d(2))
    network.add_module("flatten", nn.Flatten())
    network.add_module("fc", nn.Linear(16, 9))
    network = network.double()
    x, y = to_tensor(known_train.images).double(), torch.from_numpy(known_train.labels)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-2)
    for step in range(40):
        index = torch.arange(step * 25, step * 25 + 25) % len(x)
        loss = F.cross_entropy(network(x[index]), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    classifier = FrozenClassifier(network.eval(), "fc")
    batch = _observe(classifier, load_digits_split("test").images[:3], torch.float64)
    return classifier, batch, batch.logits.argmax(dim=1)


def _conv2_autograd(classifier: FrozenClassifier, batch: Observations, labels: torch.Tensor,
                    mirrored: bool = False) -> torch.Tensor:
    """Per-sample autograd; `mirrored`: of the loss on the mean of the image's and its mirror's logits."""
    conv = classifier.network.conv2
    rows = []
    for image, label in zip(batch.images, labels):
        logits = classifier(image[None])
        if mirrored:
            logits = (logits + classifier(image[None].flip(3))) / 2
        loss = F.cross_entropy(logits, label[None])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [conv.weight, conv.bias])]))
    return torch.stack(rows)


def test_last_conv_site_matches_a_per_sample_autograd_loop(tiny_conv_net):
    classifier, batch, labels = tiny_conv_net
    site = LastConvSite(classifier, projection_dim=10_000)
    assert site.layer_name == "conv2" and site.dim == 4 * 4 * 9 + 4  # no projection needed
    torch.testing.assert_close(site.gradients(batch, labels), _conv2_autograd(classifier, batch, labels),
                               rtol=1e-9, atol=1e-12)


def test_last_conv_site_takes_the_gradient_of_the_mirror_averaged_loss(tiny_conv_net):
    """With mirror_average the classifier's logits are the two views' mean; the site differentiates those."""
    classifier, batch, labels = tiny_conv_net
    mirroring = FrozenClassifier(classifier.network, "fc", mirror_average=True)
    got = LastConvSite(mirroring, projection_dim=10_000).gradients(batch, labels)
    torch.testing.assert_close(got, _conv2_autograd(classifier, batch, labels, mirrored=True), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got, _conv2_autograd(classifier, batch, labels))


def test_last_conv_site_projects_to_a_bounded_seeded_dimension(tiny_conv_net):
    classifier, batch, labels = tiny_conv_net
    site = LastConvSite(classifier, projection_dim=16, seed=3)
    projected = site.gradients(batch, labels)
    assert site.dim == 16 and projected.shape == (3, 16)
    projection = torch.randn(148, 16, generator=torch.Generator().manual_seed(3)).double() / 4.0
    torch.testing.assert_close(projected, _conv2_autograd(classifier, batch, labels) @ projection, rtol=1e-9, atol=1e-12)
    other_seed = LastConvSite(classifier, projection_dim=16, seed=4).gradients(batch, labels)
    assert not torch.allclose(projected, other_seed)


def test_last_conv_site_refuses_what_it_cannot_do(digits, tiny_conv_net):
    with pytest.raises(ConfigError, match="nn.Conv2d"):
        build_site(DetectorConfig(site="last_conv"), digits[0])
    classifier, batch, labels = tiny_conv_net
    site = build_site(DetectorConfig(site="last_conv", projection_dim=16), classifier)
    with pytest.raises(InputError, match="images"):
        site.gradients(Observations(None, batch.features, batch.logits), labels)
    wide = nn.Sequential(nn.Conv2d(256, 256, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    wide.add_module("fc", nn.Linear(256, 9))
    with pytest.raises(ConfigError, match="projection_dim"):  # 590k parameters x 1000 > the dense-matrix cap
        LastConvSite(FrozenClassifier(wide, "fc"), projection_dim=1000)


def test_select_novel_label_is_the_argmin_of_summed_softmax(digits):
    # Per sample, class 2 is least likely twice, yet class 0 has the smallest total probability.
    probs = torch.tensor([[0.30, 0.30, 0.05, 0.35],
                          [0.30, 0.30, 0.05, 0.35],
                          [0.04, 0.06, 0.85, 0.05]])
    believed_ood = Observations(None, torch.zeros(3, 2), probs.log())
    detector = GradientMahalanobis(digits[0])
    assert detector.select_novel_label(believed_ood) == 0
    with pytest.raises(InputError):
        detector.select_novel_label(believed_ood.select(torch.tensor([], dtype=torch.long)))


def test_grad_mahalanobis_detects_the_held_out_digit_as_the_reference_composition(digits):
    classifier, train, labels, known, novel = digits
    detector = GradientMahalanobis(classifier, DetectorConfig(shrinkage="oas", chunk_size=256)).fit(train, labels)
    known_scores, novel_scores = detector.score(known), detector.score(novel)
    assert known_scores.dtype == torch.float32 and known_scores.shape == (len(known),)
    auroc = ood_metrics(known_scores.numpy(), novel_scores.numpy())["auroc"]
    assert auroc > 0.6

    moments = ClassMoments(9, 9 * 65, fourth_moments=False)
    moments.update(last_layer_gradients(train.features, train.logits.softmax(dim=1), labels), labels)
    gaussian = fit_tied_gaussian(moments, "oas", 0.0)

    def reference(batch: Observations) -> torch.Tensor:
        predicted = batch.logits.argmax(dim=1)
        gradients = last_layer_gradients(batch.features, batch.logits.softmax(dim=1), predicted)
        return mahalanobis_scores(gradients, gaussian.means, predicted, gaussian.precision)

    torch.testing.assert_close(known_scores, reference(known), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(novel_scores, reference(novel), rtol=1e-4, atol=1e-3)
    assert ood_metrics(reference(known).numpy(), reference(novel).numpy())["auroc"] == pytest.approx(auroc, abs=1e-3)


def test_scores_with_given_labels_and_the_state_round_trip(digits):
    classifier, train, labels, known, novel = digits
    detector = GradientMahalanobis(classifier, DetectorConfig(site="penultimate")).fit(train, labels)
    predicted = known.logits.argmax(dim=1)
    assert torch.equal(detector.score_with_labels(known, predicted), detector.score(known))
    other = (predicted + 1) % 9
    assert detector.score_with_labels(known, other).mean() > detector.score(known).mean()

    restored = GradientMahalanobis(classifier, DetectorConfig(site="penultimate"))
    with pytest.raises(StateError, match="not fitted"):
        restored.score(novel)
    restored.load_state_dict(detector.state_dict())
    assert torch.equal(restored.score(novel), detector.score(novel))
    with pytest.raises(StateError, match="site"):
        GradientMahalanobis(classifier).load_state_dict(detector.state_dict())


@pytest.mark.parametrize(("precision", "bound"), [("fp32", 1e-5), ("bf16x3", 1e-4), ("fp16", 1e-2)])
def test_last_linear_scores_go_through_the_kernel_dispatch(digits, precision, bound):
    classifier, train, labels, known, novel = digits
    config = DetectorConfig(kernel_precision=precision, chunk_size=200)
    detector = GradientMahalanobis(classifier, config).fit(train, labels)
    batch = Observations.concat([known, novel])
    scores = detector.score(batch)
    assert detector.scoring_implementation == "closed_form"  # the CPU's choice; a GPU picks a fused kernel
    gaussian = detector.gaussian
    predicted = batch.logits.argmax(dim=1)
    probs = batch.logits.softmax(dim=1).double()  # the kernels' float32 softmax: only their arithmetic is judged
    reference = mahalanobis_scores(last_layer_gradients(batch.features.double(), probs, predicted),
                                   gaussian.means.double(), predicted, gaussian.precision.double())
    error = ((scores.double() - reference).abs() / reference.abs()).max()
    assert error <= bound, f"{precision}: max relative error {error:.1e}"

    restored = GradientMahalanobis(classifier, config)
    restored.load_state_dict(detector.state_dict())
    assert torch.equal(restored.score(batch), scores)
    empty = restored.score(batch.select(torch.tensor([], dtype=torch.long)))
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_scoring_implementation_is_named_and_an_unavailable_one_refused(digits):
    classifier, train, labels, known, _ = digits
    deep = GradientMahalanobis(classifier, DetectorConfig(site="penultimate")).fit(train, labels)
    deep.score(known)
    assert deep.scoring_implementation == "explicit_gradients"
    on_gpu_only = GradientMahalanobis(classifier, DetectorConfig(kernel="cuda_fused")).fit(train, labels)
    with pytest.raises(ConfigError, match="cuda_fused.*unavailable"):
        on_gpu_only.score(known)


def test_the_config_offers_exactly_the_kernels_implementations_and_variants():
    hints = get_type_hints(DetectorConfig)
    assert set(get_args(hints["kernel"])) == {"auto", *SCORE_IMPLEMENTATIONS}
    assert set(get_args(hints["kernel_precision"])) == set(PRECISION_VARIANTS)
