"""Novelty from the gradients a VAE needs to reconstruct an input (Kwon et al., DESIGN.md method 2).

A VAE trained on known images only reconstructs them with little loss; an unfamiliar input asks
for a larger, differently shaped update. The per-sample gradient of the reconstruction loss w.r.t.
one decoder layer is the feature: the first decoder layer reacts to what is decoded (novel classes),
the last one to pixel-level statistics (novel conditions: blur, noise, haze, rain). No novel data is
available at fit time, so the paper trains a 2-layer classifier on known images (0) vs
Gaussian-noise-distorted known images (1) and scores with its logit. That classifier learns what
noise looks like, which transfers poorly to novel classes (benchmarks/results/one_class_*), so the
default head is ours: the squared Mahalanobis distance of the gradient to those of held-out known
images, the core method's statistic on the VAE's gradients, with no stand-in outliers at all.

The first decoder layer's gradient can also be read as its two factors (`gradient_factors`): the
gradient at the layer's pre-activations and the latent code, whose outer product is the weight
gradient. Same information, hidden + latent numbers instead of hidden * (latent + 1), so the
Mahalanobis head's covariance is estimated rather than shrunk away on a few hundred images.

The activation baselines of the paper run through the same head: the per-pixel reconstruction
error vector and the per-dimension KL (latent) loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import trange

from calibration.gaussian import TiedGaussian, fit_tied_gaussian
from calibration.moments import ClassMoments
from edge_runtime.config import VAEGradientConfig
from edge_runtime.detectors.feature_head import FeatureHead, HeadJob, HeadRecipe, train_feature_heads
from edge_runtime.detectors.pixel_base import PixelDetector
from edge_runtime.errors import InputError, StateError

# Per-sample gradients are computed this many images at a time (bounds the vmap's memory).
GRADIENT_CHUNK = 256
CLASSIFIER_BATCH = 128


class ConvVAE(nn.Module):
    """Two stride-2 convs -> Gaussian latent -> two linear layers -> two stride-2 transposed convs.

    `forward` decodes the posterior mean, so the reconstruction loss (and its gradient) is a
    deterministic function of the input; `elbo_terms` samples the latent for training.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, width: int, decoder_hidden: int) -> None:
        super().__init__()
        channels, height, width_px = image_shape
        if height % 4 or width_px % 4:
            raise InputError(f"the VAE halves the image twice: height and width must be multiples of 4, "
                             f"got image_shape {image_shape}")
        self.image_shape = image_shape
        self.code_shape = (2 * width, height // 4, width_px // 4)
        code_size = self.code_shape[0] * self.code_shape[1] * self.code_shape[2]
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(code_size, 2 * latent_dim))
        self.decoder_first = nn.Linear(latent_dim, decoder_hidden)
        self.decoder_expand = nn.Linear(decoder_hidden, code_size)
        self.decoder_up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.decoder_last = nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z | x)."""
        return self.encoder(images * 2 - 1).chunk(2, dim=1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Pixel logits [B, C, H, W]; sigmoid gives the reconstruction."""
        return self.decode_pre_activation(self.decoder_first(latent))

    def decode_pre_activation(self, pre_activation: torch.Tensor) -> torch.Tensor:
        """Pixel logits from the first decoder layer's pre-activations (where its gradient factors are read)."""
        code = F.relu(self.decoder_expand(F.relu(pre_activation))).view(-1, *self.code_shape)
        return self.decoder_last(F.relu(self.decoder_up(code)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean, _ = self.encode(images)
        return self.decode(mean)

    def elbo_terms(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction loss [B], KL [B]) with one reparameterised latent sample each."""
        mean, log_var = self.encode(images)
        latent = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        return reconstruction_loss(self.decode(latent), images), kl_per_dimension(mean, log_var).sum(dim=1)

    def site_parameters(self, site: str) -> dict[str, nn.Parameter]:
        """The parameters of the gradient site, by their names in `named_parameters`."""
        prefix = {"first_decoder": "decoder_first.", "last_decoder": "decoder_last."}[site]
        return {name: p for name, p in self.named_parameters() if name.startswith(prefix)}


def reconstruction_loss(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood summed over pixels, per sample [B]."""
    return F.binary_cross_entropy_with_logits(logits, images, reduction="none").flatten(1).sum(dim=1)


def kl_per_dimension(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per latent dimension [B, latent_dim]: the paper's latent loss, kept as a vector."""
    return 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var)


def site_gradients(vae: ConvVAE, images: torch.Tensor, site: str) -> torch.Tensor:
    """Per-sample gradients [B, P] of the reconstruction loss w.r.t. the site's weights and bias.

    One vmap over the batch (torch.func), no Python loop over samples; the VAE has no batch
    statistics, so every row depends on its own image only.
    """
    trainable = vae.site_parameters(site)
    frozen = {name: p.detach() for name, p in vae.named_parameters() if name not in trainable}
    site_values = {name: p.detach() for name, p in trainable.items()}

    def loss(values: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        logits = functional_call(vae, {**frozen, **values}, (image.unsqueeze(0),))
        return reconstruction_loss(logits, image.unsqueeze(0)).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))
    parts = []
    for chunk in images.split(GRADIENT_CHUNK):
        grads = per_sample(site_values, chunk)
        parts.append(torch.cat([grads[name].flatten(1) for name in sorted(grads)], dim=1))
    return torch.cat(parts)


def first_decoder_gradient_factors(vae: ConvVAE, images: torch.Tensor) -> torch.Tensor:
    """The first decoder layer's per-sample gradient as its factors [B, hidden + latent]: (delta, z).

    The layer maps the latent mean z to pre-activations W z + b, so the loss's gradient is delta
    for b and delta z^T for W, where delta is the gradient at the pre-activations: the
    hidden * (latent + 1) numbers of `site_gradients` are products of these hidden + latent ones.
    A Gaussian over the factors is estimated from a few hundred images, where one over all the
    products is mostly shrinkage. One backward pass serves the batch: each sample's loss depends
    on its own row only.
    """
    with torch.no_grad():
        latent, _ = vae.encode(images)
        pre_activation = vae.decoder_first(latent)
    pre_activation.requires_grad_(True)
    with torch.enable_grad():
        loss = reconstruction_loss(vae.decode_pre_activation(pre_activation), images).sum()
        (delta,) = torch.autograd.grad(loss, pre_activation)
    return torch.cat([delta, latent], dim=1)


class VAEGradientDetector(PixelDetector):
    """Score = the head's output on one feature of the VAE; higher = more novel.

    Heads: `noise_classifier` is the paper's recipe (the 2-layer classifier's logit, known vs
    noise-distorted known images); `mahalanobis` (ours) is the squared Mahalanobis distance to the
    features of held-out known images, the core method's statistic applied to the VAE's gradients,
    which needs no stand-in outliers. Looks at pixels only (`Observations.images`, [0,1] NCHW);
    the frozen classifier plays no part.
    """

    name = "vae_gradient"

    def __init__(self, image_shape: tuple[int, int, int], config: VAEGradientConfig = VAEGradientConfig(),
                 seed: int = 0, progress: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__(image_shape, seed, progress, device)
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vae = ConvVAE(self.image_shape, config.latent_dim, config.width, config.decoder_hidden)
        self.classifier_net: FeatureHead | None = None
        self.gaussian: TiedGaussian | None = None

    def fit_pixels(self, images: torch.Tensor) -> "VAEGradientDetector":
        """Train the VAE on most known images, then the head on the held-out rest."""
        self.fit_vae(images)
        return self.fit_head(images)

    def fit_vae(self, images: torch.Tensor) -> "VAEGradientDetector":
        """Train the VAE (ELBO, Adam) on the part of `images` not held out for the head."""
        vae_part, _ = self._split(images)
        vae = self.vae.to(images.device).train()
        optimiser = torch.optim.Adam(vae.parameters(), lr=self.config.vae_lr)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for _ in trange(self.config.vae_epochs, desc="VAE epochs", disable=not self.progress, leave=False):
                for index in torch.randperm(len(vae_part), generator=generator).split(self.config.batch_size):
                    reconstruction, kl = vae.elbo_terms(vae_part[index.to(images.device)])
                    loss = (reconstruction + kl).mean()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
        vae.eval()
        return self

    def fit_head(self, images: torch.Tensor) -> "VAEGradientDetector":
        """Fit the configured head on the held-out part of `images` (the same split `fit_vae` used).

        Public so that heads and features can be compared on one trained VAE (set `vae` first).
        """
        _, head_part = self._split(images)
        inliers = self.features(head_part)
        if self.config.head == "mahalanobis":
            moments = ClassMoments(1, inliers.shape[1], inliers.device)
            moments.update(inliers.double(), torch.zeros(len(inliers), dtype=torch.long, device=inliers.device))
            self.gaussian = fit_tied_gaussian(moments, "ledoit_wolf", 0.0)
            return self
        generator = torch.Generator().manual_seed(self.seed + 1)
        noise = torch.randn(head_part.shape, generator=generator).to(head_part)
        distorted = (head_part + self.config.noise_std * noise).clamp(0.0, 1.0)
        self._train_classifier(inliers, self.features(distorted), generator)
        return self

    def score_pixels(self, images: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        features = self.features(images)
        if self.config.head == "mahalanobis":
            gaussian = self.gaussian = self.gaussian.to(features.device)
            return gaussian.score(features, torch.zeros(len(features), dtype=torch.long, device=features.device)).float()
        with torch.no_grad():
            return self.classifier_net.to(features.device)(features).float()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The configured feature [B, D] of images [B, C, H, W] in [0, 1]."""
        vae = self.vae.to(images.device).eval()
        if self.config.feature == "gradient":
            return site_gradients(vae, images, self.config.site)
        if self.config.feature == "gradient_factors":
            return torch.cat([first_decoder_gradient_factors(vae, chunk) for chunk in images.split(GRADIENT_CHUNK)])
        with torch.no_grad():
            mean, log_var = vae.encode(images)
            if self.config.feature == "latent":
                return kl_per_dimension(mean, log_var)
            return (torch.sigmoid(vae.decode(mean)) - images).square().flatten(1)

    def _split(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(VAE part, head part): a seeded random `holdout_fraction` goes to the head (all of it when 0)."""
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed)).to(images.device)
        held = int(len(images) * self.config.holdout_fraction)
        vae_part = images[order[held:]]
        head_part = images[order[:held]] if held else images
        if len(vae_part) < 2 or len(head_part) < 2:
            raise InputError(f"vae_gradient needs at least 2 known images for the VAE and 2 for its head; got "
                             f"{len(images)} with holdout_fraction {self.config.holdout_fraction}")
        return vae_part, head_part

    def _train_classifier(self, inliers: torch.Tensor, outliers: torch.Tensor, generator: torch.Generator) -> None:
        """BCE: inliers target 0, the same images noise-distorted target 1 (as many, so unweighted)."""
        job = HeadJob(torch.cat([inliers, outliers]),
                      torch.cat([torch.zeros(len(inliers)), torch.ones(len(outliers))]).to(inliers.device),
                      inliers.mean(dim=0), inliers.std(dim=0).clamp_min(1e-8), 1.0, self.seed + 1, generator)
        recipe = HeadRecipe(self.config.classifier_hidden, self.config.classifier_epochs, CLASSIFIER_BATCH,
                            self.config.classifier_lr)
        (self.classifier_net,) = train_feature_heads([job], recipe, self.progress)

    def _require_fitted(self) -> None:
        if self.gaussian is None and self.classifier_net is None:
            raise StateError(f"{self.name} is not fitted yet: call fit(known, labels) first")

    def state_dict(self) -> dict[str, Any]:
        """VAE and head (tensors and strings) plus the feature and head they were fitted for."""
        self._require_fitted()
        head = (self.gaussian.state_dict() if self.config.head == "mahalanobis"
                else {k: v.detach().cpu().clone() for k, v in self.classifier_net.state_dict().items()})
        return {"feature": self.config.feature, "site": self.config.site, "head_kind": self.config.head,
                "vae": {k: v.detach().cpu().clone() for k, v in self.vae.state_dict().items()}, "head": head}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state.get("feature"), state.get("site"), state.get("head_kind"))
        if saved != (self.config.feature, self.config.site, self.config.head):
            raise StateError(f"saved vae_gradient is (feature, site, head) {saved}, this one is "
                             f"{(self.config.feature, self.config.site, self.config.head)}")
        try:
            self.vae.load_state_dict(state["vae"])
            if self.config.head == "mahalanobis":
                self.gaussian = TiedGaussian.from_state_dict(state["head"])
            else:
                network = FeatureHead(state["head"]["mean"].shape[0], self.config.classifier_hidden)
                network.load_state_dict(state["head"])
                self.classifier_net = network.eval()
        except (RuntimeError, KeyError) as exc:
            raise StateError(f"saved vae_gradient weights do not fit this config: {exc}") from None
