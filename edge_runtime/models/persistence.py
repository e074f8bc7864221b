"""The trained frozen classifier on disk: safetensors weights plus the model config that built them.

Separate from training checkpoints (which carry optimiser state for resuming): this file is what
evaluation, sessions and export load, and it refuses weights built for another architecture.
"""

from __future__ import annotations

import json
import os

import attrs
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from edge_runtime.atomic import write_bytes_atomic
from edge_runtime.config import ModelConfig, config_to_dict, section_from_dict
from edge_runtime.errors import ConfigError, StateError
from edge_runtime.models.base import FrozenClassifier
from edge_runtime.models.registry import build_classifier

FORMAT = "edge_runtime.classifier"
FORMAT_VERSION = "1"


def save_classifier(path: str | os.PathLike, classifier: FrozenClassifier, model_cfg: ModelConfig,
                    classes: tuple[str, ...]) -> None:
    """Write weights and the config that rebuilds them, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "model": json.dumps(config_to_dict(model_cfg)),
                "classes": json.dumps(list(classes))}
    write_bytes_atomic(path, save_tensors(state, metadata=metadata))


def load_classifier(path: str | os.PathLike, model_cfg: ModelConfig) -> tuple[FrozenClassifier, tuple[str, ...]]:
    """Rebuild the classifier saved at `path`; its model config must equal `model_cfg`."""
    try:
        with open(path, "rb") as handle:
            blob = handle.read()
    except OSError as exc:
        raise StateError(f"cannot read classifier {path}: {exc.strerror or exc}") from exc
    try:
        state = load_tensors(blob)
        metadata = _metadata(blob)
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise StateError(f"{path} is not a readable classifier file ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise StateError(f"{path} is not an edge_runtime classifier (format {metadata.get('format')!r})")
    if metadata.get("version") != FORMAT_VERSION:
        raise StateError(f"{path} has classifier format version {metadata.get('version')!r}; this runtime reads {FORMAT_VERSION}")
    saved_cfg = _saved_model_config(path, metadata)
    if _architecture(saved_cfg) != _architecture(model_cfg):
        raise StateError(f"{path} was trained with model config {config_to_dict(saved_cfg)}, "
                         f"but the run config says {config_to_dict(model_cfg)}")
    classes = tuple(json.loads(metadata["classes"]))
    # Normalize's statistics are buffers, so the placeholders below are overwritten by the saved ones.
    classifier = build_classifier(model_cfg, len(classes), (0.0,) * model_cfg.in_channels, (1.0,) * model_cfg.in_channels)
    try:
        classifier.load_state_dict(state)
    except RuntimeError as exc:
        raise StateError(f"{path}: weights do not fit the configured model: {exc}") from exc
    return classifier.eval(), classes


def _architecture(model_cfg: ModelConfig) -> ModelConfig:
    """The fields that decide what the weights are; `mirror_average` and `shift_average` only say
    how they are read, so weights trained under any setting serve under any other."""
    return attrs.evolve(model_cfg, mirror_average=False, shift_average=0)


def _saved_model_config(path: str | os.PathLike, metadata: dict[str, str]) -> ModelConfig:
    """The model config stored beside the weights: a JSON object of field -> value, as every version wrote it."""
    try:
        return section_from_dict(ModelConfig, json.loads(metadata["model"]), origin=f"{path} model config")
    except (KeyError, json.JSONDecodeError, ConfigError) as exc:
        raise StateError(f"{path} holds no readable model config ({exc})") from exc


def _metadata(blob: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ block."""
    header_size = int.from_bytes(blob[:8], "little")
    if header_size <= 0 or header_size > len(blob) - 8:
        raise ValueError("header size out of range")
    return json.loads(blob[8:8 + header_size]).get("__metadata__") or {}
