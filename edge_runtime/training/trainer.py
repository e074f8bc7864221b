"""Training and evaluating the frozen classifier on an in-memory image set.

The whole training set lives on the device as one tensor and batches are taken by index, so
there are no loader workers to tune on a Jetson and no host-to-device copy per step. Every random
draw of the loop (sample order, flips, shifts) comes from one generator seeded by `seed`, which
is what lets a checkpointed run resume to the same final weights.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edge_runtime.config import TrainConfig, config_to_dict
from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.transforms import to_tensor
from edge_runtime.errors import ConfigError, DataError, StateError
from edge_runtime.models.base import FrozenClassifier
from edge_runtime.models.fastnet import FastNet, init_whitening
from edge_runtime.training.augment import augment_batch
from edge_runtime.training.checkpoint import TrainingCheckpoint, load_checkpoint, save_checkpoint
from edge_runtime.training.rotation_auxiliary import RotationAuxiliary


@dataclass(frozen=True)
class TrainReport:
    """What a `train_classifier` call did: epochs run by this call, wall time, per-epoch mean loss.

    `history` covers the whole run, including epochs restored from a checkpoint.
    """

    epochs_run: int
    seconds: float
    final_loss: float
    history: list[float]


def compute_mean_std(train: ImageSet) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the [0, 1] pixels, for the model's `Normalize`."""
    channels = train.images.shape[3]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(train), 4096):
        pixels = train.images[start:start + 4096].reshape(-1, channels).astype(np.float64) / 255.0
        total += pixels.sum(0)
        squares += np.square(pixels).sum(0)
    count = len(train) * train.images.shape[1] * train.images.shape[2]
    if count == 0:
        raise DataError(f"{train.name}: no images to compute the normalisation from")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    if np.any(std == 0):
        raise DataError(f"{train.name}: channel(s) {np.flatnonzero(std == 0).tolist()} are constant and cannot be normalised")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


@dataclass
class _Position:
    """Where the loop is: finished epochs, batches done in the current one, and its sample order."""

    epoch: int = 0
    step: int = 0
    order: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None  # sum of this epoch's batch losses, kept on the device
    history: list[float] = field(default_factory=list)


def train_classifier(model: FrozenClassifier, train: ImageSet, cfg: TrainConfig, device: torch.device, *,
                     seed: int, checkpoint: Path | None = None, resume: bool = False,
                     progress: bool = True) -> TrainReport:
    """Train `model` in place on `train` (already conformed to the model's size and channels).

    A fastnet's whitening layer is set from `train` first. With `checkpoint`, the state is saved
    after every epoch and when Ctrl-C arrives (the current batch finishes first, then
    KeyboardInterrupt is re-raised); `resume` continues from that file. With `cfg.ema_decay` the
    returned model holds the moving-average weights; with `cfg.rotation_weight` a training-only
    rotation head adds its loss (RotationAuxiliary). The model ends in eval mode on `device`.
    """
    started = time.perf_counter()
    _check_training_inputs(model, train, cfg)
    if resume and checkpoint is None:
        raise StateError("resume=True needs a checkpoint path")
    on_cuda = device.type == "cuda"
    model.to(device)
    if on_cuda:
        model.to(memory_format=torch.channels_last)
    images = to_tensor(train.images, device)
    labels = torch.from_numpy(train.labels).to(device)
    if isinstance(model.network, FastNet):
        init_whitening(model, images)

    batch_size = min(cfg.batch_size, len(train))
    steps_per_epoch = len(train) // batch_size  # the ragged tail is dropped: BatchNorm dislikes tiny batches
    auxiliary = RotationAuxiliary(model.feature_dim, cfg.rotation_weight).to(device) if cfg.rotation_weight > 0 else None
    optimizer = _make_optimizer([model] if auxiliary is None else [model, auxiliary], cfg)
    scheduler = _make_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(seed)
    average = _WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    position = _Position()
    config_dump = {f"train.{key}": value for key, value in config_to_dict(cfg).items()}
    config_dump |= {"seed": seed, "samples": len(train)}
    if resume:
        position = _restore(checkpoint, config_dump, model, auxiliary, optimizer, scheduler, generator, average, device)
    epochs_before = position.epoch

    def snapshot() -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, _capture(position, config_dump, model, auxiliary, optimizer, scheduler, generator,
                                                 average))

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and on_cuda)
    model.train()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=position.epoch * steps_per_epoch + position.step,
               disable=not progress, desc="train", unit="batch")
    with _InterruptLatch() as interrupt, bar:
        while position.epoch < cfg.epochs:
            if position.order is None:
                position.order = torch.randperm(len(images), device=device, generator=generator)
                position.loss_sum = torch.zeros((), device=device)
            while position.step < steps_per_epoch:
                index = position.order[position.step * batch_size:(position.step + 1) * batch_size]
                batch = augment_batch(images[index], flip=cfg.flip, translate=cfg.translate, generator=generator)
                if on_cuda:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with autocast:
                    loss = _batch_loss(model, auxiliary, batch, labels[index], cfg.label_smoothing, generator)
                position.loss_sum += _step(loss, optimizer, scheduler)
                if average is not None:
                    average.update(model)
                position.step += 1
                bar.update()
                if interrupt.requested:
                    snapshot()
                    raise KeyboardInterrupt
            position.history.append(position.loss_sum.item() / steps_per_epoch)
            position.epoch, position.step, position.order = position.epoch + 1, 0, None
            bar.set_postfix(epoch=position.epoch, loss=f"{position.history[-1]:.4f}")
            snapshot()
    if average is not None:
        model.load_state_dict(average.shadow)
    model.eval()
    if on_cuda:
        torch.cuda.synchronize(device)
    return TrainReport(position.epoch - epochs_before, time.perf_counter() - started,
                       position.history[-1], list(position.history))


