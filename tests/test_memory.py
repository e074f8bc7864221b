"""Rehearsal memory: the budget is hard and the policies keep what they promise, on real digits."""

import numpy as np
import pytest

from edge_runtime.continual.herding import balanced_quotas, herding_selection
from edge_runtime.continual.memory import RehearsalMemory


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_budget_is_never_exceeded(digits_train, policy):
    memory = RehearsalMemory(100, policy, digits_train.images.shape[1:], seed=1)
    for start in range(0, len(digits_train), 37):
        memory.add(digits_train.images[start:start + 37], digits_train.labels[start:start + 37])
        assert memory.size <= 100
    stored = memory.contents(digits_train.classes)
    assert len(stored) == 100 and memory.seen == len(digits_train)
    assert memory.nbytes == 100 * 8 * 8 * 1 + 100 * 8


def test_class_balanced_evens_out_a_sorted_stream(digits_train):
    order = np.argsort(digits_train.labels, kind="stable")  # worst case: one class after another
    memory = RehearsalMemory(100, "class_balanced", digits_train.images.shape[1:])
    memory.add(digits_train.images[order], digits_train.labels[order])
    counts = np.bincount(memory.contents(digits_train.classes).labels, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11


def test_reservoir_keeps_a_uniform_sample(digits_train):
    order = np.argsort(digits_train.labels, kind="stable")
    memory = RehearsalMemory(300, "reservoir", digits_train.images.shape[1:], seed=3)
    memory.add(digits_train.images[order], digits_train.labels[order])
    counts = np.bincount(memory.contents(digits_train.classes).labels, minlength=10)
    assert counts.min() >= 15  # a FIFO would keep only the last classes


def test_stored_samples_are_real_offered_samples(digits_train):
    memory = RehearsalMemory(50, "reservoir", digits_train.images.shape[1:])
    memory.add(digits_train.images, digits_train.labels)
    stored = memory.contents(digits_train.classes)
    flat = {(img.tobytes(), lab) for img, lab in zip(digits_train.images, digits_train.labels)}
    assert all((img.tobytes(), lab) in flat for img, lab in zip(stored.images, stored.labels))


@pytest.mark.parametrize("budget, policy, match", [(0, "reservoir", "budget"), (10, "fifo", "policy")])
def test_invalid_settings_are_refused(budget, policy, match):
    with pytest.raises(ValueError, match=match):
        RehearsalMemory(budget, policy, (8, 8, 1))


def _pixel_features(images: np.ndarray) -> np.ndarray:
    """The digits' 64 pixel values as a feature vector (a real, fixed embedding for the tests)."""
    return images.reshape(len(images), -1).astype(np.float32)


def _unit(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def test_herding_order_matches_a_plain_loop(digits_train):
    features = _pixel_features(digits_train.images[digits_train.labels == 3])
    unit = _unit(features.astype(np.float64))
    target = unit.mean(axis=0)
    expected, total = [], np.zeros(unit.shape[1])
    for step in range(25):  # iCaRL's rule, one candidate at a time
        best = min((i for i in range(len(unit)) if i not in expected),
                   key=lambda i: np.linalg.norm(target - (total + unit[i]) / (step + 1)))
        expected.append(best)
        total += unit[best]
    np.testing.assert_array_equal(herding_selection(features, 25), expected)


def test_herded_samples_match_their_class_mean_better_than_random_ones(digits_train):
    rng = np.random.default_rng(0)
    for label in range(10):
        unit = _unit(_pixel_features(digits_train.images[digits_train.labels == label]).astype(np.float64))
        target = unit.mean(axis=0)
        herded = np.linalg.norm(unit[herding_selection(unit, 10)].mean(axis=0) - target)
        random = np.mean([np.linalg.norm(unit[rng.choice(len(unit), 10, replace=False)].mean(axis=0) - target)
                          for _ in range(20)])
        assert herded < 0.5 * random, (label, herded, random)


@pytest.mark.parametrize("counts, budget, expected", [
    ([5, 100, 100], 50, [5, 22, 23]), ([100, 100, 100], 50, [16, 17, 17]), ([3, 4], 50, [3, 4]), ([0, 9], 4, [0, 4])])
def test_balanced_quotas_keep_small_classes_whole_and_split_the_rest(counts, budget, expected):
    np.testing.assert_array_equal(balanced_quotas(np.array(counts), budget), expected)


def _herding_memory(digits_train, budget: int = 100) -> RehearsalMemory:
    return RehearsalMemory(budget, "herding", digits_train.images.shape[1:], embedding_dims=(64, 10))


def _offer(memory: RehearsalMemory, digits_train, index: np.ndarray) -> None:
    images, labels = digits_train.images[index], digits_train.labels[index]
    memory.add(images, labels, _pixel_features(images), np.eye(10, dtype=np.float32)[labels])


def test_herding_memory_stays_in_budget_balanced_and_keeps_rows_together(digits_train):
    order = np.argsort(digits_train.labels, kind="stable")  # one class after another
    memory = _herding_memory(digits_train)
    for start in range(0, len(order), 97):
        _offer(memory, digits_train, order[start:start + 97])
        assert memory.size <= 100
    assert memory.seen == len(order)
    counts = np.bincount(memory.labels[: memory.size], minlength=10)
    assert counts.min() == counts.max() == 10
    stored = memory.contents(digits_train.classes)
    np.testing.assert_array_equal(memory.features[: memory.size], _pixel_features(stored.images))
    np.testing.assert_array_equal(memory.logits[: memory.size].argmax(axis=1), stored.labels)
    offered = {(img.tobytes(), lab) for img, lab in zip(digits_train.images, digits_train.labels)}
    assert all((img.tobytes(), lab) in offered for img, lab in zip(stored.images, stored.labels))


def test_herding_memory_gives_a_new_class_its_share(digits_train):
    memory = _herding_memory(digits_train)
    known = np.flatnonzero(digits_train.labels < 9)
    _offer(memory, digits_train, known)
    assert sorted(np.bincount(memory.labels[: memory.size])) == [11] * 8 + [12]  # 100 over nine classes
    _offer(memory, digits_train, np.flatnonzero(digits_train.labels == 9)[:10])  # a later novel class, 10 samples
    assert np.bincount(memory.labels[: memory.size]).tolist() == [10] * 10


def test_herding_memory_resumes_from_its_state(digits_train):
    memory = _herding_memory(digits_train, budget=60)
    _offer(memory, digits_train, np.arange(500))
    resumed = RehearsalMemory.from_state(memory.state_dict())
    for each in (memory, resumed):
        _offer(each, digits_train, np.arange(500, 900))
    np.testing.assert_array_equal(resumed.images, memory.images)
    assert resumed.policy == "herding" and resumed.seen == memory.seen == 900


def test_herding_needs_features():
    with pytest.raises(ValueError, match="herding.*embedding_dims"):
        RehearsalMemory(10, "herding", (8, 8, 1))
