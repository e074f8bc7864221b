"""Rehearsal memory: known-IDD samples kept under a hard sample budget.

The memory is the only labelled data the runtime holds after deployment, so it doubles as the
known-IDD reference for thresholds and as positives for the novelty head. It stores what the
runtime needs of each sample: the pixels (uint8, when a detector looks at them), the frozen
classifier's features and logits (so refitting a head never reruns the backbone), the layer
statistics a head may read beside them, and the label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_runtime.continual.herding import balanced_quotas, herding_selection
from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.transforms import to_tensor
from edge_runtime.detectors.base import Observations
from edge_runtime.errors import InputError, StateError

POLICIES = ("reservoir", "class_balanced", "herding")
FEATURE_POLICIES = ("herding",)  # select by the stored features, so need embedding_dims
ARRAYS = ("images", "features", "logits", "stats", "labels")


@dataclass(frozen=True)
class Footprint:
    """Bytes held in host RAM and on an accelerator (a CPU-only run holds everything on the host)."""

    host_bytes: int
    device_bytes: int


class RehearsalMemory:
    """A fixed-budget store of labelled samples filled by a selection policy.

    `reservoir` keeps a uniform sample of everything offered (Vitter's algorithm R);
    `class_balanced` keeps equal shares per class, evicting from the largest class first;
    `herding` keeps the same shares, each class's chosen by herding on the stored features from
    what it holds and what is offered (see `herding`), and needs `embedding_dims`. A herded memory
    is not a uniform sample of its classes, so the false-alarm rate a threshold is calibrated to on
    it need not hold on live inputs (README, "Memory policies": on CIFAR-10 it flagged fewer).
    `image_shape` None stores no pixels; `embedding_dims` (D, C) also stores features [D] and
    logits [C] per sample, and `stats_dim` S layer statistics [S] (Observations.stats) with them.
    """

    def __init__(self, budget: int, policy: str, image_shape: tuple[int, int, int] | None, seed: int = 0,
                 embedding_dims: tuple[int, int] | None = None, stats_dim: int | None = None) -> None:
        if budget <= 0:
            raise ValueError(f"memory budget must be positive, got {budget}")
        if policy not in POLICIES:
            raise ValueError(f"memory policy must be one of {POLICIES}, got {policy!r}")
        if image_shape is None and embedding_dims is None:
            raise ValueError("a memory must store images, embeddings or both")
        if stats_dim is not None and embedding_dims is None:
            raise ValueError("layer statistics are stored with embeddings: give embedding_dims too")
        if policy in FEATURE_POLICIES and embedding_dims is None:
            raise ValueError("the herding policy selects by features: give embedding_dims")
        self.budget = budget
        self.policy = policy
        self.images = None if image_shape is None else np.zeros((budget, *image_shape), dtype=np.uint8)
        self.features = None if embedding_dims is None else np.zeros((budget, embedding_dims[0]), dtype=np.float32)
        self.logits = None if embedding_dims is None else np.zeros((budget, embedding_dims[1]), dtype=np.float32)
        self.stats = None if stats_dim is None else np.zeros((budget, stats_dim), dtype=np.float32)
        self.labels = np.full(budget, -1, dtype=np.int64)
        self.size = 0
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._working_copy: Observations | None = None

    def add(self, images: np.ndarray | None, labels: np.ndarray, features: np.ndarray | None = None,
            logits: np.ndarray | None = None, stats: np.ndarray | None = None) -> None:
        """Offer labelled samples (with whatever this memory stores of them); the policy decides which stay."""
        rows = {"images": images, "features": features, "logits": logits, "stats": stats}
        for name, values in rows.items():
            stored = getattr(self, name)
            if (stored is None) != (values is None):
                need = "needs" if stored is not None else "does not store"
                raise InputError(f"this memory {need} {name}; got {'none' if values is None else 'some'}")
            if values is not None and (len(values) != len(labels) or values.shape[1:] != stored.shape[1:]):
                raise InputError(f"memory {name} must be [{len(labels)}, {', '.join(map(str, stored.shape[1:]))}] "
                                 f"for {len(labels)} labels, got {tuple(values.shape)}")
        if self.policy in FEATURE_POLICIES:
            self._herd({**rows, "labels": np.asarray(labels)})
            return
        for index, label in enumerate(labels):
            slot = self._slot_for(int(label))
            self.seen += 1
            if slot is None:
                continue
            self.labels[slot] = label
            for name, values in rows.items():
                if values is not None:
                    getattr(self, name)[slot] = values[index]
            self._working_copy = None

    def _herd(self, offered: dict[str, np.ndarray | None]) -> None:
        """Re-choose every class's quota by herding over its stored and offered samples."""
        if len(offered["labels"]) == 0:
            return
        candidates = {name: np.concatenate([getattr(self, name)[: self.size], offered[name]])
                      for name in ARRAYS if getattr(self, name) is not None}
        labels = candidates["labels"]
        self.seen += len(offered["labels"])
        quotas = balanced_quotas(np.bincount(labels), self.budget)
        kept = []
        for label in np.flatnonzero(quotas):
            rows = np.flatnonzero(labels == label)
            kept.append(rows[herding_selection(candidates["features"][rows], int(quotas[label]))])
        kept = np.concatenate(kept)
        for name, values in candidates.items():
            getattr(self, name)[: len(kept)] = values[kept]
        self.size = len(kept)
        self._working_copy = None

    def _slot_for(self, label: int) -> int | None:
        if self.size < self.budget:
            self.size += 1
            return self.size - 1
        if self.policy == "reservoir":
            j = int(self._rng.integers(self.seen + 1))
            return j if j < self.budget else None
        counts = np.bincount(self.labels[: self.size], minlength=label + 1)
        largest = int(counts.argmax())
        if counts[label] >= counts[largest]:
            return None
        return int(self._rng.choice(np.flatnonzero(self.labels == largest)))

    def contents(self, classes: tuple[str, ...], name: str = "memory") -> ImageSet:
        """The stored samples as an ImageSet (a copy); needs a memory that stores pixels."""
        if self.images is None:
            raise StateError("this memory stores features and logits only, no images")
        return ImageSet(self.images[: self.size].copy(), self.labels[: self.size].copy(), classes, name)

    def observations(self, device: torch.device | str = "cpu") -> Observations:
        """The stored samples as detectors consume them (pixels as float [0, 1] NCHW), on `device`.

        The tensors are built once per change of the contents and shared with every caller, so a
        detector holding them costs no second copy; `footprint` counts them.
        """
        if self.features is None:
            raise StateError("this memory stores no features and logits; create it with embedding_dims")
        device = torch.device(device)
        copy = self._working_copy
        if copy is None or copy.features.device != device:
            images = None if self.images is None else to_tensor(self.images[: self.size], device)
            features, logits, stats = (None if array is None else torch.from_numpy(array[: self.size].copy()).to(device)
                                       for array in (self.features, self.logits, self.stats))
            copy = Observations(images, features, logits, stats)
            self._working_copy = copy
        return copy

    def stored_labels(self) -> torch.Tensor:
        """Labels of the stored samples, int64 [size]."""
        return torch.from_numpy(self.labels[: self.size].copy())

    @property
    def nbytes(self) -> int:
        """Host bytes held by the stored arrays (the whole budget is allocated up front)."""
        return sum(getattr(self, name).nbytes for name in ARRAYS if getattr(self, name) is not None)

    def footprint(self) -> Footprint:
        """The stored arrays plus the working copy handed to detectors, by where they live."""
        copy = self._working_copy
        tensors = [] if copy is None else [t for t in (copy.images, copy.features, copy.logits, copy.stats)
                                           if t is not None]
        on_device = sum(t.nbytes for t in tensors if t.device.type != "cpu")
        on_host = sum(t.nbytes for t in tensors if t.device.type == "cpu")
        return Footprint(self.nbytes + on_host, on_device)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: stored rows, counters and the policy's random state."""
        arrays = {name: torch.from_numpy(getattr(self, name).copy())
                  for name in ARRAYS if getattr(self, name) is not None}
        return {"budget": self.budget, "policy": self.policy, "size": self.size, "seen": self.seen,
                "rng": self._rng.bit_generator.state, "arrays": arrays}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "RehearsalMemory":
        arrays = {name: tensor.numpy() for name, tensor in state["arrays"].items()}
        images, features, stats = arrays.get("images"), arrays.get("features"), arrays.get("stats")
        memory = cls(int(state["budget"]), state["policy"], None if images is None else images.shape[1:], 0,
                     None if features is None else (features.shape[1], arrays["logits"].shape[1]),
                     None if stats is None else stats.shape[1])
        for name, array in arrays.items():
            target = getattr(memory, name)
            if target is None or target.shape != array.shape:
                raise StateError(f"saved memory {name} has shape {array.shape}, expected "
                                 f"{None if target is None else target.shape}")
            target[...] = array
        memory.size, memory.seen = int(state["size"]), int(state["seen"])
        memory._rng.bit_generator.state = state["rng"]
        return memory
