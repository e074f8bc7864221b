"""VAE gradient features against an autograd reference, and the detector on real digits (one class)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import ONE_CLASS_DIGIT
from edge_runtime.config import DetectorConfig, VAEGradientConfig, evolve_config
from edge_runtime.data.corruptions import corrupt
from edge_runtime.detectors.drocc import DROCCDetector
from edge_runtime.detectors.pixel_registry import build_pixel_detector
from edge_runtime.detectors.vae_gradient import (ConvVAE, VAEGradientDetector, first_decoder_gradient_factors,
                                                 kl_per_dimension, reconstruction_loss, site_gradients)
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.metrics import ood_metrics
from edge_runtime.one_class import observations_of

NORMAL_DIGIT = ONE_CLASS_DIGIT  # the class one_class_digits trains on
QUICK = VAEGradientConfig(vae_epochs=30, latent_dim=8, width=8, decoder_hidden=32, classifier_epochs=20)


@pytest.fixture(scope="module")
def fitted(one_class_digits) -> VAEGradientDetector:
    return VAEGradientDetector((1, 8, 8), QUICK, seed=0).fit(observations_of(one_class_digits[0]))


def _reference_gradients(vae: ConvVAE, images: torch.Tensor, site: str) -> torch.Tensor:
    """One autograd backward per image, float64: what the vmap must reproduce."""
    vae = vae.double()
    params = vae.site_parameters(site)
    rows = []
    for image in images.double():
        loss = reconstruction_loss(vae(image[None]), image[None]).sum()
        grads = torch.autograd.grad(loss, [params[name] for name in sorted(params)])
        rows.append(torch.cat([g.flatten() for g in grads]))
    vae.float()
    return torch.stack(rows)


@pytest.mark.parametrize("site", ["first_decoder", "last_decoder"])
def test_site_gradients_match_per_sample_autograd(fitted, one_class_digits, site):
    images = one_class_digits[1][:6]
    batched = site_gradients(fitted.vae.double(), images.double(), site)
    fitted.vae.float()
    reference = _reference_gradients(fitted.vae, images, site)
    assert batched.shape == reference.shape
    assert torch.allclose(batched, reference, rtol=1e-9, atol=1e-9)


def test_gradient_factors_rebuild_the_first_decoder_gradient(fitted, one_class_digits):
    """delta is the bias gradient and delta z^T the weight gradient, per sample, as autograd gives them."""
    images = one_class_digits[1][:6].double()
    vae = copy.deepcopy(fitted.vae).double()  # a copy: the fixture's VAE stays float for the other tests
    factors = first_decoder_gradient_factors(vae, images)
    reference = site_gradients(vae, images, "first_decoder")
    hidden, latent = QUICK.decoder_hidden, QUICK.latent_dim
    assert factors.shape == (6, hidden + latent)
    delta, z = factors[:, :hidden], factors[:, hidden:]
    # site_gradients orders parameters by name: decoder_first.bias, then decoder_first.weight [hidden, latent]
    rebuilt = torch.cat([delta, torch.einsum("bh,bl->bhl", delta, z).flatten(1)], dim=1)
    assert torch.allclose(rebuilt, reference, rtol=1e-9, atol=1e-9)
    alone = first_decoder_gradient_factors(fitted.vae, images[2:3].float())
    assert torch.allclose(alone, factors[2:3].float(), rtol=1e-4, atol=1e-5)


def test_gradient_factors_head_detects_other_digits(fitted, one_class_digits):
    detector = VAEGradientDetector((1, 8, 8), evolve_config(QUICK, feature="gradient_factors"))
    detector.vae = fitted.vae
    detector.fit_head(one_class_digits[0])
    _, test_images, labels = one_class_digits
    scores = detector.score(observations_of(test_images)).numpy()
    normal = labels == NORMAL_DIGIT
    assert ood_metrics(scores[normal], scores[~normal])["auroc"] > 0.9


def test_gradient_factors_refuse_the_last_decoder_site():
    with pytest.raises(ConfigError, match="gradient_factors"):
        evolve_config(QUICK, feature="gradient_factors", site="last_decoder")


def test_site_gradients_of_a_sample_do_not_depend_on_its_batch(fitted, one_class_digits):
    images = one_class_digits[1][:16]
    alone = site_gradients(fitted.vae, images[3:4], "first_decoder")
    together = site_gradients(fitted.vae, images, "first_decoder")[3:4]
    assert torch.allclose(alone, together, rtol=1e-5, atol=1e-6)


def test_kl_per_dimension_is_zero_at_the_prior_and_matches_the_closed_form():
    assert torch.equal(kl_per_dimension(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2, 3))
    mean, log_var = torch.tensor([[1.0, -0.5]]), torch.tensor([[0.0, float(np.log(0.25))]])
    expected = torch.tensor([[0.5, 0.5 * (0.25 + 0.25 - 1 - float(np.log(0.25)))]])
    assert torch.allclose(kl_per_dimension(mean, log_var), expected, atol=1e-6)


def test_feature_shapes_per_kind(fitted, one_class_digits):
    images = one_class_digits[1][:5]
    assert fitted.features(images).shape == (5, 32 * (8 + 1))  # first decoder layer: weight + bias
    for feature, width in (("reconstruction", 64), ("latent", 8)):
        detector = VAEGradientDetector((1, 8, 8), evolve_config(QUICK, feature=feature))
        detector.vae = fitted.vae
        assert detector.features(images).shape == (5, width)


def test_mahalanobis_head_detects_other_digits(fitted, one_class_digits):
    _, test_images, labels = one_class_digits
    scores = fitted.score(observations_of(test_images)).numpy()
    normal = labels == NORMAL_DIGIT
    assert ood_metrics(scores[normal], scores[~normal])["auroc"] > 0.9


def test_last_decoder_site_detects_a_novel_condition(fitted, one_class_digits):
    """Novel condition: the same digit class, hazed; the last decoder layer's gradients see it."""
    detector = VAEGradientDetector((1, 8, 8), evolve_config(QUICK, site="last_decoder"))
    detector.vae = fitted.vae
    detector.fit_head(one_class_digits[0])
    clean = one_class_digits[1][one_class_digits[2] == NORMAL_DIGIT]
    hazed = corrupt(clean, "haze", 3)
    scores = [detector.score(observations_of(images)).numpy() for images in (clean, hazed)]
    assert ood_metrics(*scores)["auroc"] > 0.9


