"""Build the frozen classifier named by a `ModelConfig`.

Every network takes [0, 1] pixels: a `Normalize` with the training set's statistics comes first.
Built-in networks end in a linear layer named `fc`; a custom network keeps its own layout and is
wrapped as `normalize` + `model`, so its final layer is found at `model.<final_layer>`.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict

from torch import nn

from edge_runtime.config import ModelConfig
from edge_runtime.errors import ConfigError
from edge_runtime.models.base import FrozenClassifier, Normalize
from edge_runtime.models.fastnet import MIN_INPUT_SIZE, FastNet
from edge_runtime.models.resnet import CifarResNet
from edge_runtime.models.small_cnn import small_cnn

BUILT_IN_FINAL_LAYER = "fc"


def build_classifier(cfg: ModelConfig, num_classes: int, mean: tuple[float, ...],
                     std: tuple[float, ...]) -> FrozenClassifier:
    """A freshly initialised classifier for `num_classes` classes (uses torch's global RNG)."""
    if len(mean) != cfg.in_channels or len(std) != cfg.in_channels:
        raise ConfigError(f"model.in_channels is {cfg.in_channels} but the normalisation has "
                          f"{len(mean)} means and {len(std)} stds")
    if cfg.arch == "custom":
        return _build_custom(cfg, num_classes, mean, std)
    if cfg.final_layer != BUILT_IN_FINAL_LAYER:
        raise ConfigError(f"model.final_layer: arch {cfg.arch!r} names its final layer "
                          f"{BUILT_IN_FINAL_LAYER!r}, got {cfg.final_layer!r}")
    if cfg.arch == "small_cnn":
        network: nn.Module = small_cnn(num_classes, cfg.in_channels, cfg.width, mean, std)
    elif cfg.arch == "fastnet":
        if cfg.input_size < MIN_INPUT_SIZE:
            raise ConfigError(f"model.input_size: fastnet needs at least {MIN_INPUT_SIZE} pixels, got {cfg.input_size}")
        network = FastNet(num_classes, cfg.in_channels, cfg.width, mean, std)
    else:
        network = CifarResNet(cfg.arch, num_classes, cfg.in_channels, mean, std)
    return FrozenClassifier(network, BUILT_IN_FINAL_LAYER, cfg.mirror_average, cfg.shift_average)


def _build_custom(cfg: ModelConfig, num_classes: int, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> FrozenClassifier:
    """Call the user's factory, check its final layer, and put `Normalize` in front."""
    spec = cfg.factory or ""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"model.factory {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.factory {spec!r}: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"model.factory {spec!r}: {module_name!r} has no callable {attribute!r}")
    try:
        network = factory(num_classes=num_classes)
    except Exception as exc:
        raise ConfigError(f"model.factory {spec!r} failed when called with num_classes={num_classes}: {exc}") from exc
    if not isinstance(network, nn.Module):
        raise ConfigError(f"model.factory {spec!r} returned a {type(network).__name__}, not an nn.Module")
    try:
        final = network.get_submodule(cfg.final_layer)
    except AttributeError as exc:
        raise ConfigError(f"model.final_layer {cfg.final_layer!r} is not a submodule of the model built by {spec!r}") from exc
    if not isinstance(final, nn.Linear):
        raise ConfigError(f"model.final_layer {cfg.final_layer!r} is a {type(final).__name__}, not an nn.Linear")
    if final.out_features != num_classes:
        raise ConfigError(f"model.factory {spec!r} built a final layer with {final.out_features} outputs "
                          f"for {num_classes} classes")
    wrapped = nn.Sequential(OrderedDict(normalize=Normalize(mean, std), model=network))
    return FrozenClassifier(wrapped, f"model.{cfg.final_layer}", cfg.mirror_average, cfg.shift_average)
