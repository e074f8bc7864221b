"""The firmware-facing session: watch an unlabeled stream, learn the novel class, label every input.

    session = Session.from_config("configs/digits.yaml", "runs/train/classifier.safetensors", memory)
    session.observe(frames)            # unlabeled stream data; adapts every `session.adapt_every` samples
    result = session.predict(frames)   # labels (C = the novel class), novelty flags, scores
    session.save("state/session.state"); session = Session.load("state/session.state")

Every batch is validated before anything is touched, so a malformed frame raises InputError and
leaves the session as it was. What the session holds is bounded over an endless stream: the
memory by its budget, the pending samples by `adapt_every` plus one batch, the head's pool by
`detector.pool_size`.

Threads: `predict` may be called from one thread while another runs `observe`/`adapt`. A lock
around the learner state makes it so (the frozen classifier's `embed` is itself thread-safe). A `predict` arriving during an adaptation round embeds its frames at once and waits only
for the round to finish to route them, so every prediction comes from one whole set of heads,
never a half-trained one. Every other method takes the state lock, so `save` writes a consistent
snapshot.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_runtime.config import RunConfig, config_from_dict, config_to_dict, load_config
from edge_runtime.continual.learner import NovelClassLearner, RoundReport, needs_pixels, stat_layers
from edge_runtime.continual.memory import Footprint, RehearsalMemory
from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.transforms import conform, to_tensor
from edge_runtime.detectors.base import Observations
from edge_runtime.device import resolve_device
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.models.base import FrozenClassifier
from edge_runtime.models.persistence import load_classifier
from edge_runtime.models.registry import build_classifier
from edge_runtime.state import read_state, write_state

DEFAULT_NOVEL_CLASS = "novel"


@dataclass(frozen=True)
class Prediction:
    """Per input: label (0..C-1 known, C + i the i-th learned novel class), novelty flag, score.

    `novel` and `scores` come from the newest trained novelty head (new w.r.t. everything the
    session has learned); scores are NaN while no head has adapted yet.
    """

    labels: np.ndarray  # int64 [B]
    novel: np.ndarray  # bool [B]
    scores: np.ndarray  # float32 [B], higher = more novel


class Session:
    """A frozen classifier, a rehearsal memory and the 9+1 learner, driven by unlabeled batches.

    Thread safety: `predict` is safe to call from a second thread while `observe` or `adapt` runs;
    it blocks for at most the adaptation round in progress and answers with the heads as they are
    before or after that round, never in between. All other methods are serialised as well.
    """

    def __init__(self, config: RunConfig, classifier: FrozenClassifier, known_classes: Sequence[str],
                 memory: ImageSet, novel_class: str = DEFAULT_NOVEL_CLASS, *,
                 device: torch.device | str | None = None, progress: bool = False) -> None:
        """`memory` holds labelled known images (0..C-1); the policy keeps `memory.budget` of them."""
        _check_rebuildable(classifier, config)
        self._setup(config, classifier, device)
        memory = conform(memory, config.model.input_size, config.model.in_channels)
        if len(memory) == 0 or memory.labels.min() < 0 or memory.labels.max() >= len(known_classes):
            raise InputError(f"memory {memory.name!r} needs at least one image, with labels in 0..{len(known_classes) - 1}")
        chunks = [memory.subset(np.arange(start, min(start + config.session.max_batch, len(memory))))
                  for start in range(0, len(memory), config.session.max_batch)]
        embedded = [self._embed(to_tensor(chunk.images, self.device)) for chunk in chunks]
        stats_dim = None if embedded[0].stats is None else embedded[0].stats.shape[1]  # known once the classifier ran
        self.memory = RehearsalMemory(config.memory.budget, config.memory.policy,
                                      memory.images.shape[1:] if self.keep_pixels else None, config.seed,
                                      (classifier.feature_dim, classifier.num_classes), stats_dim)
        for chunk, seen in zip(chunks, embedded):
            self.memory.add(chunk.images if self.keep_pixels else None, chunk.labels, seen.features.numpy(),
                            seen.logits.numpy(), None if seen.stats is None else seen.stats.numpy())
        self.learner = NovelClassLearner(config, self.classifier, tuple(known_classes), self.memory, progress)
        self.learner.add_novel_class(novel_class)
        self.observed = 0
        self.rounds = 0
        self._pending: list[Observations] = []

    @classmethod
    def from_config(cls, config: RunConfig | str | os.PathLike, classifier_path: str | os.PathLike,
                    memory: ImageSet, novel_class: str | None = None, *,
                    device: torch.device | str | None = None, progress: bool = False) -> "Session":
        """A session from a YAML config (or RunConfig) and a classifier file from `edge-runtime train`."""
        if not isinstance(config, RunConfig):
            config = load_config(config)
        classifier, classes = load_classifier(classifier_path, config.model)
        name = novel_class or config.data.novel_class or DEFAULT_NOVEL_CLASS
        return cls(config, classifier, classes, memory, name, device=device, progress=progress)

    # -- the stream ---------------------------------------------------------------------------

    @property
    def classes(self) -> tuple[str, ...]:
        """Names of every label `predict` can return, in label order."""
        return self.learner.classes

    def observe(self, images: np.ndarray | torch.Tensor) -> bool:
        """Take an unlabeled stream batch; returns True when it completed an adaptation round."""
        seen = self._embed(self._pixels(images))
        with self._lock:
            self._pending.append(seen)
            self.observed += len(seen)
            if sum(len(batch) for batch in self._pending) < self.config.session.adapt_every:
                return False
            return self.adapt()

    def adapt(self) -> bool:
        """Run an adaptation round on the samples observed since the last one (False when none are)."""
        with self._lock:
            if not self._pending:
                return False
            batch = Observations.concat(self._pending)
            self.learner.observe(batch)
            self._pending = []
            self.rounds += 1
            return True

    def predict(self, images: np.ndarray | torch.Tensor) -> Prediction:
        """Label, novelty flag and score per input; every decision depends on that input alone."""
        seen = self._embed(self._pixels(images))
        with self._lock:
            routing = self.learner.route(seen, "per_sample")
        return Prediction(routing.labels.numpy().astype(np.int64), routing.novel.numpy(),
                          routing.scores.numpy().astype(np.float32))

    def add_novel_class(self, name: str) -> None:
        """Close the current novel class and learn a further one from the stream to come (9+1+1)."""
        with self._lock:
            self.adapt()
            self.learner.add_novel_class(name)

    def round_report(self) -> RoundReport:
        """Where the newest head stands after the latest round (for logs; costs a scoring pass)."""
        with self._lock:
            return self.learner.report(self.rounds)

    def memory_footprint(self) -> Footprint:
        """Bytes held by the rehearsal memory (stored rows and the detectors' working copy)."""
        with self._lock:
            return self.memory.footprint()

    # -- state --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> int:
        """Write everything to one self-checking file, atomically; returns its size in bytes."""
        with self._lock:
            return write_state(path, self._state())

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str | None = None,
             progress: bool = False) -> "Session":
        """A session exactly as it was saved; a corrupt, truncated or foreign file is a StateError."""
        state = read_state(path)
        try:
            config = config_from_dict(state["config"], origin=str(path))
            known_classes = tuple(state["known_classes"])
            classifier = _fresh_classifier(config, len(known_classes))
            classifier.load_state_dict(state["classifier"])
            session = cls.__new__(cls)
            session._setup(config, classifier, device)
            session.memory = RehearsalMemory.from_state(state["memory"])
            session.learner = NovelClassLearner(config, session.classifier, known_classes, session.memory, progress)
            session.learner.load_state_dict(state["learner"])
            session.observed, session.rounds = int(state["observed"]), int(state["rounds"])
            session._pending = [Observations(batch.get("images"), batch["features"], batch["logits"], batch.get("stats"))
                                for batch in state["pending"]]
        except (ConfigError, StateError, AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            # Inner parts (memory, heads) name what is wrong but not the file: name it here.
            raise StateError(f"{path}: the state passes its checksum but does not fit this runtime: {exc}") from exc
        return session

    def _setup(self, config: RunConfig, classifier: FrozenClassifier, device: torch.device | str | None) -> None:
        """What every way of creating a session starts with: config, device, classifier."""
        self.config = config
        self.device = resolve_device(config.device) if device is None else torch.device(device)
        self.classifier = classifier.eval().to(self.device)
        self.keep_pixels = needs_pixels(config.detector)
        self.stat_layers = stat_layers(config.detector)
        self._lock = threading.RLock()  # the learner state; re-entrant: observe() runs adapt() holding it

    def _state(self) -> dict[str, Any]:
        pending = [{key: value for key, value in (("images", b.images), ("features", b.features), ("logits", b.logits),
                                                  ("stats", b.stats)) if value is not None} for b in self._pending]
        return {"config": config_to_dict(self.config), "known_classes": list(self.learner.known_classes),
                "classifier": dict(self.classifier.state_dict()), "memory": self.memory.state_dict(),
                "learner": self.learner.state_dict(), "observed": self.observed, "rounds": self.rounds,
                "pending": pending}

    # -- the boundary -------------------------------------------------------------------------

    def _pixels(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Validate a batch and return it as float [B, C, H, W] in [0, 1] on the session's device."""
        size, channels = self.config.model.input_size, self.config.model.in_channels
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise InputError(f"numpy images must be uint8 [B, H, W, C] pixels, got dtype {images.dtype}; "
                                 f"pass floats as a torch tensor [B, C, H, W] in [0, 1]")
            if images.ndim != 4 or images.shape[1:] != (size, size, channels):
                raise InputError(f"numpy images must be [B, {size}, {size}, {channels}] (model.input_size {size}, "
                                 f"model.in_channels {channels}), got shape {tuple(images.shape)}")
        elif isinstance(images, torch.Tensor):
            if not images.is_floating_point():
                raise InputError(f"tensor images must be float [B, C, H, W] in [0, 1], got dtype {images.dtype}; "
                                 f"pass uint8 pixels as a numpy array [B, H, W, C]")
            if images.ndim != 4 or tuple(images.shape[1:]) != (channels, size, size):
                raise InputError(f"tensor images must be [B, {channels}, {size}, {size}] (model.in_channels "
                                 f"{channels}, model.input_size {size}), got shape {tuple(images.shape)}")
        else:
            raise InputError(f"images must be a numpy uint8 array or a torch float tensor, got {type(images).__name__}")
        if len(images) == 0:
            raise InputError("images is an empty batch")
        if len(images) > self.config.session.max_batch:
            raise InputError(f"a batch of {len(images)} images exceeds session.max_batch = {self.config.session.max_batch}")
        if isinstance(images, np.ndarray):
            return to_tensor(images, self.device)
        pixels = images.detach().to(self.device, torch.float32)
        if not torch.isfinite(pixels).all():
            raise InputError(f"tensor images hold {int((~torch.isfinite(pixels)).sum())} NaN/Inf value(s)")
        if pixels.min() < 0 or pixels.max() > 1:
            raise InputError(f"tensor images must lie in [0, 1], got {float(pixels.min()):.4g}..{float(pixels.max()):.4g}")
        return pixels

    @torch.no_grad()
    def _embed(self, pixels: torch.Tensor) -> Observations:
        """The frozen classifier's features, logits and layer statistics (on the host, where the heads run)."""
        features, logits, stats = self.classifier.embed_with_stats(pixels, self.stat_layers)
        images = pixels.cpu() if self.keep_pixels else None
        return Observations(images, features.float().cpu(), logits.float().cpu(),
                            None if stats is None else stats.float().cpu())


def _fresh_classifier(config: RunConfig, num_classes: int) -> FrozenClassifier:
    """An untrained classifier of the configured architecture, whose weights are about to be loaded.

    Normalize's statistics are buffers, so its placeholders are overwritten with the weights; the
    global RNG is left as it was, so building one does not change what a run draws next.
    """
    with torch.random.fork_rng(devices=[]):
        return build_classifier(config.model, num_classes, (0.0,) * config.model.in_channels,
                                (1.0,) * config.model.in_channels)


def _check_rebuildable(classifier: FrozenClassifier, config: RunConfig) -> None:
    """A saved session rebuilds its classifier from config.model, so refuse one it could not rebuild."""
    expected = _fresh_classifier(config, classifier.num_classes).state_dict()
    actual = classifier.state_dict()
    mismatched = [key for key in expected.keys() | actual.keys()
                  if key not in expected or key not in actual or expected[key].shape != actual[key].shape]
    if mismatched:
        raise ConfigError(f"the classifier is not what model config {config_to_dict(config.model)} builds "
                          f"(differs at {sorted(mismatched)[:3]}), so a saved session could not rebuild it")
