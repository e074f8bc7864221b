"""Training checkpoints: everything needed to resume a run and end with the same weights.

A checkpoint is one `torch.save` file written atomically (the previous checkpoint survives a
crash mid-write) and read back with `weights_only=True`, so loading a file never runs code.
Anything unreadable, truncated, foreign or of another format version is a `StateError` naming
the file.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from edge_runtime.atomic import write_bytes_atomic
from edge_runtime.errors import StateError

FORMAT_VERSION = 2  # 2: the training-only auxiliary head's state
_FORMAT_KEY = "edge_runtime_checkpoint_version"


@dataclass
class TrainingCheckpoint:
    """The state of a training run between two batches.

    `epoch` counts finished epochs and `step` the batches already done in the next one; `order`
    is that epoch's sample order when `step > 0`. `rng` is the state of the generator that draws
    orders and augmentations; `config` is the training config the run was started with;
    `auxiliary` holds the rotation head's weights when the run trains one.
    """

    model: dict[str, torch.Tensor]
    auxiliary: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch: int
    step: int
    order: torch.Tensor | None
    rng: torch.Tensor
    config: dict[str, Any]
    history: list[float]
    epoch_loss_sum: float
    ema: dict[str, torch.Tensor] | None
    ema_updates: int


def save_checkpoint(path: str | os.PathLike, checkpoint: TrainingCheckpoint) -> None:
    """Serialise to memory, then replace `path` atomically."""
    buffer = io.BytesIO()
    torch.save({_FORMAT_KEY: FORMAT_VERSION, **asdict(checkpoint)}, buffer)
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as exc:
        raise StateError(f"cannot write checkpoint {path}: {exc}") from exc


def load_checkpoint(path: str | os.PathLike) -> TrainingCheckpoint:
    """Read and validate a checkpoint onto the CPU."""
    source = Path(path)
    if not source.is_file():
        raise StateError(f"checkpoint {source} does not exist")
    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file fails in many ways (zip, pickle, key, EOF errors); all mean the same
        raise StateError(f"checkpoint {source} is truncated, corrupt or holds objects other than tensors: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(raw, dict) or _FORMAT_KEY not in raw:
        raise StateError(f"{source} is not an edge_runtime training checkpoint")
    if raw[_FORMAT_KEY] != FORMAT_VERSION:
        raise StateError(f"checkpoint {source} has format version {raw[_FORMAT_KEY]!r}; this runtime reads {FORMAT_VERSION}")
    expected = {f.name for f in fields(TrainingCheckpoint)}
    missing = sorted(expected - raw.keys())
    unknown = sorted(raw.keys() - expected - {_FORMAT_KEY})
    if missing or unknown:
        raise StateError(f"checkpoint {source} does not match format version {FORMAT_VERSION}: "
                         f"missing {missing}, unknown {unknown}")
    return TrainingCheckpoint(**{name: raw[name] for name in expected})
