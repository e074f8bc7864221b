"""The steps every command shares: prepare the 9+1 data, get the frozen classifier, embed images.

Commands compose these; none of them re-implements data preparation or embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_runtime.config import OODSetConfig, RunConfig
from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.corruptions import condition_split
from edge_runtime.data.loader import load_split
from edge_runtime.data.splits import NovelClassSplit, split_novel_class
from edge_runtime.data.transforms import conform, to_tensor
from edge_runtime.detectors.base import Observations
from edge_runtime.device import resolve_device
from edge_runtime.errors import DataError, StateError
from edge_runtime.models.base import FrozenClassifier
from edge_runtime.models.persistence import load_classifier, save_classifier
from edge_runtime.models.registry import build_classifier
from edge_runtime.reports import plot_training_loss
from edge_runtime.training.trainer import TrainReport, compute_mean_std, train_classifier

CLASSIFIER_FILE = "classifier.safetensors"
CHECKPOINT_FILE = "train_checkpoint.pt"


@dataclass(frozen=True)
class PreparedData:
    """The 9+1 split and the extra OOD sets, conformed to the model's input size and channels."""

    split: NovelClassSplit
    ood_sets: dict[str, ImageSet]


def prepare_data(cfg: RunConfig, progress: bool = True) -> PreparedData:
    """Load, split and conform everything a run needs, as the config says."""
    data, model = cfg.data, cfg.model
    raw = {
        split: load_split(data.dataset, split, data.path, data.cache_dir,
                          data.limit_per_class if split == "train" else None, progress)
        for split in ("train", "test")
    }
    conformed = {k: conform(v, model.input_size, model.in_channels) for k, v in raw.items()}
    split = split_novel_class(conformed["train"], conformed["test"], data.novel_class, data.calibration_holdout, cfg.seed)
    if data.novel_condition is not None:
        split = condition_split(split, data.novel_condition.kind, data.novel_condition.level, cfg.stream.novel_samples,
                                cfg.seed)
    ood_sets = {ood_set_name(o): conform(_load_ood(o, data.cache_dir, progress), model.input_size, model.in_channels)
                for o in cfg.ood_sets}
    return PreparedData(split, ood_sets)


def ood_set_name(ood: OODSetConfig) -> str:
    return ood.dataset.replace("_", "-")


def _load_ood(ood: OODSetConfig, cache_dir: str, progress: bool) -> ImageSet:
    images = load_split(ood.dataset, ood.split, ood.path, cache_dir, None, progress)
    if ood.limit is not None and ood.limit < len(images):
        keep = np.random.default_rng(0).choice(len(images), ood.limit, replace=False)
        images = images.subset(np.sort(keep))
    return images


@torch.no_grad()
def embed(classifier: FrozenClassifier, data: ImageSet, device: torch.device,
          batch_size: int = 512, keep_images: bool = True, stat_layers: tuple[str, ...] = ()) -> Observations:
    """Run the frozen classifier over a whole image set, in batches, and collect its outputs
    (with the statistics of `stat_layers`, see FrozenClassifier.embed_with_stats)."""
    classifier.eval().to(device)
    parts = []
    for start in range(0, len(data), batch_size):
        x = to_tensor(data.images[start:start + batch_size], device)
        features, logits, stats = classifier.embed_with_stats(x, stat_layers)
        parts.append(Observations(x.cpu() if keep_images else None, features.float().cpu(), logits.float().cpu(),
                                  None if stats is None else stats.float().cpu()))
    if not parts:
        raise ValueError(f"{data.name}: nothing to embed (empty image set)")
    return Observations.concat(parts)


def dataset_tag(cfg: RunConfig, split: NovelClassSplit) -> str:
    """'cifar10-9' style name of the known-class set (data set and number of known classes)."""
    return f"{cfg.data.dataset.replace('_', '-')}-{len(split.known_classes)}"


def output_dir(path: str | Path) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def known_test_set(split: NovelClassSplit) -> ImageSet:
    """The test images of the known classes only (what IDD accuracy is measured on)."""
    return split.test.subset(split.test.labels < len(split.known_classes), name=f"{split.test.name}-known")


def held_back_known_set(split: NovelClassSplit) -> ImageSet:
    """The calibration split (known training images held back from training): what a choice made
    without the test split is read on. Refused when empty."""
    if len(split.calibration) == 0:
        raise DataError("the calibration split is empty; set data.calibration_holdout > 0 to have images to decide on")
    return split.calibration


def train_frozen_classifier(cfg: RunConfig, split: NovelClassSplit, device: torch.device, out_dir: Path,
                            resume: bool = False, progress: bool = True) -> tuple[FrozenClassifier, TrainReport]:
    """Train on the known classes, checkpointing into out_dir; save the classifier and a loss plot there."""
    torch.manual_seed(cfg.seed)
    mean, std = compute_mean_std(split.train)
    classifier = build_classifier(cfg.model, len(split.known_classes), mean, std)
    report = train_classifier(classifier, split.train, cfg.train, device, seed=cfg.seed,
                              checkpoint=out_dir / CHECKPOINT_FILE, resume=resume, progress=progress)
    save_classifier(out_dir / CLASSIFIER_FILE, classifier, cfg.model, split.known_classes)
    plot_training_loss(report.history, out_dir / "training_loss.png")
    return classifier, report


def obtain_classifier(cfg: RunConfig, split: NovelClassSplit, device: torch.device, out_dir: Path,
                      saved: str | None, progress: bool = True) -> FrozenClassifier:
    """Load the classifier at `saved` (checking it knows the split's classes), or train one now."""
    if saved is None:
        return train_frozen_classifier(cfg, split, device, out_dir, progress=progress)[0]
    classifier, classes = load_classifier(saved, cfg.model)
    if classes != split.known_classes:
        raise StateError(f"{saved} was trained on classes {list(classes)}, but this run's known classes are "
                         f"{list(split.known_classes)}")
    return classifier.to(device)


@dataclass(frozen=True)
class ClassifierRun:
    """Where a command that reads the frozen classifier starts: its device, output folder, data,
    classifier and the tag its metrics are named with."""

    device: torch.device
    out: Path
    data: PreparedData
    classifier: FrozenClassifier
    tag: str

    @property
    def split(self) -> NovelClassSplit:
        return self.data.split


def start_classifier_run(cfg: RunConfig, out: str | Path, saved: str | None, progress: bool = True,
                         needs_held_back: bool = False) -> ClassifierRun:
    """Resolve the device, make the output folder, prepare the data and load the classifier at
    `saved` (or train one into the output folder): the opening every such command shares. With
    `needs_held_back`, an empty calibration split is refused before any classifier is trained."""
    device = resolve_device(cfg.device)
    out_dir = output_dir(out)
    data = prepare_data(cfg, progress)
    if needs_held_back:
        held_back_known_set(data.split)
    classifier = obtain_classifier(cfg, data.split, device, out_dir, saved, progress)
    return ClassifierRun(device, out_dir, data, classifier, dataset_tag(cfg, data.split))
