"""The torch session's decision, written once: the reference the torch-free runner must reproduce."""

from __future__ import annotations

import torch

from edge_runtime.detectors.base import Detector, Observations


def decide(detector: Detector, batch: Observations, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels [B] int64, novel [B] bool, scores [B] float32) for an embedded batch.

    Novel when the detector's score > threshold, labelled `num_classes` (the '+1' class);
    otherwise the classifier's predicted label.
    """
    scores = detector.score(batch).float()
    novel = scores > threshold
    predicted = batch.logits.argmax(dim=1)
    labels = torch.where(novel, torch.full_like(predicted, batch.logits.shape[1]), predicted)
    return labels, novel, scores
