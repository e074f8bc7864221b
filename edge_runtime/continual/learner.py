"""The 9+1 learner: route each input to the frozen classifier or to a novel class learned since.

Novel classes are learned one after another (9+1, then 9+1+1, ...). Each has its own novelty
head, trained while it was the newest against the rehearsal memory of everything known before
it. Routing asks the newest trained head first (new w.r.t. everything learned so far?), then the
older ones, and gives the rest the frozen classifier's argmax. When a further class is added,
the samples the finished head flags most confidently enter the memory under that class's label,
so the next head learns them as known.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from calibration.threshold import threshold_at_fpr
from edge_runtime.config import DetectorConfig, RunConfig
from edge_runtime.continual.memory import RehearsalMemory
from edge_runtime.detectors.base import PROTOCOLS, Detector, Observations
from edge_runtime.detectors.pixel_registry import PIXEL_DETECTORS
from edge_runtime.detectors.registry import build_static_detector
from edge_runtime.detectors.self_supervised import (CROSS_FITTED_MODES, SelfSupervisedDetector, keeps_images,
                                                   trained_head_config)
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.metrics import ood_metrics
from edge_runtime.models.base import FrozenClassifier

ADAPTIVE_DETECTOR = "grad_mahalanobis_ssl"
FEATURE_ONLY_DETECTORS = ("msp", "max_logit", "energy", "feature_mahalanobis", "knn", "react", "vim", "gradnorm")
THRESHOLD_FOLDS = 5  # static heads: cross-fitting folds of the memory behind the threshold


def needs_pixels(config: DetectorConfig) -> bool:
    """Whether the configured head looks at pixels, so the memory and pool must keep them.

    Detectors not known to work on features and logits alone are assumed to need pixels, which
    costs memory but never correctness.
    """
    if config.name == ADAPTIVE_DETECTOR:
        return keeps_images(config)
    if config.name == "grad_mahalanobis":
        return config.site == "last_conv"
    return config.name not in FEATURE_ONLY_DETECTORS


def stat_layers(config: DetectorConfig) -> tuple[str, ...]:
    """The classifier layers whose statistics the configured head reads (SelfSupervisedDetector.stat_layers)."""
    return trained_head_config(config).layer_stats if config.name == ADAPTIVE_DETECTOR else ()


@dataclass(frozen=True)
class Routing:
    """The learner's decision for a batch.

    labels: int64 [B], 0..C-1 known classes, C + i the i-th novel class;
    novel: bool [B], flagged by the newest trained head (new w.r.t. everything learned so far);
    scores: float32 [B], that head's novelty score, higher = more novel (NaN before any head is trained).
    """

    labels: torch.Tensor
    novel: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class RoundReport:
    """How the newest head stands after an adaptation round (no stream label is used).

    separation_auroc: memory vs pool scores, out-of-fold wherever the head trained on them;
    pseudo_label_acc: agreement of the head's decisions with the pseudo-labels its own beliefs
    imply (memory = known; the pool's top `novel_share` = novel), NaN for heads without any.
    candidates: what the kept heads learned as novel ("round k" of memory_pu, "sal", "woods"), "" for
    heads without cross-fitted rounds.
    """

    round: int
    pool_size: int
    novel_share: float
    separation_auroc: float
    pseudo_label_acc: float
    candidates: str = ""


class NoveltyHead(ABC):
    """One novel class's detector and decision threshold, calibrated on the rehearsal memory."""

    adaptive: bool

    @abstractmethod
    def calibrate(self, memory: Observations, labels: torch.Tensor) -> None:
        """Learn what is known from the memory (labels >= C mark earlier novel classes)."""

    @abstractmethod
    def observe(self, batch: Observations) -> None:
        """One adaptation round with an unlabeled stream batch."""

    @abstractmethod
    def score(self, batch: Observations, protocol: str = "per_sample") -> torch.Tensor:
        """Novelty scores [B], float32; higher = more novel."""

    @property
    @abstractmethod
    def threshold(self) -> float | None:
        """Scores above it are novel; None until the head can decide."""

    @property
    @abstractmethod
    def pool(self) -> Observations | None:
        """The stream samples the head learned from (the most recent, capped), if it keeps them."""

    @abstractmethod
    def freeze(self) -> None:
        """Stop adapting and drop what only adaptation needed (pool, memory copy)."""

    @abstractmethod
    def report(self, round_index: int) -> RoundReport:
        ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], memory: Observations, labels: torch.Tensor) -> None:
        """Restore; heads that are a function of the memory refit on it instead of storing a copy."""

    @property
    def ready(self) -> bool:
        return self.threshold is not None


