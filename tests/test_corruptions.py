"""Novel-condition corruptions on real MNIST digits: geometry, severity order, physics; condition splits on digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.config import load_config, with_overrides
from edge_runtime.data.corruptions import (CORRUPTIONS, HAZE_AIRLIGHT, LEVELS, NOISE_STD, _disk_kernel,
                                           _gaussian_kernel, condition_split, corrupt, corrupt_set)
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.loader import load_split
from edge_runtime.data.splits import split_novel_class
from edge_runtime.data.transforms import to_tensor
from edge_runtime.errors import ConfigError, InputError
from edge_runtime.experiment import prepare_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist():
    """The first 20 images of each digit from the MNIST test split (real, 28x28 grey)."""
    return load_split("mnist", "test", limit_per_class=20, progress=False)


@pytest.fixture(scope="module")
def pixels(mnist) -> torch.Tensor:
    return to_tensor(mnist.images)


def _laplacian_energy(images: torch.Tensor) -> float:
    """Mean squared discrete Laplacian: high-frequency content, which blur must remove."""
    inner = images[..., 1:-1, 1:-1]
    laplacian = (4 * inner - images[..., :-2, 1:-1] - images[..., 2:, 1:-1]
                 - images[..., 1:-1, :-2] - images[..., 1:-1, 2:])
    return float(laplacian.square().mean())


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_shape_range_and_seed_reproducibility(pixels, kind):
    out = corrupt(pixels, kind, 3, seed=7)
    assert out.shape == pixels.shape and out.dtype == pixels.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, corrupt(pixels, kind, 3, seed=7))
    assert not torch.equal(out, pixels)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_level_moves_images_further_from_clean(pixels, kind):
    distances = [float((corrupt(pixels, kind, level, seed=0) - pixels).abs().mean()) for level in LEVELS]
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


@pytest.mark.parametrize("kind", ["lens_blur", "gaussian_blur"])
def test_blurs_remove_high_frequencies_level_by_level_and_keep_brightness(pixels, kind):
    energies = [_laplacian_energy(corrupt(pixels, kind, level)) for level in LEVELS]
    assert _laplacian_energy(pixels) > energies[0]
    assert all(a > b for a, b in zip(energies, energies[1:])), energies
    flat = torch.full((2, 1, 28, 28), 0.37)
    assert torch.allclose(corrupt(flat, kind, 5), flat, atol=1e-6)


@pytest.mark.parametrize("make, size", [(_gaussian_kernel, 1.3), (_disk_kernel, 2.2)])
def test_blur_kernels_are_normalised_and_symmetric(make, size):
    kernel = make(size)
    assert kernel.shape[0] % 2 == 1
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(kernel, kernel.flip(0)) and torch.allclose(kernel, kernel.T)


def test_noise_has_the_tabled_standard_deviation():
    grey = torch.full((64, 1, 32, 32), 0.5)  # mid-grey: no clipping at these levels
    for level in (1, 2, 3):
        measured = float((corrupt(grey, "gaussian_noise", level, seed=level) - grey).std())
        assert measured == pytest.approx(NOISE_STD[level - 1], rel=0.03)


def test_haze_pulls_towards_airlight_and_far_rows_are_hazier():
    black = torch.zeros(8, 3, 32, 32)
    hazed = corrupt(black, "haze", 4)
    top, bottom = float(hazed[:, :, :4].mean()), float(hazed[:, :, -4:].mean())
    assert 0.0 < bottom < top < HAZE_AIRLIGHT
    white = torch.ones(8, 3, 32, 32)
    assert float(corrupt(white, "haze", 4).min()) >= HAZE_AIRLIGHT - 1e-6


def test_rain_only_brightens_and_denser_levels_cover_more(pixels):
    covered = []
    for level in LEVELS:
        rained = corrupt(pixels, "rain", level, seed=1)
        assert bool((rained >= pixels - 1e-6).all())
        covered.append(float(((rained - pixels) > 0.05).float().mean()))
    assert all(a < b for a, b in zip(covered, covered[1:])), covered


def test_invalid_requests_name_the_problem(pixels):
    with pytest.raises(InputError, match="unknown corruption 'snow'"):
        corrupt(pixels, "snow", 1)
    with pytest.raises(InputError, match="level"):
        corrupt(pixels, "haze", 6)
    with pytest.raises(InputError, match=r"\[N, C, H, W\]"):
        corrupt(pixels[0], "haze", 1)


def test_corrupt_set_keeps_labels_and_matches_the_tensor_path(mnist):
    corrupted = corrupt_set(mnist, "gaussian_blur", 2, chunk=64)
    assert corrupted.images.dtype == np.uint8 and corrupted.images.shape == mnist.images.shape
    assert np.array_equal(corrupted.labels, mnist.labels)
    expected = corrupt(to_tensor(mnist.images[:64]), "gaussian_blur", 2)
    assert np.abs(to_tensor(corrupted.images[:64]).numpy() - expected.numpy()).max() <= 1 / 255 + 1e-6


def test_condition_split_makes_corrupted_known_images_the_novel_type():
    digits_train, digits_test = load_digits_split("train"), load_digits_split("test")
    split = split_novel_class(digits_train, digits_test, "9", 0.3, seed=0)
    conditioned = condition_split(split, "gaussian_blur", 4, novel_samples=50, seed=0)
    known = len(split.known_classes)
    assert conditioned.novel_class == "gaussian_blur-4" and conditioned.known_classes == split.known_classes
    assert conditioned.train is split.train and conditioned.calibration is split.calibration
    assert len(conditioned.novel_train) == 50 and set(conditioned.novel_train.labels) == {known}
    clean_test = split.test.images[split.test.labels < known]
    assert len(conditioned.test) == 2 * len(clean_test)  # each known test image, clean and corrupted; no 9s
    assert np.array_equal(conditioned.test.images[:len(clean_test)], clean_test)
    assert set(conditioned.test.labels[len(clean_test):]) == {known}
    novel_rows = {row.tobytes() for row in conditioned.novel_train.images.reshape(50, -1)}
    train_rows = {row.tobytes() for row in split.train.images.reshape(len(split.train), -1)}
    assert not novel_rows & train_rows  # blurred, so no longer the clean training images


def test_a_novel_condition_in_the_config_reaches_the_prepared_split():
    cfg = with_overrides(load_config(ROOT / "configs" / "digits.yaml"),
                         {"data.novel_condition": {"kind": "haze", "level": 2}, "stream.novel_samples": 30})
    split = prepare_data(cfg, progress=False).split
    assert split.novel_class == "haze-2" and len(split.novel_train) == 30
    with pytest.raises(ConfigError, match="kind"):
        with_overrides(cfg, {"data.novel_condition": {"kind": "snow", "level": 2}})
    with pytest.raises(ConfigError, match="level"):
        with_overrides(cfg, {"data.novel_condition": {"kind": "haze", "level": 6}})
