"""The small MLP head that scores feature vectors, and training many of them as one stacked model.

memory_pu trains dozens of these heads per adaptation (one per fold, and a chain of inner heads per
fold), each a few thousand Adam steps on mini-batches of 64: on a CPU or a Jetson the time goes to
per-step overhead, not arithmetic. `train_feature_heads` runs the heads that train at the same time
in one loop: their weights are stacked along a leading head axis, and each step is one batched
matmul, one backward and one Adam step for all of them. Every head still sees exactly its own data,
shuffling, initialisation and Adam state (Adam is elementwise and the heads' losses are summed, so a
head's gradient is its own loss's); a head whose schedule is shorter keeps the weights of its last step.

The loss is class-weighted BCE, or with a `FalseAlarmConstraint` WOODS's constrained objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from edge_runtime.errors import InputError


class FeatureHead(nn.Module):
    """Standardised input vector -> hidden ReLU layer -> one logit. The binary head feeds it
    [features, log-softmax(logits)]; vae_gradient, as the paper's 2-layer classifier, VAE features.

    The standardisation (mean/std of the training inputs) is stored as buffers, so every score
    depends on its own input only.
    """

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.layers = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, inputs: torch.Tensor, use_batch_stats: bool = False) -> torch.Tensor:
        return self.layers((inputs - self.mean) / self.std).squeeze(1)


@dataclass(frozen=True)
class HeadJob:
    """One head's training: its inputs [N, D], targets P(OOD) [N], standardisation, class weight and
    randomness (`init_seed` for the weights, `order` for the epochs' shuffling)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pos_weight: float
    init_seed: int
    order: torch.Generator


@dataclass(frozen=True)
class FalseAlarmConstraint:
    """WOODS's objective (Katz-Samuels et al., ICML 2022) in place of the class-weighted BCE.

    Minimise the logistic loss of the OOD-labelled rows (the wild stream: flag as much of it as
    possible) subject to a soft false-alarm rate on the IDD rows, mean sigmoid(logit) <= alpha,
    by the augmented Lagrangian: with c = rate - alpha, the penalty is lam c + penalty c^2 / 2
    (-lam^2 / (2 penalty) where lam + penalty c < 0), and each head's lam becomes
    max(0, lam + penalty * mean c) at the end of each of its epochs.
    """

    alpha: float
    penalty: float


@dataclass(frozen=True)
class HeadRecipe:
    """What every head of one `train_feature_heads` call shares."""

    hidden: int
    epochs: int
    batch_size: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    constraint: FalseAlarmConstraint | None = None


# The stacked parameters, in FeatureHead.layers' order: (submodule index, attribute).
_PARAMETERS = ((0, "weight"), (0, "bias"), (2, "weight"), (2, "bias"))


def train_feature_heads(jobs: Sequence[HeadJob], recipe: HeadRecipe, progress: bool = False) -> list[FeatureHead]:
    """Train one FeatureHead per job with Adam on class-weighted BCE (or `recipe.constraint`'s objective),
    all in the same steps; eval mode."""
    if not jobs:
        return []
    dim, device = jobs[0].inputs.shape[-1], jobs[0].inputs.device  # a job of another rank fails the check below
    for job in jobs:
        if job.inputs.ndim != 2 or job.inputs.shape[1] != dim or job.targets.shape != (len(job.inputs),):
            raise InputError(f"every head job needs inputs [N, {dim}] and targets [N]; got "
                             f"{tuple(job.inputs.shape)} and {tuple(job.targets.shape)}")
    networks = [_initialised(job, dim, recipe.hidden, device) for job in jobs]
    params = [nn.Parameter(torch.stack([getattr(n.layers[i], name).detach() for n in networks]))
              for i, name in _PARAMETERS]
    inputs, targets = _stacked_data(jobs, device)
    index, weight, last_step = _schedules(jobs, recipe, device)
    pos_weight = torch.tensor([job.pos_weight for job in jobs], device=device).unsqueeze(1)
    heads = torch.arange(len(jobs), device=device).unsqueeze(1)
    finishing: dict[int, list[int]] = {}
    for head, step in enumerate(last_step):
        finishing.setdefault(step, []).append(head)
    lagrangian = None if recipe.constraint is None else _Lagrangian(recipe.constraint, jobs, recipe.batch_size, device)
    optimiser = torch.optim.Adam(params, lr=recipe.lr, betas=recipe.betas)
    for step in trange(index.shape[1], desc=f"{len(jobs)} feature heads, steps", disable=not progress, leave=False):
        rows = index[:, step]
        logits = _stacked_forward(params, inputs[heads, rows])
        if lagrangian is None:
            losses = F.binary_cross_entropy_with_logits(logits, targets[heads, rows], pos_weight=pos_weight,
                                                        reduction="none")
            counts = weight[:, step].sum(dim=1).clamp_min(1.0)
            loss = ((losses * weight[:, step]).sum(dim=1) / counts).sum()
        else:
            loss = lagrangian.step_loss(logits, targets[heads, rows], weight[:, step], step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        for head in finishing.get(step, ()):
            _copy_into(networks[head], params, head)
    return [network.eval() for network in networks]


class _Lagrangian:
    """The augmented Lagrangian of `FalseAlarmConstraint` for every head: its multipliers and the
    constraint values summed over each head's current epoch."""

    def __init__(self, constraint: FalseAlarmConstraint, jobs: Sequence[HeadJob], batch_size: int,
                 device: torch.device) -> None:
        self.constraint = constraint
        self.multipliers = torch.zeros(len(jobs), device=device)
        self.violation_sum = torch.zeros(len(jobs), device=device)
        self.epoch_steps = torch.tensor([-(-len(job.inputs) // batch_size) for job in jobs], device=device)

    def step_loss(self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, step: int) -> torch.Tensor:
        """Sum over heads of (stream rows' logistic loss + penalty on the IDD rows' soft false-alarm rate);
        counts this step's constraint values towards the multipliers' update at each head's epoch end."""
        novel, known = weight * targets, weight * (1.0 - targets)
        objective = (novel * F.softplus(-logits)).sum(dim=1) / novel.sum(dim=1).clamp_min(1.0)
        rate = (known * torch.sigmoid(logits)).sum(dim=1) / known.sum(dim=1).clamp_min(1.0)
        violation = torch.where(known.sum(dim=1) > 0, rate - self.constraint.alpha, torch.zeros_like(rate))
        lam, penalty = self.multipliers, self.constraint.penalty
        psi = torch.where(lam + penalty * violation >= 0, lam * violation + penalty / 2 * violation.square(),
                          -lam.square() / (2 * penalty))
        self._end_step(violation.detach(), step)
        return (objective + psi).sum()

    def _end_step(self, violation: torch.Tensor, step: int) -> None:
        self.violation_sum += violation
        ending = (step + 1) % self.epoch_steps == 0  # heads past their schedule only pad; their updates do not matter
        updated = (self.multipliers + self.constraint.penalty * self.violation_sum / self.epoch_steps).clamp_min(0.0)
        self.multipliers = torch.where(ending, updated, self.multipliers)
        self.violation_sum = torch.where(ending, torch.zeros_like(self.violation_sum), self.violation_sum)


def _initialised(job: HeadJob, dim: int, hidden: int, device: torch.device) -> FeatureHead:
    """A FeatureHead with the seeded initialisation a lone head would get, and the job's standardisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.init_seed)
        network = FeatureHead(dim, hidden).to(device)
    network.mean.copy_(job.mean)
    network.std.copy_(job.std)
    return network


def _stacked_data(jobs: Sequence[HeadJob], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised inputs [H, N_max, D] and targets [H, N_max], zero-padded past each job's N."""
    longest = max(len(job.inputs) for job in jobs)
    inputs = torch.zeros(len(jobs), longest, jobs[0].inputs.shape[1], device=device)
    targets = torch.zeros(len(jobs), longest, device=device)
    for head, job in enumerate(jobs):
        inputs[head, :len(job.inputs)] = (job.inputs.float() - job.mean) / job.std
        targets[head, :len(job.targets)] = job.targets.float()
    return inputs, targets


def _schedules(jobs: Sequence[HeadJob], recipe: HeadRecipe,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every head's mini-batches as rows [H, S_max, batch] with 0/1 weights, and each head's last step.

    Per epoch a fresh permutation from the job's generator, cut into `batch_size` pieces (the last
    one shorter): the order a lone head's loop would draw.
    """
    size = recipe.batch_size
    per_head = []
    for job in jobs:
        count = len(job.inputs)
        padded = -(-count // size) * size
        epochs = []
        for _ in range(recipe.epochs):
            order = torch.full((padded,), -1, dtype=torch.long)
            order[:count] = torch.randperm(count, generator=job.order)
            epochs.append(order.view(-1, size))
        per_head.append(torch.cat(epochs))
    steps = max(len(rows) for rows in per_head)
    index = torch.full((len(jobs), steps, size), -1, dtype=torch.long)
    for head, rows in enumerate(per_head):
        index[head, :len(rows)] = rows
    weight = (index >= 0).float()
    return index.clamp_min(0).to(device), weight.to(device), [len(rows) - 1 for rows in per_head]


def _stacked_forward(params: list[torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """Logits [H, B] of H heads on their own standardised inputs [H, B, D]."""
    hidden_weight, hidden_bias, out_weight, out_bias = params
    hidden = torch.baddbmm(hidden_bias.unsqueeze(1), inputs, hidden_weight.transpose(1, 2)).relu()
    return torch.baddbmm(out_bias.unsqueeze(1), hidden, out_weight.transpose(1, 2)).squeeze(2)


@torch.no_grad()
def _copy_into(network: FeatureHead, params: list[torch.Tensor], head: int) -> None:
    for (index, name), stacked in zip(_PARAMETERS, params):
        getattr(network.layers[index], name).copy_(stacked[head])