@torch.no_grad()
def predict_logits(model: FrozenClassifier, data: ImageSet, device: torch.device,
                   batch_size: int = 512) -> torch.Tensor:
    """Logits [N, C] (float32, on the CPU) as the runtime reads them (`embed`, averaged over the
    classifier's views), with the model in eval mode on `device`."""
    model.eval().to(device)
    outputs = []
    for start in range(0, len(data), batch_size):
        _, logits = model.embed(to_tensor(data.images[start:start + batch_size], device))
        outputs.append(logits.float().cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0, model.num_classes)


def evaluate_accuracy(model: FrozenClassifier, data: ImageSet, device: torch.device,
                      batch_size: int = 512) -> float:
    """Fraction of `data` whose arg-max prediction equals its label."""
    if len(data) == 0:
        raise DataError(f"{data.name}: no images to evaluate")
    _check_labels(data, model.num_classes)
    predictions = predict_logits(model, data, device, batch_size).argmax(1)
    return float((predictions == torch.from_numpy(data.labels)).double().mean())


def _check_training_inputs(model: FrozenClassifier, train: ImageSet, cfg: TrainConfig) -> None:
    if len(train) < 2:
        raise DataError(f"{train.name}: {len(train)} image(s); BatchNorm training needs at least 2")
    _check_labels(train, model.num_classes)
    smallest_side = min(train.images.shape[1:3])
    if cfg.rotation_weight > 0 and train.images.shape[1] != train.images.shape[2]:
        raise ConfigError(f"train.rotation_weight needs square images to turn by 90 degrees; "
                          f"{train.name} is {train.images.shape[1]}x{train.images.shape[2]}")
    if cfg.translate >= smallest_side:
        raise ConfigError(f"train.translate={cfg.translate} must be smaller than the image side ({smallest_side} px)")


def _check_labels(data: ImageSet, num_classes: int) -> None:
    if len(data) and (data.labels.min() < 0 or data.labels.max() >= num_classes):
        raise DataError(f"{data.name}: labels must lie in 0..{num_classes - 1} for this model, "
                        f"found {int(data.labels.min())}..{int(data.labels.max())}")


