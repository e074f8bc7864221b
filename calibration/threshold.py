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
    if isinstance(known_scores, torch.Tensor):
        known_scores = known_scores.detach().cpu().numpy()
    scores = np.asarray(known_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("known_scores is empty")
    if np.isnan(scores).any():
        raise ValueError(f"known_scores holds {int(np.isnan(scores).sum())} NaN value(s)")
    n = scores.size
    rank = math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)
    if rank > n:
        raise ValueError(
            f"{n} known scores cannot guarantee a false-alarm rate of {target_fpr}; "
            f"need at least {math.ceil(1.0 / target_fpr) - 1}"
        )
    return float(np.partition(scores, rank - 1)[rank - 1])
