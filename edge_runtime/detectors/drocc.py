"""DROCC and DROCC-LF (Goyal et al., ICML 2020; DESIGN.md method 3).

DROCC assumes the known data lie on a locally linear low-dimensional manifold: a point at distance
between r and gamma*r from a training point is a negative. Each step, a classifier is trained on
the positives (cross-entropy, target "normal") plus negatives found by normalised gradient ascent
from random starts around each positive (the points the current model finds most normal),
projected back into the annulus r <= ||x~ - x|| <= gamma*r every few steps. The first `ce_epochs`
epochs use the cross-entropy alone.

DROCC-LF measures the annulus in a feature-weighted norm ||h||_S = sqrt(sum_j s_j h_j^2), with S the
per-sample magnitude of the classifier's input gradient (normalised to mean 1): directions the
classifier does not care about are cheap, so the negatives are pushed along the ones that matter,
which a few labelled negatives teach. The projection onto {r <= ||h||_S <= gamma r} is the exact
Euclidean projection of the paper's Proposition 1, h~ = h / (1 + tau s), with tau found by
bisection for the whole batch at once.

Everything is batched tensor code: it runs on whatever device the inputs live on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from edge_runtime.config import DROCCConfig
from edge_runtime.detectors.pixel_base import NetworkPixelDetector
from edge_runtime.errors import ConfigError, InputError

VARIANTS = ("drocc", "drocc_lf")
SCORE_CHUNK = 1024
BISECTION_STEPS = 60
LF_WEIGHT_FLOOR = 1e-3  # keeps the feature-weighted norm a norm when a gradient entry is exactly zero


class Standardize(nn.Module):
    """Per-channel standardisation fitted on the positives; the annulus radius is in these units."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    def fit(self, images: torch.Tensor) -> None:
        self.mean.copy_(images.mean(dim=(0, 2, 3), keepdim=True))
        self.std.copy_(images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class LeNet(nn.Module):
    """Deep SVDD's LeNet family (as DROCC uses): conv5x5-BN-LeakyReLU-maxpool blocks, then 2 hidden fc.

    One to three blocks, as many as keep the feature map at least 4 pixels wide (3 for 32x32,
    2 for 28x28, 1 for 8x8); widths w, 2w, 4w; BatchNorm without affine parameters.
    """

    def __init__(self, image_shape: tuple[int, int, int], width: int, rep_dim: int = 128) -> None:
        super().__init__()
        channels, height, width_px = image_shape
        blocks = max(1, min(3, int(math.log2(min(height, width_px) / 4))))
        layers: list[nn.Module] = []
        for block in range(blocks):
            out_channels = width * 2 ** block
            layers += [nn.Conv2d(channels, out_channels, 5, padding=2, bias=False),
                       nn.BatchNorm2d(out_channels, eps=1e-4, affine=False), nn.LeakyReLU(0.01), nn.MaxPool2d(2)]
            channels = out_channels
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = channels * (height >> blocks) * (width_px >> blocks)
        self.head = nn.Sequential(nn.Linear(flat, rep_dim), nn.LeakyReLU(0.01),
                                  nn.Linear(rep_dim, rep_dim // 2), nn.LeakyReLU(0.01), nn.Linear(rep_dim // 2, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).squeeze(1)


def mlp(in_dim: int, width: int) -> nn.Module:
    """A 2-hidden-layer ReLU network -> one logit per row, for vector data (the synthetic sets)."""
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 1), nn.Flatten(0))


def _norms(h: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ||h|| [B] (or the weighted ||h||_S), over every non-batch dimension."""
    squares = h.square() if weights is None else weights * h.square()
    return squares.flatten(1).sum(dim=1).sqrt()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


def project_annulus(h: torch.Tensor, radius: float, gamma: float) -> torch.Tensor:
    """Rescale each row of h so that radius <= ||h|| <= gamma * radius (the Euclidean projection)."""
    norms = _norms(h).clamp_min(1e-12)
    return h * _per_sample(norms.clamp(radius, gamma * radius) / norms, h)


def project_weighted_annulus(h: torch.Tensor, weights: torch.Tensor, radius: float, gamma: float) -> torch.Tensor:
    """Euclidean projection of each row of h onto {radius <= ||h||_S <= gamma*radius}, S = diag(weights).

    Proposition 1 of the DROCC paper: the nearest point on the level set ||h~||_S = t is
    h~ = h / (1 + tau * s) (elementwise), with tau the root of ||h~(tau)||_S = t, which is monotone
    in tau on (-1 / max s, inf). Rows already inside are kept; the others go to the nearer bound.
    tau is found by bisection on all rows at once; a final rescale absorbs the bisection's last bit.
    """
    if weights.shape != h.shape or bool((weights <= 0).any()):
        raise InputError(f"weights must be positive and shaped like h {tuple(h.shape)}, got {tuple(weights.shape)}")
    norms = _norms(h, weights)
    target = norms.clamp(radius, gamma * radius)
    inside = norms == target
    s_max = weights.flatten(1).amax(dim=1)

    def weighted_norm(tau: torch.Tensor) -> torch.Tensor:
        return _norms(h / (1 + _per_sample(tau, h) * weights), weights)

    # Too far out: tau in (0, hi] with hi doubled until the norm drops below target.
    # Too close in: tau in (-1/s_max, 0]; the norm grows without bound as tau -> -1/s_max.
    grow = norms < target
    low = torch.where(grow, -(1 - 1e-9) / s_max, torch.zeros_like(norms))
    high = torch.where(grow, torch.zeros_like(norms), 1.0 / s_max)
    for _ in range(BISECTION_STEPS):
        short = ~grow & (weighted_norm(high) > target)
        if not bool(short.any()):
            break
        high = torch.where(short, high * 4, high)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        too_big = weighted_norm(middle) > target  # the norm decreases as tau grows
        low = torch.where(too_big, middle, low)
        high = torch.where(too_big, high, middle)
    tau = (low + high) / 2
    projected = h / (1 + _per_sample(tau, h) * weights)
    projected = projected * _per_sample(target / _norms(projected, weights).clamp_min(1e-12), h)
    return torch.where(_per_sample(inside, h), h, projected)


def input_gradient_weights(network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """DROCC-LF's S: |d logit / d x| per sample, normalised to mean 1 over each sample's entries.

    Taken in eval mode (per-sample, BatchNorm statistics untouched); the mode is restored after.
    """
    was_training = network.training
    network.eval()
    inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        gradient, = torch.autograd.grad(network(inputs).sum(), inputs)
    network.train(was_training)
    magnitude = gradient.abs()
    mean = magnitude.flatten(1).mean(dim=1).clamp_min(1e-12)
    return (magnitude / _per_sample(mean, magnitude)).clamp_min(LF_WEIGHT_FLOOR)


def adversarial_negatives(network: nn.Module, positives: torch.Tensor, config: DROCCConfig,
                          weights: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Points in each positive's annulus that the network scores most normal (normalised ascent).

    Start from x + N(0, I) projected into the annulus; each step moves along the per-sample
    normalised gradient that raises the 'normal' logit, and every `projection_interval` steps (and
    after the last) the offset is projected back. With `search_batchnorm: eval` the network is in
    eval mode here, so the search sees the per-sample decision the deployed model makes and leaves
    BatchNorm statistics alone; `train` normalises each step's batch of candidates by its own
    statistics (and updates the stored ones), as the authors' public trainer does.
    """
    def project(h: torch.Tensor) -> torch.Tensor:
        if weights is None:
            return project_annulus(h, config.radius, config.gamma)
        return project_weighted_annulus(h, weights, config.radius, config.gamma)

    was_training = network.training
    network.train(config.search_batchnorm == "train")
    offset = project(torch.randn(positives.shape, generator=generator).to(positives))
    for step in range(config.ascent_steps):
        candidate = (positives + offset).requires_grad_(True)
        with torch.enable_grad():
            loss = F.binary_cross_entropy_with_logits(network(candidate), torch.zeros(len(candidate), device=candidate.device))
            gradient, = torch.autograd.grad(loss, candidate)
        step_direction = gradient / _per_sample(_norms(gradient).clamp_min(1e-12), gradient)
        offset = offset + config.ascent_step_size * step_direction
        if (step + 1) % config.projection_interval == 0 or step + 1 == config.ascent_steps:
            offset = project(offset)
    network.train(was_training)
    return (positives + offset).detach()


def learning_rate(config: DROCCConfig, epoch: int) -> float:
    """The paper's schedule: full rate for the CE-only epochs and the first 40% of the adversarial
    ones, a tenth until 80%, a hundredth after."""
    adversarial = config.epochs - config.ce_epochs
    done = epoch - config.ce_epochs
    if done < 0.4 * adversarial:
        return config.lr
    return config.lr * (0.1 if done < 0.8 * adversarial else 0.01)


def train_drocc(network: nn.Module, positives: torch.Tensor, config: DROCCConfig, feature_weighted: bool = False,
                negatives: torch.Tensor | None = None, seed: int = 0, progress: bool = False) -> nn.Module:
    """Train `network` (inputs -> one 'normal' logit per row) with the DROCC objective; returns it in eval mode.

    loss = BCE(positives -> 1) [+ BCE(labelled negatives -> 0)] + mu * BCE(adversarial negatives -> 0).
    `negatives` are the few labelled ones of the limited-negatives setting (DROCC-LF's use case);
    `feature_weighted` measures the annulus in DROCC-LF's weighted norm.
    """
    if len(positives) < 2:
        raise InputError(f"DROCC needs at least 2 positives, got {len(positives)}")
    generator = torch.Generator().manual_seed(seed)
    device = positives.device
    optimiser = torch.optim.Adam(network.parameters(), lr=config.lr)
    network.train()
    for epoch in trange(config.epochs, desc="DROCC epochs", disable=not progress, leave=False):
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(config, epoch)
        for index in torch.randperm(len(positives), generator=generator).split(config.batch_size):
            if len(index) < 2:
                continue  # BatchNorm cannot train on a single sample
            batch = positives[index.to(device)]
            inputs, targets = batch, torch.ones(len(batch), device=device)
            if negatives is not None and len(negatives):
                pick = torch.randperm(len(negatives), generator=generator)[:len(batch)].to(device)
                inputs = torch.cat([batch, negatives[pick]])
                targets = torch.cat([targets, torch.zeros(len(pick), device=device)])
            loss = F.binary_cross_entropy_with_logits(network(inputs), targets)
            if epoch >= config.ce_epochs and config.mu > 0:
                weights = input_gradient_weights(network, batch) if feature_weighted else None
                adversarial = adversarial_negatives(network, batch, config, weights, generator)
                adversarial_logits = network.train(config.search_batchnorm == "train")(adversarial)
                network.train()
                loss = loss + config.mu * F.binary_cross_entropy_with_logits(
                    adversarial_logits, torch.zeros(len(adversarial), device=device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return network.eval()


class DROCCDetector(NetworkPixelDetector):
    """Score = -logit of the DROCC classifier on the standardised pixels; higher = more novel.

    `drocc_lf` on images has no labelled negatives to learn its feature weights from, so it uses
    `lf_negatives` noise-distorted known images as the few negatives (as vae_gradient does for
    its stand-in outliers). Looks at pixels only; the frozen classifier plays no part.
    """

    refit_keeps_score_scale = False  # measured on digits: fold models' median logit -5.0, a refit's -7.7

    def __init__(self, image_shape: tuple[int, int, int], config: DROCCConfig = DROCCConfig(),
                 variant: str = "drocc", seed: int = 0, progress: bool = False,
                 device: torch.device | str | None = None) -> None:
        if variant not in VARIANTS:
            raise ConfigError(f"DROCC variant must be one of {VARIANTS}, got {variant!r}")
        super().__init__(image_shape, seed, progress, device)
        self.name = variant
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = nn.Sequential(Standardize(self.image_shape[0]), LeNet(self.image_shape, config.width))

    def fit_pixels(self, images: torch.Tensor) -> "DROCCDetector":
        """Train on all known images as one positive class."""
        network = self.network.to(images.device)
        network[0].fit(images)
        negatives = None
        if self.name == "drocc_lf" and self.config.lf_negatives:
            generator = torch.Generator().manual_seed(self.seed + 1)
            pick = torch.randperm(len(images), generator=generator)[:self.config.lf_negatives].to(images.device)
            noise = torch.randn(images[pick].shape, generator=generator).to(images)
            negatives = (images[pick] + self.config.noise_std * noise).clamp(0.0, 1.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            train_drocc(network, images, self.config, self.name == "drocc_lf", negatives, self.seed, self.progress)
        self.fitted = True
        return self

    @torch.no_grad()
    def score_pixels(self, images: torch.Tensor) -> torch.Tensor:
        self.require_fitted()
        network = self.network.to(images.device).eval()
        return torch.cat([-network(chunk) for chunk in images.split(SCORE_CHUNK)]).float()
