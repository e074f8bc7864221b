"""The 9+1 benchmark's data: one class held out as novel, and the unlabeled adaptation stream.

Labels are remapped so the known classes are 0..K-1 and the novel class is K, which is the label
the learner is expected to assign once it has learned the new class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.data.arrays import ImageSet
from edge_runtime.errors import DataError


@dataclass(frozen=True)
class NovelClassSplit:
    """Everything the 9+1 protocol needs, already remapped (see DESIGN.md, 'Benchmark protocol')."""

    known_classes: tuple[str, ...]
    novel_class: str | None
    train: ImageSet  # known classes only, labels 0..K-1
    calibration: ImageSet  # held-back known training images, labels 0..K-1; may be empty
    novel_train: ImageSet  # training images of the novel class, label K; empty when novel_class is None
    test: ImageSet  # the whole test split: known -> 0..K-1, novel -> K; classes = known + (novel,)


def split_novel_class(train: ImageSet, test: ImageSet, novel_class: str | None, calibration_holdout: float,
                      seed: int) -> NovelClassSplit:
    """Hold `novel_class` out of training and hold back a stratified calibration slice of the rest.

    Each known class gives round(holdout * its count) images to calibration, chosen by `seed`.
    """
    if train.classes != test.classes:
        raise DataError(f"{train.name} and {test.name} disagree on classes: {train.classes} vs {test.classes}")
    if not 0.0 <= calibration_holdout < 1.0:
        raise DataError(f"calibration_holdout must be in [0, 1), got {calibration_holdout}")
    classes = train.classes
    for data in (train, test):
        if len(data) and (data.labels.min() < 0 or data.labels.max() >= len(classes)):
            raise DataError(f"{data.name}: labels must lie in 0..{len(classes) - 1} to split off a novel class")
    if novel_class is not None and novel_class not in classes:
        raise DataError(f"novel class {novel_class!r} is not a class of {train.name}; classes: {', '.join(classes)}")
    novel_index = classes.index(novel_class) if novel_class is not None else None
    known_classes = tuple(c for c in classes if c != novel_class)
    all_classes = known_classes + ((novel_class,) if novel_class is not None else ())
    remap = np.array([all_classes.index(c) for c in classes], dtype=np.int64)

    is_novel = train.labels == novel_index if novel_index is not None else np.zeros(len(train), dtype=bool)
    held_back = _stratified_holdout(train.labels, is_novel, calibration_holdout, seed)

    def part(mask: np.ndarray, part_classes: tuple[str, ...], suffix: str) -> ImageSet:
        return ImageSet(train.images[mask], remap[train.labels[mask]], part_classes, f"{train.name}-{suffix}")

    return NovelClassSplit(
        known_classes=known_classes,
        novel_class=novel_class,
        train=part(~is_novel & ~held_back, known_classes, "known"),
        calibration=part(held_back, known_classes, "calibration"),
        novel_train=part(is_novel, all_classes, "novel"),
        test=ImageSet(test.images, remap[test.labels], all_classes, test.name),
    )


def build_stream(known_pool: ImageSet, novel_pool: ImageSet, n_known: int, n_novel: int, batch_size: int,
                 seed: int) -> list[ImageSet]:
    """`n_known` + `n_novel` images drawn without replacement, shuffled together, cut into batches.

    The last batch may be smaller. Batches are fresh arrays, so nothing in them points back to a
    position in either pool; labels ride along for evaluation only.
    """
    if batch_size < 1:
        raise DataError(f"stream batch_size must be positive, got {batch_size}")
    for pool, wanted in ((known_pool, n_known), (novel_pool, n_novel)):
        if wanted < 0 or wanted > len(pool):
            raise DataError(f"stream asks for {wanted} images from {pool.name}, which holds {len(pool)}")
    if known_pool.images.shape[1:] != novel_pool.images.shape[1:]:
        raise DataError(f"{known_pool.name} images {known_pool.images.shape[1:]} and {novel_pool.name} "
                        f"images {novel_pool.images.shape[1:]} cannot share a stream")
    classes = _common_classes(known_pool, novel_pool)
    rng = np.random.default_rng(seed)
    known_pick = rng.choice(len(known_pool), size=n_known, replace=False)
    novel_pick = rng.choice(len(novel_pool), size=n_novel, replace=False)
    images = np.concatenate([known_pool.images[known_pick], novel_pool.images[novel_pick]])
    labels = np.concatenate([known_pool.labels[known_pick], novel_pool.labels[novel_pick]])
    order = rng.permutation(len(images))
    images, labels = images[order], labels[order]
    return [ImageSet(images[start:start + batch_size], labels[start:start + batch_size], classes, f"stream-batch{number}")
            for number, start in enumerate(range(0, len(images), batch_size))]


def _stratified_holdout(labels: np.ndarray, excluded: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A mask holding back round(fraction * n_c) random images of every class c not `excluded`."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels[~excluded]):
        members = np.flatnonzero((labels == label) & ~excluded)
        held[rng.choice(members, size=round(fraction * len(members)), replace=False)] = True
    return held


def _common_classes(first: ImageSet, second: ImageSet) -> tuple[str, ...]:
    """The longer class tuple, when the shorter is its prefix (known classes, then the novel one)."""
    shorter, longer = sorted((first.classes, second.classes), key=len)
    if longer[:len(shorter)] != shorter:
        raise DataError(f"{first.name} classes {first.classes} and {second.name} classes {second.classes} do not agree")
    return longer
