"""Maximum logit (Hendrycks et al., 2022; Vaze et al., 2022): the per-sample baseline for held-out classes.

Softmax divides away how strongly the network responds at all; the largest raw logit keeps it, and
open-set recognition found it tracks a good closed-set classifier's accuracy on new classes.
"""

from __future__ import annotations

import torch

from edge_runtime.detectors.base import Detector, Observations


class MaxLogitDetector(Detector):
    """Score = -max_c logits_c: a strong response of some known class means a known input."""

    name = "max_logit"

    def fit(self, known: Observations, labels: torch.Tensor) -> "MaxLogitDetector":
        """Nothing to fit: the frozen classifier's largest logit is the whole detector."""
        return self

    def score(self, batch: Observations) -> torch.Tensor:
        return -batch.logits.float().amax(dim=1)