def test_noise_classifier_head_learns_its_stand_in_outliers(fitted, one_class_digits):
    """The paper's head: noise-distorted known images must score above clean ones."""
    train = one_class_digits[0]
    detector = VAEGradientDetector((1, 8, 8), evolve_config(QUICK, head="noise_classifier"))
    detector.vae = fitted.vae
    detector.fit_head(train)
    clean = one_class_digits[1][one_class_digits[2] == NORMAL_DIGIT]
    noisy = (clean + QUICK.noise_std * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    clean_scores = detector.score(observations_of(clean)).numpy()
    noisy_scores = detector.score(observations_of(noisy)).numpy()
    assert ood_metrics(clean_scores, noisy_scores)["auroc"] > 0.9


def test_state_dict_round_trip_gives_identical_scores(fitted, one_class_digits):
    copy = VAEGradientDetector((1, 8, 8), QUICK, seed=1)
    copy.load_state_dict(fitted.state_dict())
    batch = observations_of(one_class_digits[1][:20])
    assert torch.allclose(copy.score(batch), fitted.score(batch))
    other_head = VAEGradientDetector((1, 8, 8), evolve_config(QUICK, head="noise_classifier"))
    with pytest.raises(StateError, match="head"):
        other_head.load_state_dict(fitted.state_dict())


def test_misuse_raises_typed_errors(one_class_digits):
    with pytest.raises(InputError, match="multiples of 4"):
        VAEGradientDetector((1, 10, 10))
    detector = VAEGradientDetector((1, 8, 8), QUICK)
    with pytest.raises(StateError, match="not fitted"):
        detector.score(observations_of(one_class_digits[1][:2]))
    with pytest.raises(InputError, match="no images"):
        detector.fit(observations_of(one_class_digits[0]).__class__(None, torch.zeros(3, 1), torch.zeros(3, 1)))
    with pytest.raises(InputError, match=r"\(1, 8, 8\)"):
        detector.fit(observations_of(torch.rand(4, 1, 12, 12)))
    with pytest.raises(InputError, match="at least 2"):
        detector.fit(observations_of(one_class_digits[0][:1]))


def test_pixel_registry_builds_each_pixel_detector():
    config = DetectorConfig()
    assert isinstance(build_pixel_detector("vae_gradient", config, (3, 32, 32)), VAEGradientDetector)
    for name in ("drocc", "drocc_lf"):
        detector = build_pixel_detector(name, config, (1, 28, 28))
        assert isinstance(detector, DROCCDetector) and detector.name == name
    with pytest.raises(ConfigError, match="not a pixel detector"):
        build_pixel_detector("msp", config, (1, 8, 8))
    with pytest.raises(ConfigError, match="image_shape"):
        build_pixel_detector("drocc", config, (8, 8))
