"""Rotation-prediction detector: the views and the score against a direct reference, one-class
detection on real MNIST digits, state round trip, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_runtime.config import RotationConfig, config_from_dict
from edge_runtime.data.loader import load_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.detectors.pixel_registry import build_pixel_detector
from edge_runtime.detectors.rotation import RotationDetector, rotation_scores
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.metrics import ood_metrics
from edge_runtime.one_class import first_per_class, observations_of, stratified_halves
from edge_runtime.training.augment import rotated_views

NORMAL_DIGIT = 7  # not symmetric under any right-angle rotation, unlike 0, 1 or 8
SMALL = RotationConfig(width=4, epochs=3, batch_size=64)
MNIST_SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def mnist_one_class():
    """(300 training sevens, 40 evaluation images per digit, their labels) from disjoint halves of MNIST test."""
    train, evaluation = stratified_halves(load_split("mnist", "test", progress=False), 0.5, seed=0)
    evaluation = first_per_class(evaluation, 40)
    sevens = to_tensor(train.images[train.labels == NORMAL_DIGIT][:300])
    return sevens, to_tensor(evaluation.images), evaluation.labels


@pytest.fixture(scope="module")
def fitted(mnist_one_class, single_thread) -> RotationDetector:
    return RotationDetector(MNIST_SHAPE, SMALL, seed=0).fit(observations_of(mnist_one_class[0]))


def test_views_are_the_four_rotations_with_their_labels(mnist_one_class):
    images = mnist_one_class[0][:5]
    views, labels = rotated_views(images)
    assert views.shape == (20, *MNIST_SHAPE) and labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert torch.equal(views[5:10], images.transpose(2, 3).flip(2))  # 90 degrees counter-clockwise
    assert torch.equal(views[10:15], images.flip(2).flip(3))
    assert torch.equal(torch.rot90(views[15:20], 1, dims=(2, 3)), images)  # four quarter turns: back upright


def test_score_is_the_summed_rotation_cross_entropy(fitted, mnist_one_class):
    images = mnist_one_class[1][:7]
    network = fitted.network
    with torch.no_grad():
        expected = sum(F.cross_entropy(network(torch.rot90(images, k, dims=(2, 3))).double(),
                                       torch.full((7,), k), reduction="none") for k in range(4))
        assert torch.allclose(rotation_scores(network, images).double(), expected, atol=1e-5)
    alone = torch.cat([fitted.score(observations_of(images[i:i + 1])) for i in range(7)])
    assert torch.allclose(alone, fitted.score(observations_of(images)), atol=1e-5)  # per sample: BN in eval mode


def test_detects_other_digits_one_class(fitted, mnist_one_class):
    _, images, labels = mnist_one_class
    scores = fitted.score(observations_of(images)).numpy()
    normal = labels == NORMAL_DIGIT
    # Measured 0.94 at these sizes (3 epochs, width 4, 300 sevens); chance is 0.5.
    assert ood_metrics(scores[normal], scores[~normal])["auroc"] > 0.75


def test_state_round_trip_and_misuse(fitted, mnist_one_class):
    copy = RotationDetector(MNIST_SHAPE, SMALL, seed=5)
    copy.load_state_dict(fitted.state_dict())
    batch = observations_of(mnist_one_class[1][:30])
    assert torch.equal(copy.score(batch), fitted.score(batch))
    with pytest.raises(StateError, match="not a rotation detector"):
        copy.load_state_dict({**fitted.state_dict(), "variant": "drocc"})
    with pytest.raises(StateError, match="do not fit"):
        RotationDetector(MNIST_SHAPE, RotationConfig(width=8)).load_state_dict(fitted.state_dict())
    with pytest.raises(StateError, match="not fitted"):
        RotationDetector(MNIST_SHAPE, SMALL).score(batch)
    with pytest.raises(StateError, match="nothing to save"):
        RotationDetector(MNIST_SHAPE, SMALL).state_dict()
    with pytest.raises(InputError, match=r"\(1, 28, 28\)"):
        fitted.score(observations_of(torch.rand(2, 3, 28, 28)))
    with pytest.raises(InputError, match="at least 2"):
        RotationDetector(MNIST_SHAPE, SMALL).fit(observations_of(mnist_one_class[0][:1]))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 28)])
def test_refuses_images_it_cannot_rotate_or_pool(shape):
    with pytest.raises(ConfigError, match="square images at least 9 pixels"):
        RotationDetector(shape)


def test_selectable_by_name_from_config():
    config = config_from_dict({"detector": {"name": "rotation", "rotation": {"width": 4, "epochs": 2}}}).detector
    detector = build_pixel_detector("rotation", config, MNIST_SHAPE, seed=1)
    assert isinstance(detector, RotationDetector) and detector.config.width == 4 and detector.config.epochs == 2
    with pytest.raises(ConfigError, match="translate"):
        config_from_dict({"detector": {"rotation": {"translate": -1}}})
