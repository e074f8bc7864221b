"""An auxiliary rotation task for training the frozen classifier (Hendrycks et al. 2019).

Beside the class loss, a 4-way linear head on the penultimate features learns which right-angle
rotation each training image was given. Telling an upright object from a turned one needs its
shape and orientation, not only the texture that separates the known classes, so the features the
novelty heads later read describe an image more fully. The head exists only during training: the
saved classifier is the same network as without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.base import FrozenClassifier
from edge_runtime.training.augment import ROTATIONS, random_rotation


class RotationAuxiliary(nn.Module):
    """The training-only rotation head and the combined loss it adds to."""

    def __init__(self, feature_dim: int, weight: float) -> None:
        super().__init__()
        self.head = nn.Linear(feature_dim, ROTATIONS)
        self.weight = weight

    def loss(self, model: FrozenClassifier, batch: torch.Tensor, targets: torch.Tensor, label_smoothing: float,
             generator: torch.Generator) -> torch.Tensor:
        """Class cross-entropy on `batch` plus `weight` x rotation cross-entropy on a randomly turned copy.

        Both halves run as one forward pass (one set of BatchNorm statistics), the rotation head
        reading the final layer's input of the turned half.
        """
        turned, turns = random_rotation(batch, generator)
        final_inputs: list[torch.Tensor] = []
        handle = model.final_linear.register_forward_hook(lambda _m, inputs, _o: final_inputs.append(inputs[0]))
        try:
            logits = model(torch.cat([batch, turned]))
        finally:
            handle.remove()
        upright = len(batch)
        classification = F.cross_entropy(logits[:upright].float(), targets, label_smoothing=label_smoothing)
        rotation = F.cross_entropy(self.head(final_inputs[0][upright:].flatten(1)).float(), turns)
        return classification + self.weight * rotation
