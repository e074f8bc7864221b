"""Training-time augmentation done on whole batches on the device.

Per-sample Python transforms would leave a GPU idle; here one random flip mask and one pair of
crop offsets per image are drawn from a dedicated generator (so resumed runs repeat them), and the
crops are gathered with a single indexing op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROTATIONS = 4  # right-angle turns of a square image, the upright one included


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of [B,C,H,W] left-right with probability 1/2."""
    flip = torch.rand(len(images), device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_translate(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image of [B,C,H,W] by up to `pixels` in x and y: reflect-pad, then crop at random."""
    if pixels == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (pixels, pixels, pixels, pixels), mode="reflect")
    offsets = torch.randint(0, 2 * pixels + 1, (2, batch), device=images.device, generator=generator)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # [B, W]
    picked = padded[torch.arange(batch, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)  # advanced indexing put the channel axis last


def augment_batch(images: torch.Tensor, *, flip: bool, translate: int, generator: torch.Generator) -> torch.Tensor:
    """The training augmentation: optional random flip, then random translation."""
    if flip:
        images = random_flip(images, generator)
    return random_translate(images, translate, generator)


def rotated_views(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All four rotations of [B,C,H,H] images stacked rotation-major ([4B,C,H,H]) and their rotation labels [4B]."""
    views = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(len(images))
    return views, labels


def random_rotation(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each square image of [B,C,H,W] turned by a random multiple of 90 degrees, and the turns [B] (0..3)."""
    turns = torch.randint(0, ROTATIONS, (len(images),), device=images.device, generator=generator)
    turned = images.clone()
    for k in range(1, ROTATIONS):  # each image is turned once, by its own k
        chosen = turns == k
        turned[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    return turned, turns
