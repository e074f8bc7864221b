"""Rehearsal memory: the budget is hard and the policies keep what they promise, on real digits."""

import numpy as np
import pytest

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
