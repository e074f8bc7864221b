"""SAL's gradient filter (Du et al., "How does unlabeled data provably help out-of-distribution
detection?", ICLR 2024): which unlabeled stream samples are candidate outliers.

The per-sample gradient of the cross-entropy at the predicted label, with respect to the final
layer's weight row of that class, is (p_c - 1) a (a: the penultimate features). Centred on the mean
of the same row over known data of class c, the stream's gradients of the samples predicted c
spread along one dominant direction when the stream holds outliers: they pull the weights one way
the known data does not. SAL's score is the magnitude of a sample's projection on the top right
singular vector of its predicted class's centred stream gradients; samples scoring above the
known data's `quantile` of the same score are the candidates a binary classifier then learns
against the known data. The directions come from the stream, so the filter is fitted per pool.
"""

from __future__ import annotations

import torch

from edge_runtime.detectors.base import Observations
from edge_runtime.errors import InputError, StateError

MIN_SAMPLES_PER_DIRECTION = 2  # a singular direction of centred gradients needs two of them


def predicted_class_gradients(batch: Observations, labels: torch.Tensor | None = None) -> torch.Tensor:
    """[B, D] float64: d CE / d W[c] = (p_c - 1) a for each sample's class c (its label, else its prediction)."""
    logits = batch.logits.double()
    classes = logits.argmax(dim=1) if labels is None else labels.to(logits.device)
    probability = logits.softmax(dim=1).gather(1, classes[:, None])
    return (probability - 1.0) * batch.features.double()


class SALFilter:
    """Class means from labelled known data (`fit`), directions and candidates from a pool (`candidates`)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.means: torch.Tensor | None = None  # [C, D] float64
        self.own: torch.Tensor | None = None  # bool [M]: the fitted samples of this classifier's classes

    def fit(self, known: Observations, labels: torch.Tensor) -> "SALFilter":
        """Per-class mean of the known samples' gradient rows, each at its true class; classes
        without a sample keep a zero mean. Labels of later novel classes (>= C) are ignored."""
        if labels.shape != (len(known),):
            raise InputError(f"labels must be [{len(known)}], got {tuple(labels.shape)}")
        labels = labels.cpu()
        own = labels < self.num_classes
        if not bool(own.any()):
            raise InputError(f"SAL's class means need known samples of the classifier's {self.num_classes} classes")
        gradients = predicted_class_gradients(known.select(torch.nonzero(own).flatten()), labels[own]).cpu()
        sums = torch.zeros(self.num_classes, gradients.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels[own], gradients)
        counts = torch.bincount(labels[own], minlength=self.num_classes).clamp_min(1)
        self.means = sums / counts[:, None]
        self.own = own
        return self

    def directions(self, pool: Observations) -> torch.Tensor:
        """[C, D]: each class's top right singular vector of the pool's centred gradients (zero where
        fewer than two pool samples are predicted that class)."""
        return self._top_directions(*self._centred(pool))

    def scores(self, batch: Observations, directions: torch.Tensor) -> torch.Tensor:
        """[B] float64: |<gradient row - class mean, class direction>| at each sample's predicted class."""
        return _projections(*self._centred(batch), directions)

    def candidates(self, known: Observations, pool: Observations, quantile: float) -> torch.Tensor:
        """bool [N]: pool samples scoring above `quantile` of the known samples' scores, both under the
        pool's directions. `known` is what `fit` saw; only its samples of this classifier's classes count."""
        if not 0.0 < quantile < 1.0:
            raise InputError(f"quantile must be in (0, 1), got {quantile}")
        self._fitted_means()
        if self.own.shape != (len(known),):
            raise InputError(f"candidates needs the {len(self.own)} known samples fit saw, got {len(known)}")
        classes, centred = self._centred(pool)  # the pool's gradients, computed once for directions and scores
        directions = self._top_directions(classes, centred)
        level = torch.quantile(self.scores(known.select(torch.nonzero(self.own).flatten()), directions), quantile)
        return _projections(classes, centred, directions) > level

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"means": self.means, "own": self.own}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        self.means, self.own = state["means"], state["own"]

    def _centred(self, batch: Observations) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted classes [B], gradient rows minus the known mean of each one's class [B, D])."""
        means = self._fitted_means()
        classes = batch.logits.argmax(dim=1).cpu()
        return classes, predicted_class_gradients(batch).cpu() - means[classes]

    def _top_directions(self, classes: torch.Tensor, centred: torch.Tensor) -> torch.Tensor:
        found = torch.zeros_like(self._fitted_means())
        for label in range(self.num_classes):
            rows = centred[classes == label]
            if len(rows) >= MIN_SAMPLES_PER_DIRECTION:
                found[label] = torch.linalg.svd(rows, full_matrices=False).Vh[0]
        return found

    def _fitted_means(self) -> torch.Tensor:
        if self.means is None or self.own is None:
            raise StateError("SALFilter.fit(known, labels) must run before the pool is filtered")
        return self.means


def _projections(classes: torch.Tensor, centred: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """|<centred row, its class's direction>| per row."""
    return (centred * directions[classes]).sum(dim=1).abs()
