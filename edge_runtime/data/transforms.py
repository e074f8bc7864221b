"""Conforming images to what a model expects, and turning them into tensors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.data.arrays import ImageSet


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N,H,W,C] -> float32 [N,C,H,W] in [0, 1] on `device`."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def conform(data: ImageSet, size: int, channels: int) -> ImageSet:
    """Match channel count (grey <-> RGB) and spatial size (antialiased bilinear) for a model."""
    images = data.images
    if images.shape[3] != channels:
        if channels == 3 and images.shape[3] == 1:
            images = np.repeat(images, 3, axis=3)
        elif channels == 1 and images.shape[3] == 3:
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
            images = np.clip(images.astype(np.float32) @ weights + 0.5, 0, 255).astype(np.uint8)[..., None]
        else:
            raise ValueError(f"{data.name}: cannot convert {images.shape[3]} channels to {channels}")
    if images.shape[1:3] != (size, size):
        resized = []
        for start in range(0, len(images), 4096):
            chunk = to_tensor(images[start:start + 4096])
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            resized.append((chunk.clamp_(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        images = np.concatenate(resized) if resized else np.zeros((0, size, size, images.shape[3]), np.uint8)
    return ImageSet(images, data.labels, data.classes, data.name)
