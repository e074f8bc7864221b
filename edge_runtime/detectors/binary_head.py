"""The IDD/OOD binary classifier that the self-supervised detector trains on pseudo-labels.

Two architectures: `paper_cnn` looks at pixels, as the seed paper does (3 conv layers, one
BatchNorm, sigmoid output); `feature_head` looks at what the frozen classifier already computed
(penultimate features and the log-softmax of its logits, plus per-channel statistics of earlier
layers when `layer_stats` names them), which is cheaper and sees what the classifier itself finds
unfamiliar. Each `fit` starts from a fresh, seeded initialisation, so a
round never inherits a previous round's mistakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from edge_runtime.config import BinaryHeadConfig
from edge_runtime.detectors.base import Observations
from edge_runtime.detectors.feature_head import (FalseAlarmConstraint, FeatureHead, HeadJob, HeadRecipe,
                                                 train_feature_heads)
from edge_runtime.errors import ConfigError, InputError, StateError

HeadTask = tuple[Observations, torch.Tensor, int]  # one head's (samples, targets P(OOD), seed)


class PaperCNN(nn.Module):
    """conv-LeakyReLU, conv-BN-LeakyReLU, conv, spatial mean -> one logit (sigmoid gives P(OOD)).

    `use_batch_stats` normalises with the current batch's statistics without touching the running
    ones: the paper's `homogeneous_batches` protocol.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 1, 3, padding=1)

    def forward(self, images: torch.Tensor, use_batch_stats: bool = False) -> torch.Tensor:
        x = F.leaky_relu(self.conv1(images * 2 - 1), 0.2)
        x = self.conv2(x)
        if use_batch_stats and not self.training:
            x = F.batch_norm(x, None, None, self.norm.weight, self.norm.bias, True, 0.0, self.norm.eps)
        else:
            x = self.norm(x)
        return self.conv3(F.leaky_relu(x, 0.2)).mean(dim=(1, 2, 3))


