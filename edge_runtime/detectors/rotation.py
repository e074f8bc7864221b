"""Rotation prediction as a one-class detector (Golan & El-Yaniv, NeurIPS 2018; Hendrycks et al., NeurIPS 2019).

A classifier learns which of the four right-angle rotations was applied to a known image. To tell
an upright car from an upside-down one it has to learn what the known class looks like, so on
images of anything else it cannot tell the rotations apart. The novelty score of x is
    sum_k -log p(k | rot_k(x)),   k = 0, 90, 180, 270 degrees,
the rotation cross-entropy summed over the four views (higher = more novel). Unlike DROCC it needs
no notion of distance in pixel space and no negatives of any kind.

The classifier is the project's FastNet (patch-whitening first layer fitted on the known images),
trained with one-cycle Nesterov SGD on flipped and shifted known images, every image of a batch
seen at all four rotations. Rotations keep an image's shape only when it is square.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import trange

from edge_runtime.config import RotationConfig
from edge_runtime.detectors.pixel_base import NetworkPixelDetector
from edge_runtime.errors import ConfigError, InputError
from edge_runtime.models.fastnet import MIN_INPUT_SIZE, FastNet, whiten_first_conv
from edge_runtime.training.augment import ROTATIONS, augment_batch, rotated_views

SCORE_CHUNK = 512


def rotation_scores(network: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """sum_k -log p(k | rot_k(x)) per image [B]: how badly the network reads the rotations of each image."""
    views, labels = rotated_views(images)
    losses = F.cross_entropy(network(views), labels, reduction="none")
    return losses.view(ROTATIONS, len(images)).sum(dim=0)


def train_rotation_net(network: FastNet, images: torch.Tensor, config: RotationConfig, seed: int = 0,
                       progress: bool = False) -> FastNet:
    """Fit `network` (4 outputs) to predict the rotation of augmented known images; returned in eval mode."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    order_generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(trainable, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(images) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.lr, total_steps=config.epochs * steps_per_epoch,
                                                   pct_start=0.2)
    network.train()
    for _ in trange(config.epochs, desc="rotation epochs", disable=not progress, leave=False):
        for index in torch.randperm(len(images), generator=order_generator).split(config.batch_size):
            batch = augment_batch(images[index.to(images.device)], flip=config.flip, translate=config.translate,
                                  generator=generator)
            views, labels = rotated_views(batch)
            loss = F.cross_entropy(network(views), labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return network.eval()


class RotationDetector(NetworkPixelDetector):
    """Score = the rotation classifier's summed cross-entropy over the four rotations of an image."""

    name = "rotation"
    refit_keeps_score_scale = False  # a trained net, like DROCC's: how well it fits (its loss scale) varies per run

    def __init__(self, image_shape: tuple[int, int, int], config: RotationConfig = RotationConfig(), seed: int = 0,
                 progress: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__(image_shape, seed, progress, device)
        channels, height, width = self.image_shape
        if height != width or height < MIN_INPUT_SIZE:
            raise ConfigError(f"rotation needs square images at least {MIN_INPUT_SIZE} pixels wide (rotations must keep "
                              f"the shape, and its FastNet pools three times), got {height}x{width}")
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = FastNet(ROTATIONS, channels, config.width, (0.0,) * channels, (1.0,) * channels)

    def fit_pixels(self, images: torch.Tensor) -> "RotationDetector":
        """Standardise with the known images' channel statistics, whiten on them, then train."""
        if len(images) < 2:
            raise InputError(f"rotation needs at least 2 known images to train on, got {len(images)}")
        network = self.network.to(images.device)
        network.normalize.mean.copy_(images.mean(dim=(0, 2, 3)).view_as(network.normalize.mean))
        network.normalize.std.copy_(images.std(dim=(0, 2, 3)).clamp_min(1e-6).view_as(network.normalize.std))
        whiten_first_conv(network, images)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            train_rotation_net(network, images, self.config, self.seed, self.progress)
        self.fitted = True
        return self

    @torch.no_grad()
    def score_pixels(self, images: torch.Tensor) -> torch.Tensor:
        self.require_fitted()
        network = self.network.to(images.device).eval()
        return torch.cat([rotation_scores(network, chunk) for chunk in images.split(SCORE_CHUNK)]).float()
