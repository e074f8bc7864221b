"""Decision thresholds set from known-IDD scores alone, with a false-alarm guarantee."""

from __future__ import annotations

import math

import numpy as np
import torch


def threshold_at_fpr(known_scores: torch.Tensor | np.ndarray, target_fpr: float) -> float:
    """The score t above which a fresh known-IDD sample lies with probability at most target_fpr.

    An input is flagged novel when its score > t. t is the j-th smallest of the n known scores
    with j = ceil((n + 1)(1 - target_fpr)) (the split-conformal order statistic): for a fresh
    sample exchangeable with the known ones P(score > t) = (n + 1 - j) / (n + 1) <= target_fpr,
    whereas the plain empirical quantile overshoots the target by up to 1 / (n + 1).
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must lie in (0, 1), got {target_fpr}")
    scores = _as_float64(known_scores, "known_scores")
    n = scores.size
    rank = math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)
    if rank > n:
        raise ValueError(
            f"{n} known scores cannot guarantee a false-alarm rate of {target_fpr}; "
            f"need at least {math.ceil(1.0 / target_fpr) - 1}"
        )
    return float(np.partition(scores, rank - 1)[rank - 1])


def threshold_for_accuracy(known_scores: torch.Tensor | np.ndarray, known_correct: torch.Tensor | np.ndarray,
                           pool_scores: torch.Tensor | np.ndarray, novel_share: float, novel_prior: float) -> float:
    """The score t that maximises the 9+1 router's expected single-head accuracy, from unlabeled data.

    Flagged inputs (score > t) go to the novel class, the rest to the frozen classifier, so
        A(t) = (1 - prior) P(known, classifier right, score <= t) + prior P(novel score > t).
    The first term is read off known-IDD samples the classifier did not train on (`known_correct`
    marks where its argmax is right: flagging a sample it gets wrong costs nothing). The second comes
    from the unlabeled pool, a mixture with `novel_share` novel inputs: F_novel = (F_pool - (1 -
    share) F_known) / share. `novel_prior` is the share of novel inputs expected after deployment
    (1 / (C + 1): the new class as frequent as each known one). Unlike `threshold_at_fpr` it gives
    no false-alarm guarantee; it trades false alarms for novel recall where that pays.
    """
    known = _as_float64(known_scores, "known_scores")
    pool = _as_float64(pool_scores, "pool_scores")
    correct = np.asarray(known_correct.cpu() if isinstance(known_correct, torch.Tensor) else known_correct, dtype=bool)
    if correct.shape != known.shape:
        raise ValueError(f"known_correct must match known_scores {known.shape}, got {correct.shape}")
    for name, value in (("novel_share", novel_share), ("novel_prior", novel_prior)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie in (0, 1), got {value}")
    candidates = np.unique(np.concatenate([known, pool]))
    correct_below = np.concatenate([[0], np.cumsum(correct[np.argsort(known, kind="stable")])])
    known_below = np.searchsorted(np.sort(known), candidates, side="right")
    f_known = known_below / known.size
    f_pool = np.searchsorted(np.sort(pool), candidates, side="right") / pool.size
    novel_above = np.clip(1.0 - (f_pool - (1.0 - novel_share) * f_known) / novel_share, 0.0, 1.0)
    accuracy = (1.0 - novel_prior) * correct_below[known_below] / known.size + novel_prior * novel_above
    return float(candidates[int(np.argmax(accuracy))])


def _as_float64(scores: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """Scores as a flat float64 array, refused when empty or holding NaN."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(values).any():
        raise ValueError(f"{name} holds {int(np.isnan(values).sum())} NaN value(s)")
    return values