class BinaryHead:
    """Trains and applies one IDD (target 0) / OOD (target 1) classifier; outputs P(OOD)."""

    def __init__(self, arch: str, config: BinaryHeadConfig = BinaryHeadConfig(), seed: int = 0,
                 progress: bool = False) -> None:
        if arch not in ("paper_cnn", "feature_head"):
            raise ConfigError(f"binary head arch must be 'paper_cnn' or 'feature_head', got {arch!r}")
        self.arch = arch
        self.config = config
        self.seed = seed
        self.progress = progress
        self.network: PaperCNN | FeatureHead | None = None
        self.in_dim = 0

    def fit(self, samples: Observations, targets: torch.Tensor) -> "BinaryHead":
        """Re-initialise and train for `epochs` epochs with Adam on targets P(OOD) in [0, 1].

        Hard pseudo-labels are 0/1; soft ones carry a belief. Both classes weigh the same in the
        loss (OOD mass is up-weighted by IDD mass / OOD mass), so a small OOD set is not ignored.
        """
        job = self._job(samples, targets)
        if self.arch == "feature_head":
            (network,) = train_feature_heads([job], _recipe(self.config), self.progress)
        else:
            network = self._train_paper_cnn(job)
        self.network = network.eval()
        return self

    def _job(self, samples: Observations, targets: torch.Tensor) -> HeadJob:
        """This head's training data, checked, with its standardisation, class weight and seeds."""
        targets = targets.float()
        if targets.shape != (len(samples),) or not ((targets >= 0) & (targets <= 1)).all():
            raise InputError(f"targets must be P(OOD) in [0, 1], shape [{len(samples)}], got {tuple(targets.shape)}")
        ood_mass = float(targets.sum())
        if ood_mass == 0 or ood_mass == len(targets):
            raise InputError("binary head targets hold one class only; need both IDD (0) and OOD (1) samples")
        inputs = self._inputs(samples)
        self.in_dim = inputs.shape[1]
        if self.arch == "feature_head":
            mean, std = inputs.mean(dim=0), inputs.std(dim=0).clamp_min(1e-6)
        else:
            mean, std = torch.zeros(()), torch.ones(())  # the CNN reads pixels as they are
        return HeadJob(inputs, targets.to(inputs.device), mean, std, (len(targets) - ood_mass) / ood_mass,
                       self.seed, torch.Generator().manual_seed(self.seed))

    def _train_paper_cnn(self, job: HeadJob) -> PaperCNN:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.init_seed)
            network = self._build(self.in_dim).to(job.inputs.device)
        ood_weight = torch.tensor(job.pos_weight, device=job.inputs.device)
        optimiser = torch.optim.Adam(network.parameters(), lr=self.config.lr,
                                     betas=(self.config.beta1, self.config.beta2))
        network.train()
        for _ in trange(self.config.epochs, desc=f"{self.arch} epochs", disable=not self.progress, leave=False):
            order = torch.randperm(len(job.inputs), generator=job.order).to(job.inputs.device)
            for start in range(0, len(order), self.config.batch_size):
                index = order[start:start + self.config.batch_size]
                if len(index) < 2:
                    continue  # BatchNorm cannot train on a single sample
                loss = F.binary_cross_entropy_with_logits(network(job.inputs[index]), job.targets[index],
                                                          pos_weight=ood_weight)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        return network

    @torch.no_grad()
    def predict(self, batch: Observations, use_batch_stats: bool = False) -> torch.Tensor:
        """P(OOD) [B], float32; `use_batch_stats` only changes the paper CNN's BatchNorm."""
        network, inputs = self._trained_with_inputs(batch)
        logits = network(inputs, use_batch_stats)
        return torch.sigmoid(logits).float()

    @torch.no_grad()
    def logit(self, batch: Observations) -> torch.Tensor:
        """The pre-sigmoid output [B] with per-sample normalisation: a score that does not saturate."""
        network, inputs = self._trained_with_inputs(batch)
        return network(inputs, False).float()

    def state_dict(self) -> dict[str, Any]:
        network = self._trained()
        return {"arch": self.arch, "in_dim": self.in_dim,
                "weights": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("arch") != self.arch:
            raise StateError(f"saved binary head is {state.get('arch')!r}, this one is {self.arch!r}")
        self.in_dim = int(state["in_dim"])
        network = self._build(self.in_dim)
        try:
            network.load_state_dict(state["weights"])
        except RuntimeError as exc:
            raise StateError(f"saved {self.arch} weights do not fit: {exc}") from None
        self.network = network.eval()

    def _inputs(self, batch: Observations) -> torch.Tensor:
        if self.arch == "paper_cnn":
            if batch.images is None:
                raise InputError("binary head 'paper_cnn' needs batch.images, but the Observations carry none")
            return batch.images.float()
        parts = [batch.features, batch.logits.log_softmax(dim=1)]
        if self.config.layer_stats:
            if batch.stats is None:
                raise InputError(f"this feature head reads the statistics of layers {list(self.config.layer_stats)}, "
                                 f"but the Observations carry none (embed with those stat_layers)")
            parts.append(batch.stats)
        return torch.cat(parts, dim=1).float()

    def _build(self, in_dim: int) -> PaperCNN | FeatureHead:
        if self.arch == "paper_cnn":
            return PaperCNN(in_dim, self.config.width)
        return FeatureHead(in_dim, self.config.width)

    def _trained_with_inputs(self, batch: Observations) -> tuple[PaperCNN | FeatureHead, torch.Tensor]:
        """The trained network, on the device of `batch`'s inputs, and those inputs checked against it."""
        network, inputs = self._trained(), self._inputs(batch)
        if self.arch == "feature_head" and inputs.shape[1] != self.in_dim:
            raise InputError(f"this feature head was trained on {self.in_dim} inputs per sample, got {inputs.shape[1]}")
        return network.to(inputs.device), inputs

    def _trained(self) -> PaperCNN | FeatureHead:
        if self.network is None:
            raise StateError(f"binary head {self.arch!r} is not trained yet")
        return self.network


def fit_binary_heads(arch: str, config: BinaryHeadConfig, tasks: Sequence[HeadTask], progress: bool = False,
                     constraint: FalseAlarmConstraint | None = None) -> list[BinaryHead]:
    """One head per (samples, targets, seed) task, each as `BinaryHead(arch, config, seed).fit` trains it,
    or, with `constraint` (feature heads only), under WOODS's false-alarm-constrained objective.

    Feature heads train together as one stacked model (feature_head.train_feature_heads), which is
    what makes memory_pu's many small heads cheap; pixel CNNs train one after another.
    """
    heads = [BinaryHead(arch, config, seed, progress) for _, _, seed in tasks]
    if arch != "feature_head":
        if constraint is not None:
            raise ConfigError(f"the false-alarm-constrained objective trains feature heads, not {arch!r}")
        return [head.fit(samples, targets) for head, (samples, targets, _) in zip(heads, tasks)]
    jobs = [head._job(samples, targets) for head, (samples, targets, _) in zip(heads, tasks)]
    for head, network in zip(heads, train_feature_heads(jobs, _recipe(config, constraint), progress)):
        head.network = network
    return heads


def _recipe(config: BinaryHeadConfig, constraint: FalseAlarmConstraint | None = None) -> HeadRecipe:
    return HeadRecipe(config.width, config.epochs, config.batch_size, config.lr, (config.beta1, config.beta2),
                      constraint)
