"""PNG plots for results a person would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def plot_training_loss(history: list[float], path: Path) -> Path:
    """Mean training loss per epoch."""
    figure, axes = plt.subplots(figsize=(5, 3.2))
    axes.plot(np.arange(1, len(history) + 1), history, marker="o", markersize=3)
    axes.set(xlabel="epoch", ylabel="training loss", title="frozen classifier training")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_score_histograms(scores: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """One panel per detector: novelty scores of known test images against novel ones."""
    figure, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 3.0), squeeze=False)
    for panel, (name, (known, novel)) in zip(axes[0], scores.items()):
        bins = np.histogram_bin_edges(np.concatenate([known, novel]), bins=40)
        panel.hist(known, bins=bins, alpha=0.6, density=True, label="known")
        panel.hist(novel, bins=bins, alpha=0.6, density=True, label="novel")
        panel.set(title=name, xlabel="novelty score")
        panel.legend(fontsize=7)
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
