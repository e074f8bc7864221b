"""The frozen classifier as the rest of the runtime sees it: features and logits in one pass."""

from __future__ import annotations

import threading

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel standardisation stored inside the model, so exports take [0,1] pixels as-is."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class FrozenClassifier(nn.Module):
    """Wraps any classifier whose last step is a named `nn.Linear`.

    `embed` returns the input of that layer (penultimate features, the `a` of the gradient
    closed form) and the logits, captured with a forward hook so user models need no changes.
    """

    def __init__(self, network: nn.Module, final_layer: str = "fc") -> None:
        super().__init__()
        self.network = network
        self.final_layer_name = final_layer
        layer = network.get_submodule(final_layer)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"final_layer {final_layer!r} is a {type(layer).__name__}, not an nn.Linear")

    @property
    def final_linear(self) -> nn.Linear:
        """The final layer, looked up rather than stored so the state dict names each weight once."""
        return self.network.get_submodule(self.final_layer_name)

    @property
    def num_classes(self) -> int:
        return self.final_linear.out_features

    @property
    def feature_dim(self) -> int:
        return self.final_linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, D], logits [B, C]) for pixels x in [0, 1], NCHW.

        Safe to call from several threads: the hook keeps only the final layer's input of the
        forward pass running in the calling thread.
        """
        captured: list[torch.Tensor] = []
        caller = threading.get_ident()

        def capture(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            if threading.get_ident() == caller:
                captured.append(inputs[0])

        handle = self.final_linear.register_forward_hook(capture)
        try:
            logits = self.network(x)
        finally:
            handle.remove()
        return captured[0].flatten(1), logits