class AdaptiveHead(NoveltyHead):
    """The self-supervised gradient Mahalanobis detector: it keeps learning from the stream."""

    adaptive = True

    def __init__(self, classifier: FrozenClassifier, config: DetectorConfig, seed: int, progress: bool) -> None:
        self.detector = SelfSupervisedDetector(classifier, config, seed, progress)
        self.num_known = classifier.num_classes

    def calibrate(self, memory: Observations, labels: torch.Tensor) -> None:
        # The gradient statistics are only read in paper mode or when they help rank candidates;
        # fitting them otherwise would cost time and a C(D+1)-square precision in every saved state.
        config = self.detector.config
        if config.ssl_mode == "paper" or config.pu_ranking == "head_and_gradient":
            self.detector.fit(memory, classifier_labels(memory, labels, self.num_known))
        self.detector.set_memory(memory, labels)

    def observe(self, batch: Observations) -> None:
        self.detector.observe(batch)

    def score(self, batch: Observations, protocol: str = "per_sample") -> torch.Tensor:
        return self.detector.score_protocol(batch, protocol)

    @property
    def threshold(self) -> float | None:
        return self.detector.threshold

    @property
    def pool(self) -> Observations | None:
        return self.detector.pool

    def freeze(self) -> None:
        self.detector.pool = None
        self.detector.memory = None
        self.detector.memory_correct = None

    def report(self, round_index: int) -> RoundReport:
        detector, pool, memory = self.detector, self.detector.pool, self.detector.memory
        if pool is None or memory is None or not self.ready:
            raise StateError("no adaptation round has run on this head yet (or it is frozen)")
        if detector.mode in CROSS_FITTED_MODES:
            memory_scores, pool_scores = detector.out_of_fold_scores()
            novel_share = float(detector.novel_share)
        else:
            memory_scores, pool_scores = self.score(memory), self.score(pool)
            novel_share = float((pool_scores > self.threshold).float().mean())
        return RoundReport(round_index, len(pool), novel_share,
                           ood_metrics(memory_scores.numpy(), pool_scores.numpy())["auroc"],
                           self._pseudo_label_agreement(memory_scores, pool_scores, novel_share),
                           detector.kept_candidates or "")

    def _pseudo_label_agreement(self, memory_scores: torch.Tensor, pool_scores: torch.Tensor,
                                novel_share: float) -> float:
        candidates = pool_scores.argsort(descending=True)[:round(novel_share * len(pool_scores))]
        decisions = torch.cat([memory_scores, pool_scores[candidates]]) > self.threshold
        targets = torch.cat([torch.zeros(len(memory_scores), dtype=torch.bool),
                             torch.ones(len(candidates), dtype=torch.bool)])
        return float((decisions == targets).float().mean())

    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict[str, Any], memory: Observations, labels: torch.Tensor) -> None:
        self.detector.load_state_dict(state)


