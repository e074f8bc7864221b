"""Detection and 9+1 evaluation on the test split, both protocols side by side.

Static detectors are fitted on the known training images; the self-supervised detector also
adapts to an unlabeled stream built per OOD target. The test split is only ever scored here,
after everything was fitted, and no threshold or hyper-parameter is read off it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from calibration.threshold import threshold_at_fpr

from edge_runtime.config import DetectorConfig, RunConfig, evolve_config
from edge_runtime.continual.learner import RoundReport
from edge_runtime.continual.memory import FEATURE_POLICIES, RehearsalMemory
from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.splits import NovelClassSplit, build_stream
from edge_runtime.detectors.base import PROTOCOLS, Detector, Observations
from edge_runtime.detectors.registry import STATIC_DETECTORS, build_static_detector
from edge_runtime.detectors.self_supervised import SelfSupervisedDetector, keeps_images, trained_head_config
from edge_runtime.errors import ConfigError
from edge_runtime.experiment import embed, known_test_set
from edge_runtime.metrics import ood_metrics
from edge_runtime.models.base import FrozenClassifier
from edge_runtime.reports import plot_score_histograms
from edge_runtime.results import format_table, metric_key
from edge_runtime.session import Session


SSL_MODES = ("memory_pu", "sal", "woods", "paper")  # ours first; the published SAL, WOODS and Algorithm 1 beside it


@dataclass(frozen=True)
class OODTarget:
    """A novel input type: images the stream may contain, and disjoint images it is tested on."""

    name: str
    stream_pool: ImageSet
    test: ImageSet


def ood_targets(split: NovelClassSplit, ood_sets: dict[str, ImageSet], seed: int) -> list[OODTarget]:
    """The held-out class (stream from its training images) and each extra OOD set (halved)."""
    targets = []
    if split.novel_class is not None:
        novel_test = split.test.subset(split.test.labels == len(split.known_classes))
        targets.append(OODTarget(split.novel_class, split.novel_train, novel_test))
    for name, images in ood_sets.items():
        # An outside set's own classes mean nothing here: all of it is the one novel input type.
        novel = ImageSet(images.images, np.full(len(images), len(split.known_classes), dtype=np.int64),
                         split.known_classes + (name,), name)
        order = np.random.default_rng(seed).permutation(len(novel))
        half = len(novel) // 2
        targets.append(OODTarget(name, novel.subset(order[:half]), novel.subset(order[half:])))
    return targets


def fill_memory(held_back: ImageSet, budget: int, policy: str, n_known: int, seed: int,
                classifier: FrozenClassifier, device: torch.device) -> tuple[ImageSet, ImageSet]:
    """(rehearsal memory, known images for the stream), both from images the classifier never trained on.

    After deployment every input is new to the frozen classifier, so the benchmark draws the memory
    and the stream's known part from the held-back slice: thresholds calibrated on the memory then
    carry over to unseen test images. The memory policy chooses among a shuffled prefix of up to
    twice its budget (a policy that selects by features sees the classifier's); the stream's known
    part comes from the rest, so it never repeats a memory sample.
    """
    if len(held_back) < budget + n_known:
        raise ConfigError(f"data.calibration_holdout gives {len(held_back)} held-back known images, but the memory "
                          f"budget ({budget}) plus the stream's known samples ({n_known}) need {budget + n_known}")
    order = np.random.default_rng(seed).permutation(len(held_back))
    offered = held_back.subset(order[: min(len(order) - n_known, 2 * budget)])
    if policy in FEATURE_POLICIES:
        seen = embed(classifier, offered, device, keep_images=False)
        memory = RehearsalMemory(budget, policy, offered.images.shape[1:], seed,
                                 (classifier.feature_dim, classifier.num_classes))
        memory.add(offered.images, offered.labels, seen.features.numpy(), seen.logits.numpy())
    else:
        memory = RehearsalMemory(budget, policy, offered.images.shape[1:], seed)
        memory.add(offered.images, offered.labels)
    return memory.contents(held_back.classes), held_back.subset(np.sort(order[len(offered):]), name="known-pool")


def score_by_protocol(detector: Detector, obs: Observations, protocol: str, batch_size: int) -> np.ndarray:
    """Scores of a homogeneous set (all IDD or all OOD) under `protocol`, in test batches."""
    parts = [detector.score_protocol(obs.select(torch.arange(s, min(s + batch_size, len(obs)))), protocol)
             for s in range(0, len(obs), batch_size)]
    return torch.cat(parts).cpu().numpy()


def evaluate_detectors(cfg: RunConfig, classifier: FrozenClassifier, split: NovelClassSplit,
                       targets: list[OODTarget], device: torch.device, tag: str, out_dir: Path,
                       progress: bool = True, ssl_modes: tuple[str, ...] = SSL_MODES) -> dict[str, float]:
    """Detection metrics of every detector per target and protocol, plus the 9+1 router's accuracy;
    the self-supervised detector in each of `ssl_modes`."""
    known_fit = embed(classifier, split.train, device, keep_images=False)
    labels = torch.from_numpy(split.train.labels)
    known_test = embed(classifier, known_test_set(split), device, keep_images=False)
    target_obs = {t.name: embed(classifier, t.test, device, keep_images=False) for t in targets}
    metrics: dict[str, float] = {}
    histograms = {}
    detectors = {}
    for name in tqdm(STATIC_DETECTORS, desc="detectors", disable=not progress):
        detector = detectors[name] = build_static_detector(name, classifier, cfg.detector, cfg.seed).fit(known_fit, labels)
        for protocol in PROTOCOLS:
            idd = score_by_protocol(detector, known_test, protocol, cfg.stream.batch_size)
            for target, obs in target_obs.items():
                ood = score_by_protocol(detector, obs, protocol, cfg.stream.batch_size)
                metrics.update(_named(ood_metrics(idd, ood), protocol, name, tag, target))
                if protocol == "per_sample" and target == targets[0].name:
                    histograms[name] = (idd, ood)
    if split.novel_class is not None:
        metrics.update(_static_router(cfg, detectors["grad_mahalanobis"], classifier, split, device, tag))
    for mode in ssl_modes:
        ssl_cfg = evolve_config(cfg, detector=evolve_config(cfg.detector, ssl_mode=mode))
        known_obs = embed_as_kept(ssl_cfg.detector, classifier, known_test_set(split), device)
        for target in targets:
            detector = adapt_self_supervised(ssl_cfg, classifier, split, known_fit, labels, target, device, progress)
            target_test = embed_as_kept(ssl_cfg.detector, classifier, target.test, device)
            name = f"{detector.name}_{mode}"
            for protocol in PROTOCOLS:
                idd = score_by_protocol(detector, known_obs, protocol, cfg.stream.batch_size)
                ood = score_by_protocol(detector, target_test, protocol, cfg.stream.batch_size)
                metrics.update(_named(ood_metrics(idd, ood), protocol, name, tag, target.name))
                if protocol == "per_sample" and target is targets[0]:
                    histograms[name] = (idd, ood)
            if target.name == split.novel_class:
                test = embed_as_kept(ssl_cfg.detector, classifier, split.test, device)
                metrics.update(router_metrics(detector, detector.threshold, split, test, cfg.stream.batch_size,
                                              cfg.memory.budget, tag, name))
    if histograms:
        plot_score_histograms(histograms, out_dir / "scores.png")
    return metrics


def adapt_self_supervised(cfg: RunConfig, classifier: FrozenClassifier, split: NovelClassSplit,
                          known_fit: Observations, labels: torch.Tensor, target: OODTarget,
                          device: torch.device, progress: bool = True) -> SelfSupervisedDetector:
    """Fit on known data, fill the rehearsal memory, then adapt to an unlabeled stream containing `target`.

    The stream holds `stream.novel_samples` images of the target (at most what its pool has) and
    held-back known images that were never offered to the memory; its labels never reach the detector.
    """
    detector = SelfSupervisedDetector(classifier, cfg.detector, cfg.seed, progress=False).fit(known_fit, labels)
    memory, stream = adaptation_data(cfg, split, target.stream_pool, classifier, device)
    detector.set_memory(embed_as_kept(cfg.detector, classifier, memory, device),
                        torch.from_numpy(memory.labels))
    for batch in tqdm(stream, desc=f"adapt {cfg.detector.ssl_mode} vs {target.name}", unit="batch", disable=not progress):
        detector.observe(embed_as_kept(cfg.detector, classifier, batch, device))
    return detector


def embed_as_kept(config: DetectorConfig, classifier: FrozenClassifier, data: ImageSet,
                  device: torch.device) -> Observations:
    """Embed with what the self-supervised detector of `config` keeps: pixels for a pixel head, layer
    statistics for a head reading them."""
    return embed(classifier, data, device, keep_images=keeps_images(config),
                 stat_layers=trained_head_config(config).layer_stats)


def adaptation_data(cfg: RunConfig, split: NovelClassSplit, novel_pool: ImageSet, classifier: FrozenClassifier,
                    device: torch.device) -> tuple[ImageSet, list[ImageSet]]:
    """(rehearsal memory, unlabeled stream batches) of the 9+1 protocol (DESIGN.md, 'Benchmark protocol').

    The stream holds `stream.novel_samples` images of `novel_pool` (at most what it has) and
    `stream.known_samples` (default: the memory budget) held-back known images that were never
    offered to the memory; its labels ride along for evaluation only.
    """
    n_known = cfg.stream.known_samples if cfg.stream.known_samples is not None else cfg.memory.budget
    memory, known_pool = fill_memory(split.calibration, cfg.memory.budget, cfg.memory.policy, n_known, cfg.seed,
                                     classifier, device)
    n_novel = min(cfg.stream.novel_samples, len(novel_pool))
    return memory, build_stream(known_pool, novel_pool, n_known, n_novel, cfg.stream.batch_size, cfg.seed)


def whole_stream(cfg: RunConfig, split: NovelClassSplit, novel_pool: ImageSet, classifier: FrozenClassifier,
                 device: torch.device) -> tuple[ImageSet, ImageSet]:
    """(rehearsal memory, the stream as one image set) exactly as `adaptation_data` builds them, for studies
    that adapt on the whole stream at once: every memory_pu fit starts afresh from memory and pool, so
    while the stream fits in `detector.pool_size` the final state is the one batch-wise observing reaches."""
    memory, batches = adaptation_data(cfg, split, novel_pool, classifier, device)
    stream = ImageSet(np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches]),
                      batches[0].classes, f"{novel_pool.name}-stream")
    return memory, stream


def adapt_session(session: Session, stream: list[ImageSet], progress: bool = True,
                  on_round: Callable[[RoundReport], None] | None = None) -> float:
    """Feed the stream's images to the session batch by batch, then a last round over what is pending.

    The stream's labels never reach the session. Returns the seconds spent inside the session;
    `on_round` gets each round's report, and the time reports take is not counted.
    """
    seconds = 0.0
    bar = tqdm(total=len(stream) + 1, desc="adapt", unit="batch", disable=not progress)
    for batch in [*stream, None]:
        started = time.perf_counter()
        adapted = session.observe(batch.images) if batch is not None else session.adapt()
        seconds += time.perf_counter() - started
        if adapted and on_round is not None:
            on_round(session.round_report())
        bar.update()
    bar.close()
    return seconds


def session_accuracy(session: Session, test: Observations, labels: np.ndarray, batch_size: int) -> dict[str, Routing]:
    """How a session's learner routes embedded test images, per protocol (see router_accuracy)."""
    def route(batch: Observations, protocol: str) -> np.ndarray:
        return session.learner.route(batch, protocol).labels.numpy()

    return router_accuracy(route, test, labels, len(session.learner.known_classes), batch_size)


def session_metrics(session: Session, routing: dict[str, Routing], seconds: float, state_bytes: int,
                    tag: str, novel: str) -> dict[str, float]:
    """The 9+1 result names of DESIGN.md for one adapted session: routing per protocol, cost, footprint."""
    budget = f"budget{session.config.memory.budget}"
    footprint = session.memory_footprint()
    metrics = {key: value for protocol in PROTOCOLS
               for key, value in routing[protocol].metrics(protocol, budget, tag, novel).items()}
    return metrics | {metric_key("adapt_seconds", budget, tag, novel): seconds,
                      metric_key("state_bytes", budget, tag, novel): state_bytes,
                      metric_key("memory_bytes", "host", budget, tag, novel): footprint.host_bytes,
                      metric_key("memory_bytes", "device", budget, tag, novel): footprint.device_bytes}


def _static_router(cfg: RunConfig, detector: Detector, classifier: FrozenClassifier, split: NovelClassSplit,
                   device: torch.device, tag: str) -> dict[str, float]:
    """9+1 with the fitted gradient Mahalanobis detector and a threshold from held-back known data.

    The detector was fitted on the training images, so its threshold comes from the calibration
    slice held back from training (known IDD it has not seen), at the configured false-alarm rate.
    """
    if len(split.calibration) == 0:
        raise ConfigError("data.calibration_holdout is 0: the 9+1 router needs held-back known images for its threshold")
    calibration = embed(classifier, split.calibration, device, keep_images=False)
    threshold = threshold_at_fpr(detector.score(calibration), cfg.detector.target_fpr)
    test = embed(classifier, split.test, device, keep_images=False)
    return router_metrics(detector, threshold, split, test, cfg.stream.batch_size, len(split.calibration), tag,
                          detector.name)


@dataclass(frozen=True)
class Routing:
    """How a 9+1 router labelled the test split under one protocol, and where its accuracy went.

    Single-head accuracy alone hides whether a miss is a known image sent to the new class or a
    novel image kept with the known ones; the two rates say which the detector owes.
    """

    accuracy: float  # single_head_acc: images given their own label
    novel_recall: float  # novel images given their own (new) class
    false_alarm: float  # known images sent to a new class

    def metrics(self, protocol: str, *names: str) -> dict[str, float]:
        """This routing under the result names of DESIGN.md (`single_head_acc/<protocol>/...`)."""
        return {metric_key("single_head_acc", protocol, *names): self.accuracy,
                metric_key("novel_recall", protocol, *names): self.novel_recall,
                metric_key("false_alarm", protocol, *names): self.false_alarm}


def router_accuracy(route: Callable[[Observations, str], np.ndarray], test: Observations, labels: np.ndarray,
                    novel_index: int, batch_size: int) -> dict[str, Routing]:
    """{protocol: Routing} (per_sample first) of `route(batch, protocol) -> labels` on the test split.

    Test batches are cut within the known part and within each novel class, as the paper's
    `homogeneous_batches` protocol does; under `per_sample` every image is decided alone anyway.
    """
    known = labels < novel_index
    groups = [known, *(labels == c for c in np.unique(labels[~known]))]
    routing = {}
    for protocol in PROTOCOLS:
        predicted = np.empty(len(test), dtype=np.int64)
        for group in groups:
            index = np.flatnonzero(group)
            for start in range(0, len(index), batch_size):
                chunk = index[start:start + batch_size]
                predicted[chunk] = route(test.select(torch.from_numpy(chunk)), protocol)
        right = predicted == labels
        routing[protocol] = Routing(accuracy=float(right.mean()),
                                    novel_recall=float(right[~known].mean()) if (~known).any() else float("nan"),
                                    false_alarm=float((predicted[known] >= novel_index).mean()))
    return routing


def router_metrics(detector: Detector, threshold: float, split: NovelClassSplit, test: Observations,
                   batch_size: int, budget: int, tag: str, name: str) -> dict[str, float]:
    """The 9+1 router's Routing metrics under both protocols: novel (index K) when score > threshold, else argmax."""
    novel_index = len(split.known_classes)

    def route(batch: Observations, protocol: str) -> np.ndarray:
        novel = detector.score_protocol(batch, protocol).cpu().numpy() > threshold
        return np.where(novel, novel_index, batch.logits.argmax(dim=1).numpy())

    routing = router_accuracy(route, test, split.test.labels, novel_index, batch_size)
    return {key: value for protocol, outcome in routing.items()
            for key, value in outcome.metrics(protocol, f"budget{budget}", tag, split.novel_class, name).items()}


def _named(values: dict[str, float], protocol: str, detector: str, tag: str, target: str) -> dict[str, float]:
    target = target.replace("_", "-")
    return {f"{metric}/{protocol}/{detector}/{tag}_vs_{target}": v for metric, v in values.items()}


def auroc_tables(metrics: dict[str, float], tag: str, targets: list[str]) -> str:
    """One table per protocol (per_sample first): rows detectors, columns OOD targets, AUROC."""
    blocks = []
    for protocol in PROTOCOLS:
        prefix = f"auroc/{protocol}/"
        detectors = sorted({k[len(prefix):].split("/")[0] for k in metrics if k.startswith(prefix)})
        rows = [[d, *(metrics.get(f"{prefix}{d}/{tag}_vs_{t.replace('_', '-')}", float("nan")) for t in targets)]
                for d in detectors]
        blocks.append(f"AUROC, protocol {protocol} ({tag} vs ...)\n" + format_table(rows, ["detector", *targets]))
    return "\n\n".join(blocks)


def router_table(metrics: dict[str, float]) -> str:
    """9+1 single-head accuracy per protocol (per_sample first) and router; '' when none was measured."""
    keys = sorted((k for k in metrics if k.startswith("single_head_acc/")),
                  key=lambda k: (PROTOCOLS.index(k.split("/")[1]), k))
    if not keys:
        return ""
    rows = [[*k.split("/")[1:], metrics[k]] for k in keys]
    return ("9+1 single-head accuracy on the whole test split\n"
            + format_table(rows, ["protocol", "known data", "classes", "novel", "router", "accuracy"]))
