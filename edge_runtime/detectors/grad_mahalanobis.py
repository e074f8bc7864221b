"""Gradient Mahalanobis: how far a sample's per-sample gradient lies from the IDD gradients.

The gradient is taken at one of the sites of `gradient_sites` for a chosen label; the IDD class
means and one tied precision are fitted on known data with its true labels (DESIGN.md, method 1).
At the last_linear site scoring goes through `kernels.dispatch.score_last_layer`, which never forms
the [B, K] gradient and picks the fastest implementation the device runs (a fused Triton or CUDA C
kernel on a GPU, the closed-form torch path on a CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from calibration.gaussian import TiedGaussian, fit_tied_gaussian
from calibration.moments import ClassMoments
from edge_runtime.config import DetectorConfig
from edge_runtime.detectors.base import Detector, Observations
from edge_runtime.detectors.gradient_sites import LastLinearSite, build_site
from edge_runtime.errors import InputError, StateError
from edge_runtime.models.base import FrozenClassifier
from kernels.dispatch import score_last_layer
from kernels.reference import LastLayerStats, prepare_last_layer_stats


class GradientMahalanobis(Detector):
    """Score = (g - mu_c)^T P (g - mu_c) of the gradient g for label c; higher = more novel."""

    name = "grad_mahalanobis"

    def __init__(self, classifier: FrozenClassifier, config: DetectorConfig = DetectorConfig(),
                 seed: int = 0, progress: bool = False) -> None:
        super().__init__(classifier)
        self.config = config
        self.site = build_site(config, classifier, seed)
        self.progress = progress
        self.gaussian: TiedGaussian | None = None
        self._kernel_stats: LastLayerStats | None = None
        self.scoring_implementation: str | None = None  # what computed the latest scores (kernels.dispatch names)

    def fit(self, known: Observations, labels: torch.Tensor) -> "GradientMahalanobis":
        """Stream the known data through the site in chunks into class moments, then fit the Gaussian."""
        if labels.shape != (len(known),):
            raise InputError(f"labels must be [{len(known)}] for the known Observations, got {tuple(labels.shape)}")
        labels = labels.to(device=known.logits.device, dtype=torch.long)
        moments = ClassMoments(self.classifier.num_classes, self.site.dim, known.logits.device,
                               fourth_moments=self.config.shrinkage == "ledoit_wolf")
        for index in tqdm(_chunks(len(known), self.config.chunk_size), desc="gradient moments",
                          disable=not self.progress, leave=False):
            moments.update(self.site.gradients(known.select(index), labels[index]), labels[index])
        self.gaussian = fit_tied_gaussian(moments, self.config.shrinkage, self.config.ridge)
        self._kernel_stats = None
        return self

    def score(self, batch: Observations) -> torch.Tensor:
        """Score with each sample's predicted label (the label a deployed model has)."""
        return self.score_with_labels(batch, batch.logits.argmax(dim=1))

    def score_with_labels(self, batch: Observations, labels: torch.Tensor) -> torch.Tensor:
        """Score with the given label per sample, float32 [B]."""
        gaussian = self._fitted()
        labels = labels.to(device=batch.logits.device, dtype=torch.long)
        if isinstance(self.site, LastLinearSite):
            return self._last_layer_scores(batch, labels)
        if gaussian.means.device != batch.logits.device:
            gaussian = self.gaussian = gaussian.to(batch.logits.device)
        scores = [gaussian.score(self.site.gradients(batch.select(index), labels[index]), labels[index])
                  for index in _chunks(len(batch), self.config.chunk_size)]
        self.scoring_implementation = "explicit_gradients"
        return torch.cat(scores).float() if scores else batch.logits.new_zeros(0, dtype=torch.float32)

    def _last_layer_scores(self, batch: Observations, labels: torch.Tensor) -> torch.Tensor:
        """Scores from features and logits through the kernel dispatch, chunked (closed_form forms [chunk, K])."""
        stats = self._stats_on(batch.logits.device)
        scores = []
        for index in _chunks(len(batch), self.config.chunk_size):
            chunk_scores, self.scoring_implementation = score_last_layer(
                batch.features[index].float(), batch.logits[index].float(), labels[index], stats,
                impl=self.config.kernel, from_logits=True)
            scores.append(chunk_scores)
        return torch.cat(scores) if scores else batch.logits.new_zeros(0, dtype=torch.float32)

    def _stats_on(self, device: torch.device) -> LastLayerStats:
        """The Gaussian in the kernels' layout and `detector.kernel_precision`, prepared once per fit and device."""
        if self._kernel_stats is None or self._kernel_stats.device != device:
            gaussian = self._fitted()
            self._kernel_stats = prepare_last_layer_stats(gaussian.means, gaussian.precision,
                                                          self.config.kernel_precision).to(device)
        return self._kernel_stats

    def select_novel_label(self, believed_ood: Observations) -> int:
        """y_opt = argmin_c sum_i softmax_c(x_i): the label giving believed-OOD samples the largest gradient."""
        if len(believed_ood) == 0:
            raise InputError("select_novel_label needs at least one believed-OOD sample")
        return int(believed_ood.logits.softmax(dim=1).sum(dim=0).argmin())

    def state_dict(self) -> dict[str, Any]:
        """The fitted Gaussian (tensors + strings) and the site it belongs to."""
        return {"site": self.site.name, "gaussian": self._fitted().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("site") != self.site.name:
            raise StateError(f"saved gradient Mahalanobis used site {state.get('site')!r}, this one uses {self.site.name!r}")
        gaussian = TiedGaussian.from_state_dict(state["gaussian"])
        if gaussian.dim != self.site.dim or gaussian.num_classes != self.classifier.num_classes:
            raise StateError(f"saved Gaussian is {gaussian.num_classes} classes x {gaussian.dim} dims, "
                             f"this classifier and site need {self.classifier.num_classes} x {self.site.dim}")
        self.gaussian = gaussian
        self._kernel_stats = None

    def _fitted(self) -> TiedGaussian:
        if self.gaussian is None:
            raise StateError("gradient Mahalanobis is not fitted; call fit(known, labels) first")
        return self.gaussian


def _chunks(total: int, size: int) -> list[torch.Tensor]:
    return [torch.arange(start, min(start + size, total)) for start in range(0, total, size)]
