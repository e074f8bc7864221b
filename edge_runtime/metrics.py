"""Threshold-free novelty-detection metrics computed exactly, ties included.

Scores follow the detector convention: higher = more novel. numpy only, so the metrics run
anywhere results are read back (reports, CI) without torch.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

POSITIVE_CLASS_NOTE = "IDD is the positive class (AUROC, AUPR-in, FPR at 95% TPR); AUPR-out takes OOD as positive"

_TPR_PERCENT = 95


def ood_metrics(idd_scores: ArrayLike, ood_scores: ArrayLike) -> dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR95 of a detector on IDD vs OOD scores.

    IDD is the positive class for AUROC, AUPR-in and FPR95 (an input is accepted as IDD when its
    score is at most a threshold; FPR95 is the fraction of OOD accepted at the lowest threshold
    that accepts at least 95% of IDD). AUPR-out takes OOD as positive. Tied scores count half in
    AUROC and are crossed in one step in the precision-recall curves (as average precision does).
    """
    idd = _validated("idd_scores", idd_scores)
    ood = _validated("ood_scores", ood_scores)
    scores = np.concatenate([idd, ood])
    is_idd = np.concatenate([np.ones(len(idd), bool), np.zeros(len(ood), bool)])
    return {
        "auroc": _auroc(scores, is_idd),
        "aupr_in": _average_precision(-scores, is_idd),
        "aupr_out": _average_precision(scores, ~is_idd),
        "fpr95": _fpr_at_95_tpr(idd, ood),
    }


def _validated(name: str, scores: ArrayLike) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(array).any():
        raise ValueError(f"{name} holds {int(np.isnan(array).sum())} NaN value(s)")
    return array


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def _auroc(scores: np.ndarray, is_idd: np.ndarray) -> float:
    """P(an OOD sample scores above an IDD one) + half the tie probability (Mann-Whitney U)."""
    ranks = _average_ranks(scores)
    n_ood = int((~is_idd).sum())
    n_idd = len(scores) - n_ood
    u = ranks[~is_idd].sum() - n_ood * (n_ood + 1) / 2.0
    return float(u / (n_ood * n_idd))


def _average_precision(confidence: np.ndarray, positive: np.ndarray) -> float:
    """Step-wise area under precision-recall, one step per distinct confidence (highest first)."""
    order = np.argsort(-confidence, kind="mergesort")
    sorted_confidence = confidence[order]
    hits = positive[order].astype(np.float64)
    last_of_group = np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True]
    true_pos = np.cumsum(hits)[last_of_group]
    predicted = (np.flatnonzero(last_of_group) + 1).astype(np.float64)
    precision = true_pos / predicted
    # Weighted by whole hit counts and divided once at the end: each product is at most its count,
    # so the sum never passes the number of positives (summing recall fractions could, by an ulp).
    return float(np.sum(np.diff(np.r_[0.0, true_pos]) * precision) / true_pos[-1])


def _fpr_at_95_tpr(idd: np.ndarray, ood: np.ndarray) -> float:
    """Fraction of OOD with score <= t, t the smallest IDD score accepting >= 95% of IDD."""
    needed = -(-_TPR_PERCENT * len(idd) // 100)  # ceil without floating-point rounding
    threshold = np.sort(idd)[needed - 1]
    return float(np.mean(ood <= threshold))
