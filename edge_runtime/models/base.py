"""The frozen classifier as the rest of the runtime sees it: features and logits in one pass."""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from edge_runtime.errors import ConfigError


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
    With `mirror_average` every output `embed` gives is the mean over the image and its mirror
    image (one forward pass of both): a classifier trained with random flips knows both views,
    and their mean judges each input more reliably than either. `shift_average` (pixels, 0 = off)
    likewise adds each view moved that far left and right, as the training's random shifts move
    images, tripling the views. Features stay the input of the final layer (the mean of the views'
    inputs gives the mean of their logits), so the gradient closed form holds unchanged. `forward`
    stays one view: it is what training calls.
    """

    def __init__(self, network: nn.Module, final_layer: str = "fc", mirror_average: bool = False,
                 shift_average: int = 0) -> None:
        super().__init__()
        self.network = network
        self.final_layer_name = final_layer
        self.mirror_average = mirror_average
        self.shift_average = shift_average
        layer = network.get_submodule(final_layer)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"final_layer {final_layer!r} is a {type(layer).__name__}, not an nn.Linear")

    @property
    def final_linear(self) -> nn.Linear:
        """The final layer, looked up rather than stored so the state dict names each weight once."""
        return self.network.get_submodule(self.final_layer_name)

    def final_affine(self, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The final layer's weight [C, D] and bias [C] (zeros where it has none), detached, for
        detectors that recompute or invert the logits from the features."""
        layer = self.final_linear
        weight = layer.weight.detach().to(device, dtype)
        bias = torch.zeros(len(weight), dtype=dtype, device=device) if layer.bias is None \
            else layer.bias.detach().to(device, dtype)
        return weight, bias

    @property
    def num_classes(self) -> int:
        return self.final_linear.out_features

    @property
    def feature_dim(self) -> int:
        return self.final_linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, D], logits [B, C]) for pixels x in [0, 1], NCHW."""
        features, logits, _ = self.embed_with_stats(x, ())
        return features, logits

    def embed_with_stats(self, x: torch.Tensor, stat_layers: tuple[str, ...]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`embed` plus, when `stat_layers` names conv submodules, their outputs' per-channel mean
        and standard deviation over space, concatenated in order ([B, 2 x channels], else None).

        Early layers describe colour, sharpness and texture, which the penultimate features of a
        classifier trained to ignore them no longer carry; a novelty head can read both from one
        forward pass. Safe to call from several threads: hooks keep only the calling thread's pass.
        """
        caller = threading.get_ident()
        final_inputs: list[torch.Tensor] = []
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in stat_layers}

        def keeping(found: list[torch.Tensor], take_input: bool) -> Callable[..., None]:
            def capture(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                if threading.get_ident() == caller:
                    found.append(inputs[0] if take_input else output)
            return capture

        handles = [self.final_linear.register_forward_hook(keeping(final_inputs, True))]
        try:
            handles += [self._stat_layer(name).register_forward_hook(keeping(outputs[name], False))
                        for name in stat_layers]
            logits = self.network(self.views(x))
        finally:
            for handle in handles:
                handle.remove()
        features = final_inputs[0].flatten(1)
        stats = torch.cat([_channel_stats(name, outputs[name]) for name in stat_layers], dim=1) if stat_layers else None
        count = self.view_count
        if count == 1:
            return features, logits, stats
        return (_mean_of_views(features, count), _mean_of_views(logits, count),
                None if stats is None else _mean_of_views(stats, count))

    @property
    def view_count(self) -> int:
        """How many views of each image the network runs: 1, 2 (mirror), 3 (shifts) or 6 (both)."""
        return (2 if self.mirror_average else 1) * (3 if self.shift_average else 1)

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """The batch the network runs for `x` [B, ...]: `view_count` blocks of B, view-major.

        x itself; then its mirror when mirroring; then all of those moved `shift_average` pixels
        right, then left, when shifting.
        """
        base = torch.cat([x, x.flip(-1)]) if self.mirror_average else x
        if not self.shift_average:
            return base
        return torch.cat([base, _shifted(base, self.shift_average), _shifted(base, -self.shift_average)])

    def _stat_layer(self, name: str) -> nn.Module:
        try:
            return self.network.get_submodule(name)
        except AttributeError:
            top = ", ".join(child for child, _ in self.network.named_children())
            raise ConfigError(f"layer_stats names {name!r}, which is not a submodule of the classifier "
                              f"(its top-level modules: {top})") from None


def _mean_of_views(outputs: torch.Tensor, count: int) -> torch.Tensor:
    """[B, ...] from the [count x B, ...] outputs of `FrozenClassifier.views`: each image's mean over its views."""
    return outputs.unflatten(0, (count, -1)).mean(dim=0)


def _shifted(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """[B, C, H, W] moved `pixels` to the right (left when negative), the uncovered edge reflected
    as the training's shift augmentation pads it."""
    size = abs(pixels)
    width = images.shape[-1]
    padded = F.pad(images, (size, size, 0, 0), mode="reflect")
    start = 0 if pixels > 0 else 2 * size
    return padded[..., start:start + width]


def _channel_stats(name: str, outputs: list[torch.Tensor]) -> torch.Tensor:
    """[B, 2C]: per-channel mean and (population) standard deviation of one [B, C, H, W] output."""
    if len(outputs) != 1:
        raise ConfigError(f"layer_stats layer {name!r} ran {len(outputs)} times in one forward pass; "
                          f"name a module that runs once")
    output = outputs[0]
    if output.ndim != 4:
        raise ConfigError(f"layer_stats layer {name!r} outputs shape {tuple(output.shape)}; "
                          f"it needs a conv layer's [B, C, H, W]")
    flat = output.flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2, correction=0)], dim=1)