class StaticHead(NoveltyHead):
    """A detector fitted once on the memory, thresholded on cross-fitted memory scores.

    Usually one refit on all of the memory then scores. Detectors whose score scale changes from
    one training run to the next (`refit_keeps_score_scale` False: DROCC) would not match the
    threshold after a refit, so their fold models themselves score, by their mean; a mean spreads
    less than one model's held-out scores, so false alarms land at or below `target_fpr`. Feature
    detectors are a cheap function of the memory, so a saved state keeps only the threshold and
    scores and a load refits them; pixel detectors train networks, so their weights are saved.
    It cannot tell learned novel classes apart, so it serves one novel class.
    """

    adaptive = False

    def __init__(self, classifier: FrozenClassifier, config: DetectorConfig, seed: int,
                 image_shape: tuple[int, int, int] | None = None, progress: bool = False) -> None:
        device = next(classifier.parameters()).device
        try:
            first = build_static_detector(config.name, classifier, config, seed, image_shape, progress, device)
            self.ensemble = not first.refit_keeps_score_scale
            self.detectors: list[Detector] = [first] + [
                build_static_detector(config.name, classifier, config, seed + fold, image_shape, progress, device)
                for fold in range(1, THRESHOLD_FOLDS if self.ensemble else 1)]
        except ValueError as exc:
            raise ConfigError(f"detector.name: {exc}") from None
        self.config = config
        self.seed = seed
        self.num_known = classifier.num_classes
        self.memory_scores: torch.Tensor | None = None  # out-of-fold, what the threshold was read from
        self.stream_scores = torch.zeros(0)  # of the most recent `pool_size` observed samples
        self._threshold: float | None = None

    def calibrate(self, memory: Observations, labels: torch.Tensor) -> None:
        labels = classifier_labels(memory, labels, self.num_known)
        folds = torch.randperm(len(memory), generator=torch.Generator().manual_seed(self.seed)) % THRESHOLD_FOLDS
        scores = torch.zeros(len(memory))
        for fold in range(THRESHOLD_FOLDS):
            train, held = torch.nonzero(folds != fold).flatten(), torch.nonzero(folds == fold).flatten()
            detector = self.detectors[fold if self.ensemble else 0]
            detector.fit(memory.select(train), labels[train])
            scores[held] = detector.score(memory.select(held)).float().cpu()
        if not self.ensemble:
            self.detectors[0].fit(memory, labels)
        self.memory_scores = scores
        try:
            self._threshold = threshold_at_fpr(scores, self.config.target_fpr)
        except ValueError as exc:
            raise InputError(f"memory of {len(memory)} samples cannot set the threshold: {exc}") from None

    def observe(self, batch: Observations) -> None:
        scores = torch.cat([self.stream_scores, self.score(batch).cpu()])
        self.stream_scores = scores[-self.config.pool_size:]

    def score(self, batch: Observations, protocol: str = "per_sample") -> torch.Tensor:
        return torch.stack([d.score_protocol(batch, protocol).float() for d in self.detectors]).mean(dim=0)

    @property
    def threshold(self) -> float | None:
        return self._threshold

    @property
    def pool(self) -> Observations | None:
        return None

    def freeze(self) -> None:
        self.stream_scores = torch.zeros(0)

    def report(self, round_index: int) -> RoundReport:
        if self.memory_scores is None or len(self.stream_scores) == 0:
            raise StateError("no stream sample has been observed yet")
        novel_share = float((self.stream_scores > self.threshold).float().mean())
        separation = ood_metrics(self.memory_scores.numpy(), self.stream_scores.numpy())["auroc"]
        return RoundReport(round_index, len(self.stream_scores), novel_share, separation, float("nan"))

    def state_dict(self) -> dict[str, Any]:
        trained = [d.state_dict() for d in self.detectors] if self.config.name in PIXEL_DETECTORS and self.ready else None
        return {"threshold": self._threshold, "memory_scores": self.memory_scores, "stream_scores": self.stream_scores,
                "detectors": trained}

    def load_state_dict(self, state: dict[str, Any], memory: Observations, labels: torch.Tensor) -> None:
        if self.config.name not in PIXEL_DETECTORS:
            self.detectors[0].fit(memory, classifier_labels(memory, labels, self.num_known))
        else:
            trained = state.get("detectors")
            if not isinstance(trained, list) or len(trained) != len(self.detectors):
                raise StateError(f"saved {self.config.name} head holds no {len(self.detectors)} trained model(s) "
                                 f"(a state from before fold models were kept): adapt again")
            for detector, weights in zip(self.detectors, trained):
                detector.load_state_dict(weights)
        self._threshold = state["threshold"]
        self.memory_scores = state["memory_scores"]
        self.stream_scores = state["stream_scores"]


