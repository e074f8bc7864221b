"""The one-class benchmark protocol: train a detector on one class, detect all the others.

For each class c of a data set, a fresh detector is fitted on the training images of c alone and
scores every image of the evaluation split; AUROC takes c as known and the nine other classes as
novel (the protocol of Kwon et al. and of DROCC). MNIST exists here only as its 10k test split, so
that split is cut, stratified and with a fixed seed, into a training half and an evaluation half.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.loader import DEFAULT_CACHE_DIR, load_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.detectors.base import Detector, Observations
from edge_runtime.errors import DataError
from edge_runtime.metrics import ood_metrics

MNIST_EVAL_FRACTION = 0.5
VALIDATION_FRACTION = 0.2
SPLIT_SEED = 0

# Published means (AUROC as a fraction): Kwon et al. (VAE gradients) and DROCC (LeNet), DESIGN.md.
PAPER_MEAN_AUROC: dict[tuple[str, str], float] = {
    ("vae_gradient", "mnist"): 0.953,
    ("vae_gradient", "fashion_mnist"): 0.918,
    ("vae_gradient", "cifar10"): 0.582,
    ("drocc", "cifar10"): 0.742,
}


@dataclass(frozen=True)
class OneClassData:
    """Where one-class detectors train (`train`, all classes) and are evaluated (`evaluation`)."""

    train: ImageSet
    evaluation: ImageSet
    split_note: str


def load_one_class_data(dataset: str, path: str | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                        progress: bool = True, validation: bool = False) -> OneClassData:
    """The training and evaluation images of `dataset` under the one-class protocol.

    `validation` evaluates on a stratified VALIDATION_FRACTION of the training images instead (and
    trains on the rest): where hyper-parameters are chosen, so the evaluation images stay unseen.
    """
    if dataset == "mnist":
        test = load_split("mnist", "test", path, cache_dir, progress=progress)
        train, evaluation = stratified_halves(test, MNIST_EVAL_FRACTION, SPLIT_SEED)
        note = (f"MNIST test split only (10k): stratified {1 - MNIST_EVAL_FRACTION:.0%} train / "
                f"{MNIST_EVAL_FRACTION:.0%} evaluation, seed {SPLIT_SEED}")
    else:
        train = load_split(dataset, "train", path, cache_dir, progress=progress)
        evaluation = load_split(dataset, "test", path, cache_dir, progress=progress)
        note = f"{dataset}: train split to train, test split to evaluate"
    if not validation:
        return OneClassData(train, evaluation, note)
    train, held = stratified_halves(train, VALIDATION_FRACTION, SPLIT_SEED + 1)
    return OneClassData(train, held, f"validation: a stratified {VALIDATION_FRACTION:.0%} of the training images "
                                     f"evaluates, the rest trains; evaluation images unused ({note})")


def load_one_class_folds(dataset: str, folds: int, path: str | None = None,
                         cache_dir: str | Path = DEFAULT_CACHE_DIR, progress: bool = True) -> list[OneClassData]:
    """K-fold cross-validation over MNIST's one split: fold k evaluates on its stratified 1/K and trains on the rest.

    Every image is evaluated exactly once, by detectors that never trained on it, and each class
    trains on (K-1)/K of its images instead of half (the published numbers trained on ~6,000).
    Data sets with their own training split need no folds and are refused.
    """
    if dataset != "mnist":
        raise DataError(f"folds are for MNIST, which exists here only as its test split; {dataset} has its own "
                        f"training split")
    test = load_split("mnist", "test", path, cache_dir, progress=progress)
    note = (f"MNIST test split only (10k): stratified {folds}-fold cross-validation, seed {SPLIT_SEED} (each image "
            f"evaluated once, by detectors that never trained on it; AUROC is the mean over the folds)")
    return [OneClassData(train, evaluation, note) for train, evaluation in stratified_folds(test, folds, SPLIT_SEED)]


def stratified_folds(data: ImageSet, folds: int, seed: int) -> list[tuple[ImageSet, ImageSet]]:
    """[(train part, evaluation part)] per fold: each class's images, shuffled, dealt round-robin to the folds."""
    if not 2 <= folds <= 20:
        raise DataError(f"folds must lie in 2..20, got {folds}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(data), dtype=np.int64)
    for label in np.unique(data.labels):
        members = rng.permutation(np.flatnonzero(data.labels == label))
        fold_of[members] = np.arange(len(members)) % folds
    return [(data.subset(fold_of != k, f"{data.name}-train-part"), data.subset(fold_of == k, f"{data.name}-eval-part"))
            for k in range(folds)]


def stratified_halves(data: ImageSet, eval_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train part, evaluation part): round(eval_fraction * n_c) random images of each class c evaluate."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    rng = np.random.default_rng(seed)
    is_eval = np.zeros(len(data), dtype=bool)
    for label in np.unique(data.labels):
        members = np.flatnonzero(data.labels == label)
        is_eval[rng.choice(members, size=round(eval_fraction * len(members)), replace=False)] = True
    return data.subset(~is_eval, f"{data.name}-train-part"), data.subset(is_eval, f"{data.name}-eval-part")


def first_per_class(data: ImageSet, limit: int) -> ImageSet:
    """The first `limit` images of each label, in their original order (quick evaluation runs)."""
    keep = np.zeros(len(data), dtype=bool)
    for label in np.unique(data.labels):
        keep[np.flatnonzero(data.labels == label)[:limit]] = True
    return data.subset(keep)


def pixel_observations(images: np.ndarray, device: torch.device | str = "cpu") -> Observations:
    """Observations carrying only pixels (uint8 NHWC -> [0,1] NCHW): what pixel detectors read."""
    return observations_of(to_tensor(images, device))


def observations_of(pixels: torch.Tensor) -> Observations:
    """Observations around [0,1] NCHW pixels, with empty features and logits (no classifier ran)."""
    empty = pixels.new_zeros(len(pixels), 0)
    return Observations(pixels, empty, empty)


def normal_class_images(data: OneClassData, label: int, limit: int | None = None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """[0,1] NCHW training images of class `label`; `limit` keeps the first ones (quick runs)."""
    members = np.flatnonzero(data.train.labels == label)
    if len(members) == 0:
        raise DataError(f"{data.train.name} holds no image of class {label}")
    return to_tensor(data.train.images[members[:limit]], device)


def score_images(detector: Detector, images: np.ndarray, device: torch.device | str = "cpu",
                 batch_size: int = 1024) -> np.ndarray:
    """Novelty scores of uint8 NHWC images, scored in batches."""
    return np.concatenate([detector.score(pixel_observations(images[start:start + batch_size], device)).cpu().numpy()
                           for start in range(0, len(images), batch_size)])


def auroc_one_vs_rest(scores: np.ndarray, labels: np.ndarray, normal_label: int) -> float:
    """AUROC with `normal_label` as the known class and every other label as novel."""
    is_normal = labels == normal_label
    return ood_metrics(scores[is_normal], scores[~is_normal])["auroc"]


def evaluation_auroc(detector: Detector, data: OneClassData, normal_label: int,
                     device: torch.device | str = "cpu") -> float:
    """AUROC of a detector fitted on `normal_label` alone, over the whole evaluation split."""
    return auroc_one_vs_rest(score_images(detector, data.evaluation.images, device), data.evaluation.labels,
                             normal_label)
