"""Per-class means and the pooled within-class covariance, accumulated in one streaming pass.

Calibration sets can be far larger than memory (or than the GPU), so batches are merged as they
arrive with Chan et al.'s pairwise update, in float64, never holding an N x K matrix. To make the
Ledoit-Wolf intensity exact in the same pass we also carry, per class, the centred third- and
fourth-order sums sum ||z||^2 z and sum ||z||^4 (z = x - mu_class); moving a class's centre by d
changes them by terms that need that class's own scatter matrix, so those sums cost one K x K
matrix per class. `fourth_moments=False` drops them (and Ledoit-Wolf) and keeps one pooled K x K.
"""

from __future__ import annotations

import torch

from edge_runtime.errors import InputError, StateError

_STATE_KEYS = ("counts", "means", "scatter", "third", "fourth")


class ClassMoments:
    """Streaming class counts, class means and pooled within-class scatter of K-dim vectors."""

    def __init__(
        self, num_classes: int, dim: int, device: torch.device | str = "cpu", fourth_moments: bool = True
    ) -> None:
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be positive, got {num_classes} and {dim}")
        self.num_classes = num_classes
        self.dim = dim
        self.fourth_moments = fourth_moments
        kw = {"dtype": torch.float64, "device": device}
        self._counts = torch.zeros(num_classes, dtype=torch.long, device=device)
        self._means = torch.zeros(num_classes, dim, **kw)
        self._scatter = torch.zeros(num_classes if fourth_moments else 1, dim, dim, **kw)
        self._third = torch.zeros(num_classes if fourth_moments else 0, dim, **kw)
        self._fourth = torch.zeros(num_classes if fourth_moments else 0, **kw)

    @property
    def device(self) -> torch.device:
        return self._means.device

    @property
    def counts(self) -> torch.Tensor:
        """Samples seen per class, int64 [C]."""
        return self._counts.clone()

    @property
    def total(self) -> int:
        return int(self._counts.sum())

    @property
    def means(self) -> torch.Tensor:
        """Class means, float64 [C, K]; zero rows for classes never seen."""
        return self._means.clone()

    @property
    def covariance(self) -> torch.Tensor:
        """Pooled (tied) within-class covariance sum_c sum_i (x_i - mu_c)(x_i - mu_c)^T / N, float64."""
        return self._scatter.sum(dim=0) / self._require_samples()

    @property
    def fourth_moment_sum(self) -> float:
        """sum_i ||x_i - mu_{y_i}||^4 over all samples: the extra sum exact Ledoit-Wolf needs."""
        if not self.fourth_moments:
            raise StateError("these ClassMoments were built with fourth_moments=False; Ledoit-Wolf needs them")
        return float(self._fourth.sum())

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Merge a labelled batch x [B, K] into the running statistics."""
        self._check_batch(x, labels)
        x = x.to(device=self.device, dtype=torch.float64)
        labels = labels.to(self.device)
        for label in torch.unique(labels).tolist():
            self._merge_class(label, x[labels == label])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of every running sum, enough to resume the stream exactly."""
        return {key: getattr(self, f"_{key}").clone() for key in _STATE_KEYS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore statistics saved by `state_dict` from moments of the same shape and kind."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise StateError(f"ClassMoments state lacks {', '.join(missing)}")
        for key in _STATE_KEYS:
            current = getattr(self, f"_{key}")
            if tuple(state[key].shape) != tuple(current.shape):
                raise StateError(
                    f"ClassMoments state {key!r} has shape {tuple(state[key].shape)}, expected {tuple(current.shape)}"
                )
            setattr(self, f"_{key}", state[key].to(device=current.device, dtype=current.dtype).clone())

    def _merge_class(self, label: int, x: torch.Tensor) -> None:
        """Chan's pairwise merge of one class's batch statistics (b) into its running ones (a)."""
        n_a, n_b = int(self._counts[label]), len(x)
        n = n_a + n_b
        mean_b = x.mean(dim=0)
        centred_b = x - mean_b
        scatter_b = centred_b.T @ centred_b
        shift = mean_b - self._means[label]
        slot = label if self.fourth_moments else 0
        if self.fourth_moments:
            squared_norms = (centred_b * centred_b).sum(dim=1)
            third_b = squared_norms @ centred_b
            fourth_b = (squared_norms * squared_norms).sum()
            # Re-centre both parts on the merged mean before adding their higher-order sums.
            old = (self._scatter[slot], self._third[label], self._fourth[label])
            third_a, fourth_a = _recentre(n_a, *old, shift * (n_b / n))
            third_b, fourth_b = _recentre(n_b, scatter_b, third_b, fourth_b, -shift * (n_a / n))
            self._third[label] = third_a + third_b
            self._fourth[label] = fourth_a + fourth_b
        self._scatter[slot] += scatter_b + torch.outer(shift, shift) * (n_a * n_b / n)
        self._means[label] += shift * (n_b / n)
        self._counts[label] = n

    def _require_samples(self) -> int:
        total = self.total
        if total == 0:
            raise StateError("ClassMoments has seen no samples yet")
        return total

    def _check_batch(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(f"x must be [B, {self.dim}], got {tuple(x.shape)}")
        if labels.shape != (len(x),) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InputError(f"labels must be integer [{len(x)}], got {labels.dtype} {tuple(labels.shape)}")
        if len(x) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            low, high = int(labels.min()), int(labels.max())
            raise InputError(f"labels must lie in [0, {self.num_classes}), got range [{low}, {high}]")
        if not torch.isfinite(x).all():
            raise InputError("x holds non-finite values")


def _recentre(
    count: int, scatter: torch.Tensor, third: torch.Tensor, fourth: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum ||z - d||^2 (z - d) and sum ||z - d||^4 from the sums of z centred on its own mean.

    With sum z = 0: expanding the powers leaves only terms in sum z z^T (scatter), the old
    third- and fourth-order sums and d itself.
    """
    if count == 0:
        return third, fourth
    norm2 = offset @ offset
    trace = torch.diagonal(scatter).sum()
    scatter_offset = scatter @ offset
    new_third = third - 2 * scatter_offset - trace * offset - count * norm2 * offset
    new_fourth = fourth + 4 * (offset @ scatter_offset) + count * norm2 * norm2 - 4 * (third @ offset) + 2 * norm2 * trace
    return new_third, new_fourth