class NovelClassLearner:
    """Known classes from the frozen classifier plus novel classes, each with its novelty head."""

    def __init__(self, config: RunConfig, classifier: FrozenClassifier, known_classes: tuple[str, ...],
                 memory: RehearsalMemory, progress: bool = False) -> None:
        if len(known_classes) != classifier.num_classes:
            raise InputError(f"{len(known_classes)} known class names for a classifier of {classifier.num_classes} outputs")
        self.config = config
        self.classifier = classifier
        self.known_classes = tuple(known_classes)
        self.memory = memory
        self.progress = progress
        self.novel_classes: list[str] = []
        self.heads: list[NoveltyHead] = []

    @property
    def classes(self) -> tuple[str, ...]:
        """Every class the learner can output, in label order."""
        return self.known_classes + tuple(self.novel_classes)

    def add_novel_class(self, name: str) -> None:
        """Open a new class, learned by a fresh head from the stream observed from now on.

        The previous head stops adapting; the pool samples it flags enter the memory under its
        label (most confident first, at most a fair share of the budget), so the new head treats
        that class as known.
        """
        if name in self.classes:
            raise InputError(f"class {name!r} already exists; classes: {', '.join(self.classes)}")
        if self.heads:
            finished = self.heads[-1]
            if not finished.adaptive:
                raise ConfigError(f"detector {self.config.detector.name!r} is static and serves one novel class; "
                                  f"use {ADAPTIVE_DETECTOR!r} to learn more")
            if not finished.ready:
                raise StateError(f"novel class {self.novel_classes[-1]!r} has not adapted yet: observe stream data first")
            self._remember(finished, len(self.classes) - 1)
            finished.freeze()
        head = self._new_head()
        head.calibrate(self.memory.observations(), self.memory.stored_labels())
        self.heads.append(head)
        self.novel_classes.append(name)

    def observe(self, batch: Observations) -> None:
        """An adaptation round of the newest head."""
        self.heads[-1].observe(batch)

    def route(self, batch: Observations, protocol: str = "per_sample") -> Routing:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        labels = batch.logits.argmax(dim=1).cpu()
        scores = torch.full((len(batch),), float("nan"))
        novel = torch.zeros(len(batch), dtype=torch.bool)
        decided = torch.zeros(len(batch), dtype=torch.bool)
        trained = [(index, head) for index, head in enumerate(self.heads) if head.ready]
        for rank, (index, head) in enumerate(reversed(trained)):
            head_scores = head.score(batch, protocol).cpu()
            flagged = (head_scores > head.threshold) & ~decided
            if rank == 0:
                scores, novel = head_scores.float(), flagged.clone()
            labels[flagged] = len(self.known_classes) + index
            decided |= flagged
        return Routing(labels, novel, scores)

    def report(self, round_index: int) -> RoundReport:
        return self.heads[-1].report(round_index)

    def _new_head(self) -> NoveltyHead:
        config = self.config.detector
        if config.name == ADAPTIVE_DETECTOR:
            return AdaptiveHead(self.classifier, config, self.config.seed, self.progress)
        return StaticHead(self.classifier, config, self.config.seed, self._image_shape(), self.progress)

    def _image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of the images the memory keeps, None when it keeps none."""
        if self.memory.images is None:
            return None
        height, width, channels = self.memory.images.shape[1:]
        return channels, height, width

    def _remember(self, head: NoveltyHead, label: int) -> None:
        """Offer the finished head's flagged pool samples to the memory as class `label`."""
        pool = head.pool
        if pool is None or len(pool) == 0:
            raise StateError(f"head of class {self.classes[label]!r} kept no stream samples to remember")
        scores = head.score(pool).cpu()
        flagged = torch.nonzero(scores > head.threshold).flatten()
        fair_share = self.memory.budget // len(self.classes)  # the finished class is already among them
        chosen = flagged[scores[flagged].argsort(descending=True)][:fair_share]
        if len(chosen) == 0:
            raise StateError(f"head of class {self.classes[label]!r} flags none of its pool; nothing to remember")
        samples = pool.select(chosen)
        images = None
        if self.memory.images is not None:
            images = (samples.images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.memory.add(images, torch.full((len(chosen),), label).numpy(), samples.features.numpy(),
                        samples.logits.numpy(), None if self.memory.stats is None else samples.stats.numpy())

    def state_dict(self) -> dict[str, Any]:
        return {"novel_classes": list(self.novel_classes), "heads": [head.state_dict() for head in self.heads]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the heads; the memory must already hold what it held when the state was taken."""
        if len(state["novel_classes"]) != len(state["heads"]):
            raise StateError("saved learner lists a different number of novel classes and heads")
        memory, labels = self.memory.observations(), self.memory.stored_labels()
        self.heads = []
        for head_state in state["heads"]:
            head = self._new_head()
            head.load_state_dict(head_state, memory, labels)
            self.heads.append(head)
        self.novel_classes = list(state["novel_classes"])


def classifier_labels(memory: Observations, labels: torch.Tensor, num_known: int) -> torch.Tensor:
    """Labels the frozen classifier's statistics can take: memory samples of learned novel classes
    (labels >= C) count under the class the classifier predicts for them."""
    return torch.where(labels < num_known, labels, memory.logits.argmax(dim=1).cpu())
