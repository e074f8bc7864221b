"""Choosing the torch device a run uses."""

from __future__ import annotations

import torch

from edge_runtime.errors import ConfigError


def resolve_device(choice: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA on a machine without it is a ConfigError."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(choice)
