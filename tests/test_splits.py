"""The 9+1 split and the unlabeled stream on real CIFAR-10 and digits images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.catalog import CIFAR10_CLASSES
from edge_runtime.data.splits import NovelClassSplit, build_stream, split_novel_class
from edge_runtime.errors import DataError


def _fingerprints(data: ImageSet) -> list[bytes]:
    """One key per image: its pixels (the sets used here hold no duplicate images)."""
    return [image.tobytes() for image in data.images]


@pytest.fixture(scope="module")
def cat_split(cifar_small: dict[str, ImageSet]) -> NovelClassSplit:
    return split_novel_class(cifar_small["train"], cifar_small["test"], "cat", calibration_holdout=0.2, seed=7)


def test_source_images_are_distinct(cifar_small: dict[str, ImageSet]) -> None:
    for data in cifar_small.values():
        assert len(set(_fingerprints(data))) == len(data)


def test_known_classes_are_remapped_around_the_novel_one(cat_split: NovelClassSplit, cifar_small: dict[str, ImageSet]) -> None:
    known = tuple(c for c in CIFAR10_CLASSES if c != "cat")
    assert cat_split.known_classes == known and cat_split.novel_class == "cat"
    assert cat_split.train.classes == known and cat_split.calibration.classes == known
    assert cat_split.test.classes == known + ("cat",) and cat_split.novel_train.classes == known + ("cat",)
    source = cifar_small["train"]
    origin = {key: CIFAR10_CLASSES[label] for key, label in zip(_fingerprints(source), source.labels)}
    for part in (cat_split.train, cat_split.calibration):
        assert set(part.labels.tolist()) == set(range(9))
        assert all(origin[key] == known[label] for key, label in zip(_fingerprints(part), part.labels))
    assert "cat" not in {origin[key] for key in _fingerprints(cat_split.train)}
    assert {origin[key] for key in _fingerprints(cat_split.novel_train)} == {"cat"}
    assert (cat_split.novel_train.labels == 9).all() and len(cat_split.novel_train) == 30


def test_calibration_is_a_disjoint_stratified_slice(cat_split: NovelClassSplit) -> None:
    train, calibration = set(_fingerprints(cat_split.train)), set(_fingerprints(cat_split.calibration))
    assert not train & calibration
    assert len(train) + len(calibration) == 9 * 30
    assert np.bincount(cat_split.calibration.labels, minlength=9).tolist() == [6] * 9  # round(0.2 * 30)


def test_whole_test_split_is_kept_with_the_novel_class_last(cat_split: NovelClassSplit, cifar_small: dict[str, ImageSet]) -> None:
    test = cifar_small["test"]
    np.testing.assert_array_equal(cat_split.test.images, test.images)
    expected = np.array([9 if label == 3 else label - (label > 3) for label in test.labels])
    np.testing.assert_array_equal(cat_split.test.labels, expected)


def test_same_seed_same_split_other_seed_other_calibration(cifar_small: dict[str, ImageSet], cat_split: NovelClassSplit) -> None:
    again = split_novel_class(cifar_small["train"], cifar_small["test"], "cat", calibration_holdout=0.2, seed=7)
    np.testing.assert_array_equal(again.calibration.images, cat_split.calibration.images)
    other = split_novel_class(cifar_small["train"], cifar_small["test"], "cat", calibration_holdout=0.2, seed=8)
    assert set(_fingerprints(other.calibration)) != set(_fingerprints(cat_split.calibration))


def test_no_novel_class_keeps_every_class_known(digits_train: ImageSet, digits_test: ImageSet) -> None:
    split = split_novel_class(digits_train, digits_test, None, calibration_holdout=0.0, seed=0)
    assert split.known_classes == digits_train.classes and split.novel_class is None
    assert len(split.novel_train) == 0 and len(split.calibration) == 0
    np.testing.assert_array_equal(split.train.labels, digits_train.labels)
    np.testing.assert_array_equal(split.test.labels, digits_test.labels)
    assert split.test.classes == digits_test.classes


def test_unknown_novel_class_lists_the_classes(digits_train: ImageSet, digits_test: ImageSet) -> None:
    with pytest.raises(DataError, match=r"'ten' is not a class of digits-train; classes: 0, 1, 2"):
        split_novel_class(digits_train, digits_test, "ten", calibration_holdout=0.1, seed=0)


def test_stream_mixes_both_pools_without_duplicates(cat_split: NovelClassSplit) -> None:
    batches = build_stream(cat_split.train, cat_split.novel_train, n_known=100, n_novel=25, batch_size=40, seed=3)
    assert [len(batch) for batch in batches] == [40, 40, 40, 5]
    keys = [key for batch in batches for key in _fingerprints(batch)]
    assert len(set(keys)) == 125
    assert set(keys) <= set(_fingerprints(cat_split.train)) | set(_fingerprints(cat_split.novel_train))
    labels = np.concatenate([batch.labels for batch in batches])
    assert Counter(labels == 9) == {False: 100, True: 25}
    assert all(batch.classes == cat_split.test.classes for batch in batches)
    novel_positions = np.flatnonzero(labels == 9)
    assert novel_positions.max() - novel_positions.min() > 25, "novel images are shuffled in, not appended"


def test_stream_is_deterministic_per_seed(cat_split: NovelClassSplit) -> None:
    def stream(seed: int) -> np.ndarray:
        batches = build_stream(cat_split.train, cat_split.novel_train, n_known=50, n_novel=20, batch_size=32, seed=seed)
        return np.concatenate([batch.images for batch in batches])

    np.testing.assert_array_equal(stream(1), stream(1))
    assert not np.array_equal(stream(1), stream(2))


def test_stream_refuses_to_draw_more_than_a_pool_holds(cat_split: NovelClassSplit) -> None:
    with pytest.raises(DataError, match=r"asks for 31 images from .*-novel, which holds 30"):
        build_stream(cat_split.train, cat_split.novel_train, n_known=10, n_novel=31, batch_size=8, seed=0)
