"""A tiny frozen classifier trained on real digits, shared by detector tests.

Training it takes about a second, so detector tests exercise real features and logits without
depending on the full training pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from calibration.gaussian import fit_tied_gaussian
from calibration.moments import ClassMoments
from edge_runtime.config import load_config, with_overrides
from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.models.base import FrozenClassifier
from edge_runtime.models.registry import build_classifier
from edge_runtime.session import Session
from edge_runtime.training.trainer import compute_mean_std, train_classifier
from kernels.reference import last_layer_gradients


def train_digit_classifier(train: ImageSet, steps: int = 300, seed: int = 0) -> FrozenClassifier:
    """An MLP (final layer `fc`) fitted to `train`, whose labels must be 0..K-1."""
    torch.manual_seed(seed)
    num_classes = int(train.labels.max()) + 1
    pixels = train.images.shape[1] * train.images.shape[2] * train.images.shape[3]
    network = nn.Sequential()
    network.add_module("flatten", nn.Flatten())
    network.add_module("hidden", nn.Linear(pixels, 64))
    network.add_module("act", nn.ReLU())
    network.add_module("fc", nn.Linear(64, num_classes))
    x, y = to_tensor(train.images), torch.from_numpy(train.labels)
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(len(x), (128,), generator=generator)
        loss = nn.functional.cross_entropy(network(x[index]), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return FrozenClassifier(network.eval(), "fc")


def known_digits(data: ImageSet, novel: int = 9) -> tuple[ImageSet, ImageSet]:
    """(known part with labels 0..8, novel part) of a digits split; digit `novel` is held out."""
    keep = data.labels != novel
    known = data.subset(keep)
    labels = known.labels - (known.labels > novel)
    return ImageSet(known.images, labels, known.classes[:novel] + known.classes[novel + 1:], data.name), data.subset(~keep)


def fitted_digits_moments(test_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor, ClassMoments]:
    """(test features, test logits, ClassMoments of the known training digits' last-layer gradients).

    The shared real-data case of the kernel tests (D=64, C=9, K=585; digit 9 novel), kept at the
    moments so a test can fit the shrinkage it needs; accuracy claims rest on it, not on random tensors.
    """
    known_train, _ = known_digits(load_digits_split("train"))
    classifier = train_digit_classifier(known_train)
    with torch.no_grad():
        train_features, train_logits = classifier.embed(to_tensor(known_train.images))
        features, logits = classifier.embed(to_tensor(load_digits_split("test").images[:test_images]))
    labels = torch.from_numpy(known_train.labels)
    moments = ClassMoments(9, 9 * 65)
    moments.update(last_layer_gradients(train_features.double(), train_logits.double().softmax(dim=1), labels), labels)
    return features, logits, moments


def fitted_digits_gradients(test_images: int | None = None) -> tuple[torch.Tensor, ...]:
    """(features, logits, means, precision): `fitted_digits_moments` with a Ledoit-Wolf fit."""
    features, logits, moments = fitted_digits_moments(test_images)
    gaussian = fit_tied_gaussian(moments, "ledoit_wolf", 1e-3)
    return features, logits, gaussian.means, gaussian.precision


def digits_session(overrides: dict[str, object], epochs: int = 3) -> tuple[Session, ImageSet]:
    """(a Session on configs/digits.yaml with `overrides`, the known digits it was not given).

    The small CNN is trained on digits 0-8 for a few epochs (a few seconds on one core), the memory
    holds `memory.budget` known training images, and the returned set holds the remaining known
    training images plus the 9s, for streaming: enough for reliability tests, not for accuracy claims.
    """
    root = Path(__file__).resolve().parents[1]
    cfg = with_overrides(load_config(root / "configs/digits.yaml"), {"train.epochs": epochs, **overrides})
    known, novel = known_digits(load_digits_split("train"))
    order = np.random.default_rng(cfg.seed).permutation(len(known))
    memory, rest = known.subset(order[:cfg.memory.budget]), known.subset(order[cfg.memory.budget:])
    torch.manual_seed(cfg.seed)
    classifier = build_classifier(cfg.model, len(known.classes), *compute_mean_std(rest))
    train_classifier(classifier, rest, cfg.train, torch.device("cpu"), seed=cfg.seed, progress=False)
    session = Session(cfg, classifier, known.classes, memory, "9", device="cpu")
    stream = ImageSet(np.concatenate([rest.images, novel.images]),
                      np.concatenate([rest.labels, np.full(len(novel), len(known.classes))]),
                      known.classes + ("9",), "digits-stream")
    return session, stream