def _batch_loss(model: FrozenClassifier, auxiliary: RotationAuxiliary | None, batch: torch.Tensor,
                targets: torch.Tensor, label_smoothing: float, generator: torch.Generator) -> torch.Tensor:
    """The class cross-entropy, plus the rotation task's loss when the run trains that head."""
    if auxiliary is not None:
        return auxiliary.loss(model, batch, targets, label_smoothing, generator)
    return F.cross_entropy(model(batch).float(), targets, label_smoothing=label_smoothing)


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler) -> torch.Tensor:
    """One optimiser and schedule step on the batch loss; returns it without a host sync."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


def _make_optimizer(modules: list[nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; weight decay only on weight matrices and kernels, not on BN or biases."""
    trainable = [p for module in modules for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning-rate schedule stepped once per batch; cfg.momentum is kept fixed (no momentum cycling)."""
    if cfg.schedule == "onecycle" and total_steps >= 2:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps, cycle_momentum=False)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


class _WeightAverage:
    """Exponential moving average of the model's floating-point state (weights and BN statistics).

    The decay ramps up as (1 + n) / (10 + n) until it reaches `decay`, so a short run's average is
    not dominated by the random initial weights.
    """

    def __init__(self, model: FrozenClassifier, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {name: value.detach().clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: FrozenClassifier) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in model.state_dict().items():
            average = self.shadow[name]
            if average.is_floating_point():
                average.lerp_(value, 1.0 - decay)
            else:
                average.copy_(value)


class _InterruptLatch:
    """Turns the first Ctrl-C into a flag the loop checks between batches.

    Stopping between batches keeps the checkpoint consistent (never half an optimiser step). A
    second Ctrl-C falls through to the previous handler and interrupts at once. Signal handlers
    only exist in the main thread; elsewhere this does nothing.
    """

    def __enter__(self) -> "_InterruptLatch":
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, _signum: int, _frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *_exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _capture(position: _Position, config_dump: dict[str, object], model: FrozenClassifier,
             auxiliary: RotationAuxiliary | None, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
             average: _WeightAverage | None) -> TrainingCheckpoint:
    cpu = lambda state: {k: v.detach().cpu() for k, v in state.items()}  # noqa: E731
    return TrainingCheckpoint(
        model=cpu(model.state_dict()), auxiliary=None if auxiliary is None else cpu(auxiliary.state_dict()),
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        epoch=position.epoch, step=position.step,
        order=None if position.order is None else position.order.cpu(),
        rng=generator.get_state(), config=config_dump, history=list(position.history),
        epoch_loss_sum=0.0 if position.loss_sum is None or position.order is None else position.loss_sum.item(),
        ema=None if average is None else cpu(average.shadow),
        ema_updates=0 if average is None else average.updates,
    )


def _restore(path: Path, config_dump: dict[str, object], model: FrozenClassifier,
             auxiliary: RotationAuxiliary | None, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
             average: _WeightAverage | None, device: torch.device) -> _Position:
    """Load `path` into the live objects; the run must have the same config, seed and data size."""
    saved = load_checkpoint(path)
    differing = [f"{key} {saved.config.get(key)!r} -> {config_dump.get(key)!r}"
                 for key in sorted(saved.config.keys() | config_dump.keys()) if saved.config.get(key) != config_dump.get(key)]
    if differing:
        raise StateError(f"checkpoint {path} was written by a different run, cannot resume: {'; '.join(differing)}")
    if (saved.ema is None) != (average is None):
        raise StateError(f"checkpoint {path} and train.ema_decay disagree about keeping a weight average")
    try:
        model.load_state_dict(saved.model)
        if auxiliary is not None:
            auxiliary.load_state_dict(saved.auxiliary)
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        generator.set_state(saved.rng)
        if average is not None:
            average.shadow = {k: v.to(device) for k, v in saved.ema.items()}
            average.updates = saved.ema_updates
    except (RuntimeError, KeyError, ValueError) as exc:
        raise StateError(f"checkpoint {path} does not fit this model: {str(exc)[:300]}") from exc
    order = None if saved.order is None else saved.order.to(device)
    loss_sum = torch.tensor(saved.epoch_loss_sum, device=device, dtype=torch.float32)
    return _Position(saved.epoch, saved.step, order, loss_sum, list(saved.history))
