"""Herding selection (Welling 2009; iCaRL, Rebuffi et al. 2017) for the rehearsal memory.

A random subset of a class approximates its feature mean only up to sampling noise; herding
picks, one at a time, the sample that brings the running mean of the picked ones closest to the
class mean, so a small share of memory per class matches the mean far better. Features are
L2-normalised first, as in iCaRL, so no sample wins by its norm alone.
"""

from __future__ import annotations

import numpy as np


def herding_selection(features: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` rows of `features` [N, D] in herding order (the first k are the best k)."""
    if not 0 <= count <= len(features):
        raise ValueError(f"cannot herd {count} of {len(features)} samples")
    unit = features.astype(np.float64)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    target = unit.mean(axis=0)
    picked_sum = np.zeros_like(target)
    available = np.ones(len(unit), dtype=bool)
    order = np.empty(count, dtype=np.int64)
    for step in range(count):
        candidate_means = (picked_sum + unit) / (step + 1)
        distance = np.linalg.norm(candidate_means - target, axis=1)
        distance[~available] = np.inf
        chosen = int(distance.argmin())
        order[step] = chosen
        available[chosen] = False
        picked_sum += unit[chosen]
    return order


def balanced_quotas(counts: np.ndarray, budget: int) -> np.ndarray:
    """Per-class sample quotas summing to min(budget, counts.sum()): classes with fewer samples than an
    equal share keep them all, the rest split what remains as evenly as whole samples allow (the larger
    classes take the remainders)."""
    quotas = np.zeros(len(counts), dtype=np.int64)
    left = min(int(budget), int(counts.sum()))
    order = np.argsort(counts, kind="stable")
    for rank, label in enumerate(order):
        quotas[label] = min(int(counts[label]), left // (len(order) - rank))
        left -= quotas[label]
    return quotas
