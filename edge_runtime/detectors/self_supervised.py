"""Gradient Mahalanobis with a self-supervised IDD/OOD binary classifier, in four modes.

`paper` is the seed paper's Algorithm 1 as written: every stream batch joins a pool, the binary
head decides who is believed OOD, those get the label y_opt and the rest their predicted label,
the pool is re-scored with gradient Mahalanobis, and a fresh head is trained on the lowest- and
highest-scored fractions. It never uses labelled data after `fit`, so its pseudo-labels can and
do flip polarity (DESIGN.md, reference measurements).

`memory_pu` uses what the deployment actually has: the rehearsal memory is known IDD. It is a
positive-unlabeled problem (memory = positives, stream = a mix), solved by cross-fitted heads:
 1. round 0 trains memory (0) vs the whole stream (1); stream samples that look like the memory
    stay ambiguous, novel ones are pushed up;
 2. from the out-of-fold scores, the share of known samples in the stream is estimated as
    min over memory quantiles t of F_stream(t) / F_memory(t) (novel samples do not reach the
    memory's lower quantiles), and the top (1 - share) of the stream become the OOD candidates
    of the next round (memory vs candidates);
 3. each round's out-of-fold AUROC of memory vs stream is an affine, increasing function of its
    known-vs-novel AUROC (the stream is a fixed mixture), so the round maximising it is kept:
    model selection without a single label of the stream.
 4. `pu_extra_rounds` adds the one round of a peer method below (SAL's, WOODS's), judged by the same
    criterion: a label-free choice between ways of finding the stream's novel samples.
`sal` is SAL (Du et al., ICLR 2024) on the same memory and heads: its gradient filter
(sal_filter.SALFilter) picks the stream's OOD candidates in one step, and one cross-fitted round of
memory_pu's heads learns memory vs those candidates (SAL's binary classifier); `pu_rounds` and
`pu_ranking` play no part. It is the published wild-data method beside memory_pu's label-free rounds.
`woods` is WOODS (Katz-Samuels et al., ICML 2022) with the classifier frozen: one cross-fitted round
of the same heads, memory vs the whole stream, each trained to flag as much of the stream as it can
while its soft false-alarm rate on the memory stays at `target_fpr` (feature_head.FalseAlarmConstraint,
an augmented Lagrangian): the constrained, Neyman-Pearson form of memory_pu's round 0.
The decision threshold is read from the kept round's out-of-fold scores: by default the `target_fpr`
conformal quantile of the memory's; with `threshold_rule: accuracy` the one that maximises the
expected single-head accuracy of the 9+1 router (calibration.threshold.threshold_for_accuracy).
Cross-fitting is nested, so that every score is truly out of fold: fold f's head trains on
candidates that a chain of inner heads, none of which saw fold f, chose and counted (step 2 run on
the other folds). Ranked instead by the previous round's heads, which all but one saw fold f, a
fold's memory samples came out more known-looking than unseen known data, and the threshold let
through more false alarms than `target_fpr` (CIFAR-10, width 16, at 0.05: 0.049-0.090 of the known
test images before nesting, 0.018-0.045 nested; benchmarks/results/cifar10_cpu_pu_ceiling_*).
Nesting trains more, smaller heads: 30 instead of 12 at the default 4 folds and 3 rounds. The heads
of one stage (a round's inner chains, then its fold heads) train together as one stacked model
(feature_head.train_feature_heads), so a stage costs little more than its largest head.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch
from tqdm.auto import tqdm

from calibration.threshold import threshold_at_fpr, threshold_for_accuracy
from edge_runtime.config import BinaryHeadConfig, DetectorConfig
from edge_runtime.detectors.base import PROTOCOLS, Detector, Observations
from edge_runtime.detectors.binary_head import BinaryHead, HeadTask, fit_binary_heads
from edge_runtime.detectors.feature_head import FalseAlarmConstraint
from edge_runtime.detectors.grad_mahalanobis import GradientMahalanobis
from edge_runtime.detectors.sal_filter import SALFilter
from edge_runtime.errors import InputError, StateError
from edge_runtime.metrics import ood_metrics
from edge_runtime.models.base import FrozenClassifier


@dataclass(frozen=True)
class CrossFitRound:
    """One memory_pu round: a head per fold, and the scores each gave the fold it did not train on."""

    heads: list[BinaryHead]
    memory_scores: torch.Tensor
    pool_scores: torch.Tensor
    source: str  # the candidates its heads learned as novel: "round k" (memory_pu), "sal", "confirmed"

    @property
    def separation(self) -> float:
        """Out-of-fold AUROC of memory vs pool: the label-free criterion rounds are chosen by."""
        return ood_metrics(self.memory_scores.numpy(), self.pool_scores.numpy())["auroc"]


# Memory quantiles at which the known share of the stream is read off (see step 2 above).
KNOWN_SHARE_QUANTILES = (0.25, 0.5, 0.75)
PAPER_DECISION_PROBABILITY = 0.5  # paper mode: the head's P(OOD) decides, as in Algorithm 1
CROSS_FITTED_MODES = ("memory_pu", "sal", "woods")  # modes whose heads are memory_pu's cross-fitted feature heads


class SelfSupervisedDetector(Detector):
    """Novelty detector that keeps learning from the unlabeled stream (`observe`).

    Scores, higher = more novel:
    - `paper`: the binary head's P(OOD). The gradient score itself needs a label per input, and
      choosing it (predicted vs y_opt) is the head's decision, so the head's probability is the
      per-input quantity the loop produces. `homogeneous_batches` runs its BatchNorm on the
      batch's statistics, `per_sample` on the stored ones.
    - `memory_pu` and `sal`: the mean logit of the cross-fitted heads; per-sample under both protocols.
    """

    name = "grad_mahalanobis_ssl"

    def __init__(self, classifier: FrozenClassifier, config: DetectorConfig = DetectorConfig(),
                 seed: int = 0, progress: bool = False) -> None:
        super().__init__(classifier)
        self.config = config
        self.mode = config.ssl_mode
        self.seed = seed
        self.progress = progress
        self.gradient = GradientMahalanobis(classifier, config, seed, progress)
        self.keep_images = keeps_images(config)
        self.stat_layers = trained_head_config(config).layer_stats  # what Observations must carry
        self.pool: Observations | None = None
        self.memory: Observations | None = None
        self.memory_correct: torch.Tensor | None = None  # bool [M]: routed right when not flagged novel
        self.paper_head: BinaryHead | None = None
        self.pu_heads: list[BinaryHead] = []
        self.threshold: float | None = None
        self.novel_share: float | None = None  # memory_pu: estimated fraction of novel inputs in the pool
        self.kept_candidates: str | None = None  # cross-fitted modes: CrossFitRound.source of the kept heads
        methods = config.ssl_methods()
        self.sal = SALFilter(classifier.num_classes) if "sal" in methods else None
        self.woods_constraint = (FalseAlarmConstraint(config.target_fpr, config.woods_penalty)
                                 if "woods" in methods else None)

    def fit(self, known: Observations, labels: torch.Tensor) -> "SelfSupervisedDetector":
        """Fit the gradient Mahalanobis statistics on known data with true labels."""
        self.gradient.fit(known, labels)
        return self

    def set_memory(self, memory: Observations, labels: torch.Tensor) -> None:
        """The rehearsal memory (known IDD) that `memory_pu` learns against and calibrates on."""
        if labels.shape != (len(memory),):
            raise InputError(f"memory labels must be [{len(memory)}], got {tuple(labels.shape)}")
        needed = max(self.config.pu_folds, math.ceil(1 / self.config.target_fpr))
        if len(memory) < needed:
            raise InputError(f"memory holds {len(memory)} samples; memory_pu needs at least {needed} "
                             f"(detector.pu_folds and detector.target_fpr)")
        self.memory = self._stored(memory)
        if self.sal is not None:
            self.sal.fit(memory, labels)
        # Memory samples of classes learned earlier (labels >= C) are the older heads' to route.
        self.memory_correct = (labels.cpu() >= self.classifier.num_classes) | (
            memory.logits.argmax(dim=1).cpu() == labels.cpu())

    def observe(self, batch: Observations) -> None:
        """Add an unlabeled batch to the pool (the most recent `pool_size` are kept) and re-learn."""
        if self.mode in CROSS_FITTED_MODES:
            self._require_memory()
        batch = self._stored(batch)
        pool = batch if self.pool is None else Observations.concat([self.pool, batch])
        if len(pool) > self.config.pool_size:
            pool = pool.select(torch.arange(len(pool) - self.config.pool_size, len(pool)))
        self.pool = pool
        if self.mode == "paper":
            self._paper_round(pool)
        elif self.mode == "sal":
            self._sal_fit(pool)
        elif len(pool) < self.config.pu_folds:
            return  # a fold without stream samples has nothing to learn against
        elif self.mode == "woods":
            self._woods_fit(pool)
        else:
            self._memory_pu_fit(pool)

    def score(self, batch: Observations) -> torch.Tensor:
        return self.score_protocol(batch, "per_sample")

    def score_protocol(self, batch: Observations, protocol: str) -> torch.Tensor:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if self.mode == "paper":
            return self._trained_paper_head().predict(batch, use_batch_stats=protocol == "homogeneous_batches")
        heads = self._trained_pu_heads()
        return torch.stack([head.logit(batch) for head in heads]).mean(dim=0)

    def is_novel(self, batch: Observations) -> torch.Tensor:
        """bool [B]: score above `threshold` (memory_pu: memory-calibrated; paper: P(OOD) = 0.5)."""
        scores = self.score(batch)
        return scores > self.threshold

    # -- paper: Algorithm 1 -------------------------------------------------------------------

    def _paper_round(self, pool: Observations) -> None:
        """Re-label, re-score and retrain the head from scratch on the pool's extreme fractions."""
        labels = pool.logits.argmax(dim=1)
        if self.paper_head is not None:
            believed_ood = self.paper_head.predict(pool) > PAPER_DECISION_PROBABILITY
            if believed_ood.any():
                y_opt = self.gradient.select_novel_label(pool.select(believed_ood))
                labels = torch.where(believed_ood, torch.full_like(labels, y_opt), labels)
        scores = self.gradient.score_with_labels(pool, labels)
        count = int(len(pool) * self.config.binary.pseudo_label_fraction)
        if count == 0:
            return  # too few samples for one pseudo-label per side; wait for more
        order = scores.argsort()
        chosen = torch.cat([order[:count], order[-count:]])
        targets = torch.cat([torch.zeros(count), torch.ones(count)])
        self.paper_head = BinaryHead(self.config.binary.arch, self.config.binary, self.seed, self.progress).fit(
            pool.select(chosen), targets)
        self.threshold = PAPER_DECISION_PROBABILITY

    # -- memory_pu ----------------------------------------------------------------------------

    def _memory_pu_fit(self, pool: Observations) -> None:
        """Run the rounds (and the `pu_extra_rounds` peers'); keep the one whose heads separate memory from
        pool best, out of fold (the first of equals)."""
        kept = max(self._rounds(pool), key=attrgetter("separation"))
        for peer in self.config.pu_extra_rounds:
            if (challenger := self._peer_round(peer, pool)) is not None:
                kept = max(kept, challenger, key=attrgetter("separation"))
        self._keep(kept, 1.0 - estimate_known_share(kept.memory_scores, kept.pool_scores))

    def _peer_round(self, peer: str, pool: Observations) -> CrossFitRound | None:
        """SAL's or WOODS's round on this pool; None where SAL's filter keeps too few candidates."""
        if peer == "woods":
            return self._woods_round(pool)
        candidates = self._sal_candidates(pool)
        return None if candidates is None else self._candidate_round(pool, candidates, "sal")

    def _rounds(self, pool: Observations) -> Iterator[CrossFitRound]:
        """memory_pu's rounds in order; ends early when a chain keeps too few candidates to train on."""
        folds, rounds = self.config.pu_folds, self.config.pu_rounds
        memory_folds, pool_folds = self._fold_layout(len(pool), folds)
        gradient_scores = None
        if self.config.pu_ranking == "head_and_gradient":
            gradient_scores = self.gradient.score(pool).cpu()
        chains = [torch.arange(len(pool))] * folds  # each outer fold's OOD candidates, chosen without it
        with tqdm(total=rounds * folds + (rounds - 1) * folds * (folds - 1), desc="memory_pu heads",
                  disable=not self.progress, leave=False) as bar:
            for round_index in range(rounds):
                yield self._cross_fit(pool, memory_folds, pool_folds, chains, round_index, bar, f"round {round_index}")
                if round_index + 1 < rounds:
                    chains = self._next_chains(pool, memory_folds, pool_folds, chains, round_index,
                                               gradient_scores, bar)
                if chains is None:
                    return

    def _next_chains(self, pool: Observations, memory_folds: torch.Tensor, pool_folds: torch.Tensor,
                     chains: list[torch.Tensor], round_index: int, gradient_scores: torch.Tensor | None,
                     bar: tqdm) -> list[torch.Tensor] | None:
        """Each outer fold's candidates for the next round, from an inner cross-fit that never sees that fold.

        Outer fold f's chain: one inner head per other fold g, trained without f and g on the chain's
        candidates, scores fold g; from these out-of-fold scores the chain estimates the known share and
        ranks its samples. Heads with the same training data are shared between chains (all of round 0).
        None when some chain keeps fewer than 2 x folds candidates.
        """
        folds = len(chains)
        chain_keys = [candidates.numpy().tobytes() for candidates in chains]
        wanted: dict[tuple[frozenset[int], bytes], torch.Tensor] = {}  # chains that agree share their heads
        for outer, candidates in enumerate(chains):
            for inner in range(folds):
                if inner != outer:
                    wanted.setdefault((frozenset((outer, inner)), chain_keys[outer]), candidates)
        tasks = [self._fold_task(pool, memory_folds, pool_folds, candidates, excluded,
                                 self.seed + 1000 * round_index + 100 + folds * min(excluded) + max(excluded))
                 for (excluded, _), candidates in wanted.items()]
        trained = dict(zip(wanted, self._fit_heads(tasks)))
        bar.update(folds * (folds - 1))
        next_chains = []
        for outer, candidates in enumerate(chains):
            visible_memory = torch.nonzero(memory_folds != outer).flatten()
            visible_pool = torch.nonzero(pool_folds != outer).flatten()
            inner_heads = {inner: trained[(frozenset((outer, inner)), chain_keys[outer])]
                           for inner in range(folds) if inner != outer}
            memory_scores, pool_scores = self._held_out_scores(inner_heads, pool, memory_folds, pool_folds)
            known_share = estimate_known_share(memory_scores[visible_memory], pool_scores[visible_pool])
            ranking = pool_scores[visible_pool]
            if gradient_scores is not None:
                ranking = _rank(ranking) + _rank(gradient_scores[visible_pool])
            novel_count = round((1.0 - known_share) * len(visible_pool))
            if novel_count < 2 * folds:
                return None
            next_chains.append(visible_pool[ranking.argsort(descending=True)[:novel_count]])
        return next_chains

    def fit_confirmed(self, pool: Observations, novel: torch.Tensor) -> None:
        """memory_pu's heads trained on the memory vs the pool samples that `novel` (bool [N]) marks.

        What the rounds would reach if the stream's novel samples were known: labels an operator
        confirmed, or a benchmark's ceiling for the label-free rounds (benchmarks/pu_ceiling.py). The
        pool is replaced; the threshold comes from the memory's out-of-fold scores, as in `observe`.
        """
        if self.mode not in CROSS_FITTED_MODES:
            raise StateError(f"fit_confirmed trains cross-fitted heads; this detector runs mode {self.mode!r}")
        self._require_memory()
        folds = self.config.pu_folds
        if novel.shape != (len(pool),) or novel.dtype != torch.bool:
            raise InputError(f"novel must be a bool mask of shape [{len(pool)}], "
                             f"got {novel.dtype} {tuple(novel.shape)}")
        if int(novel.sum()) < 2 * folds:
            raise InputError(f"{int(novel.sum())} confirmed novel samples; the {folds} cross-fitted heads need at "
                             f"least {2 * folds}")
        self.pool = self._stored(pool)
        self._keep(self._candidate_round(self.pool, novel, "confirmed"), float(novel.float().mean()))

    # -- sal ----------------------------------------------------------------------------------

    def _sal_fit(self, pool: Observations) -> None:
        """SAL's filter picks the candidates, one cross-fitted round learns memory vs them. Until
        the filter keeps 2 x folds candidates there is nothing to train on, and earlier heads stay."""
        if (candidates := self._sal_candidates(pool)) is not None:
            self._keep(self._candidate_round(pool, candidates, "sal"), float(candidates.float().mean()))

    def _sal_candidates(self, pool: Observations) -> torch.Tensor | None:
        """bool [N]: the pool samples SAL's filter scores above the memory's 1 - target_fpr quantile;
        None while they are fewer than 2 x folds."""
        candidates = self.sal.candidates(self.memory, pool, 1.0 - self.config.target_fpr)
        return candidates if int(candidates.sum()) >= 2 * self.config.pu_folds else None

    # -- woods --------------------------------------------------------------------------------

    def _woods_fit(self, pool: Observations) -> None:
        kept = self._woods_round(pool)
        self._keep(kept, 1.0 - estimate_known_share(kept.memory_scores, kept.pool_scores))

    def _woods_round(self, pool: Observations) -> CrossFitRound:
        """One cross-fitted round of constrained heads, memory vs the whole stream."""
        return self._candidate_round(pool, torch.ones(len(pool), dtype=torch.bool), "woods", self.woods_constraint)

    # -- cross-fitting ------------------------------------------------------------------------

    def _candidate_round(self, pool: Observations, candidates: torch.Tensor, source: str,
                         constraint: FalseAlarmConstraint | None = None) -> CrossFitRound:
        """One cross-fitted round on memory vs the pool samples `candidates` (bool [N]) marks, its heads
        trained on class-weighted BCE or under `constraint`."""
        folds = self.config.pu_folds
        memory_folds, pool_folds = self._fold_layout(len(pool), folds)
        with tqdm(total=folds, desc=f"{source} heads", disable=not self.progress, leave=False) as bar:
            chains = [torch.nonzero(candidates).flatten()] * folds
            return self._cross_fit(pool, memory_folds, pool_folds, chains, 0, bar, source, constraint)

    def _keep(self, kept: CrossFitRound, novel_share: float) -> None:
        """Deploy a round's heads, with `novel_share` (the pool's estimated novel fraction) and its threshold."""
        self.pu_heads = kept.heads
        self.kept_candidates = kept.source
        self.novel_share = novel_share
        self.threshold = self._decision_threshold(kept)

    def _decision_threshold(self, kept: CrossFitRound) -> float:
        """The threshold of `detector.threshold_rule`, from the kept round's out-of-fold scores; the
        false-alarm rule also where the pool looks all known or all novel (no mixture to read from)."""
        if self.config.threshold_rule == "fpr" or not 0.0 < self.novel_share < 1.0:
            return threshold_at_fpr(kept.memory_scores, self.config.target_fpr)
        prior = self.config.novel_prior or 1.0 / (self.classifier.num_classes + 1)
        return threshold_for_accuracy(kept.memory_scores, self.memory_correct, kept.pool_scores,
                                      self.novel_share, prior)

    def out_of_fold_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory, pool) scores of the kept round, each sample scored by the fold head that did not
        train on it: what the threshold and the round selection were read from."""
        heads = self._trained_pu_heads()
        return self._held_out_scores(dict(enumerate(heads)), self.pool, *self._fold_layout(len(self.pool), len(heads)))

    def _fold_layout(self, pool_size: int, folds: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold index of every memory and pool sample, seeded: the same layout for fitting and re-scoring."""
        generator = torch.Generator().manual_seed(self.seed)
        return (torch.randperm(len(self.memory), generator=generator) % folds,
                torch.randperm(pool_size, generator=generator) % folds)

    def _cross_fit(self, pool: Observations, memory_folds: torch.Tensor, pool_folds: torch.Tensor,
                   chains: list[torch.Tensor], round_index: int, bar: tqdm, source: str,
                   constraint: FalseAlarmConstraint | None = None) -> CrossFitRound:
        """One head per fold, trained on the other folds against that fold's chain of candidates."""
        heads = self._fit_heads([self._fold_task(pool, memory_folds, pool_folds, candidates, frozenset((fold,)),
                                                 self.seed + 1000 * round_index + fold)
                                 for fold, candidates in enumerate(chains)], constraint)
        bar.update(len(chains))
        return CrossFitRound(heads, *self._held_out_scores(dict(enumerate(heads)), pool, memory_folds, pool_folds),
                             source)

    def _held_out_scores(self, heads: dict[int, BinaryHead], pool: Observations, memory_folds: torch.Tensor,
                         pool_folds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory, pool) scores, each fold that `heads` maps scored by its head; other folds stay 0."""
        memory_scores, pool_scores = torch.zeros(len(self.memory)), torch.zeros(len(pool))
        for fold, head in heads.items():
            held_memory = torch.nonzero(memory_folds == fold).flatten()
            held_pool = torch.nonzero(pool_folds == fold).flatten()
            memory_scores[held_memory] = head.logit(self.memory.select(held_memory)).cpu()
            pool_scores[held_pool] = head.logit(pool.select(held_pool)).cpu()
        return memory_scores, pool_scores

    def _fold_task(self, pool: Observations, memory_folds: torch.Tensor, pool_folds: torch.Tensor,
                   candidates: torch.Tensor, excluded: frozenset[int], seed: int) -> HeadTask:
        """A head's training set: the memory (0) vs the candidates (1), both outside the `excluded` folds."""
        is_candidate = torch.zeros(len(pool), dtype=torch.bool)
        is_candidate[candidates] = True
        outside = torch.tensor(sorted(excluded))
        known = torch.nonzero(~torch.isin(memory_folds, outside)).flatten()
        novel = torch.nonzero(~torch.isin(pool_folds, outside) & is_candidate).flatten()
        samples = Observations.concat([self.memory.select(known), pool.select(novel)])
        targets = torch.cat([torch.zeros(len(known)), torch.ones(len(novel))])
        return samples, targets, seed

    def _fit_heads(self, tasks: list[HeadTask], constraint: FalseAlarmConstraint | None = None) -> list[BinaryHead]:
        """The memory-vs-stream heads of one stage, trained together (binary_head.fit_binary_heads)."""
        return fit_binary_heads(self.config.pu_head.arch, self.config.pu_head, tasks, self.progress, constraint)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything learned, as tensors and JSON-able values (nested dicts and lists)."""
        return {
            "mode": self.mode,
            "gradient": None if self.gradient.gaussian is None else self.gradient.state_dict(),
            "pool": _observations_state(self.pool),
            "memory": _observations_state(self.memory),
            "memory_correct": self.memory_correct,
            "paper_head": None if self.paper_head is None else self.paper_head.state_dict(),
            "pu_heads": [head.state_dict() for head in self.pu_heads],
            "threshold": self.threshold,
            "novel_share": self.novel_share,
            "kept_candidates": self.kept_candidates,
            "sal": None if self.sal is None else self.sal.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise StateError(f"saved self-supervised detector ran mode {state.get('mode')!r}, this one is {self.mode!r}")
        if state["gradient"] is not None:
            self.gradient.load_state_dict(state["gradient"])
        self.pool = _observations_from_state(state["pool"])
        self.memory = _observations_from_state(state["memory"])
        self.memory_correct = state.get("memory_correct")  # absent in states saved before threshold_rule
        self.paper_head = None
        if state["paper_head"] is not None:
            self.paper_head = BinaryHead(self.config.binary.arch, self.config.binary, self.seed, self.progress)
            self.paper_head.load_state_dict(state["paper_head"])
        self.pu_heads = []
        for head_state in state["pu_heads"]:
            head = BinaryHead(self.config.pu_head.arch, self.config.pu_head, self.seed)
            head.load_state_dict(head_state)
            self.pu_heads.append(head)
        self.threshold = state["threshold"]
        self.novel_share = state["novel_share"]
        self.kept_candidates = state.get("kept_candidates")  # absent in states saved before the peer rounds
        if (self.sal is None) != (state.get("sal") is None):
            raise StateError(f"saved self-supervised detector {'has' if self.sal is None else 'lacks'} SAL's filter "
                             f"and this one's config {'does not use' if self.sal is None else 'uses'} it "
                             f"(detector.pu_extra_rounds)")
        if self.sal is not None:
            self.sal.load_state_dict(state["sal"])

    # -- helpers ------------------------------------------------------------------------------

    def _stored(self, batch: Observations) -> Observations:
        """What the pool keeps of a batch: pixels only when a head or the gradient site needs them."""
        if self.keep_images and batch.images is None:
            raise InputError("this detector's head or gradient site needs batch.images, but the Observations carry none")
        if self.stat_layers and batch.stats is None:
            raise InputError(f"this detector's head reads the statistics of layers {list(self.stat_layers)}, but the "
                             f"Observations carry none")
        images = batch.images.detach() if self.keep_images else None
        stats = batch.stats.detach() if self.stat_layers else None
        return Observations(images, batch.features.detach(), batch.logits.detach(), stats)

    def _trained_paper_head(self) -> BinaryHead:
        if self.paper_head is None:
            raise StateError("paper mode has no binary head yet: observe() stream batches first")
        return self.paper_head

    def _require_memory(self) -> None:
        if self.memory is None:
            raise StateError(f"{self.mode} learns against the rehearsal memory: call set_memory(obs, labels) first")
        if self.config.threshold_rule == "accuracy" and self.memory_correct is None:
            raise StateError("threshold_rule 'accuracy' needs the memory's labels: call set_memory(obs, labels) again")

    def _trained_pu_heads(self) -> list[BinaryHead]:
        if not self.pu_heads:
            raise StateError(f"{self.mode} has no heads yet: set_memory() and observe() stream batches first")
        return self.pu_heads


def trained_head_config(config: DetectorConfig) -> BinaryHeadConfig:
    """The binary head recipe the configured mode trains: `binary` for paper, `pu_head` for memory_pu."""
    return config.binary if config.ssl_mode == "paper" else config.pu_head


def keeps_images(config: DetectorConfig) -> bool:
    """Whether the detector must keep pixels: a pixel head, or a gradient site that reruns the backbone."""
    return trained_head_config(config).arch == "paper_cnn" or config.site == "last_conv"


def estimate_known_share(memory_scores: torch.Tensor, pool_scores: torch.Tensor) -> float:
    """Share of known-IDD inputs in the pool, from out-of-fold scores (higher = more novel).

    Below a memory quantile t the pool holds (known share) x F_memory(t) plus whatever novel mass
    reaches that low; the smallest ratio F_pool(t) / F_memory(t) over a few quantiles is therefore
    an estimate from above that is tight where novel inputs are absent.
    """
    ratios = []
    for quantile in KNOWN_SHARE_QUANTILES:
        level = torch.quantile(memory_scores, quantile)
        ratios.append(float((pool_scores <= level).float().mean() / (memory_scores <= level).float().mean()))
    return min(1.0, min(ratios))


def _rank(values: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to [0, 1), so differently scaled scores can be averaged."""
    return values.argsort().argsort().float() / len(values)


def _observations_state(obs: Observations | None) -> dict[str, torch.Tensor] | None:
    if obs is None:
        return None
    state = {"features": obs.features.cpu(), "logits": obs.logits.cpu()}
    for name, optional in (("images", obs.images), ("stats", obs.stats)):
        if optional is not None:
            state[name] = optional.cpu()
    return state


def _observations_from_state(state: dict[str, torch.Tensor] | None) -> Observations | None:
    if state is None:
        return None
    return Observations(state.get("images"), state["features"], state["logits"], state.get("stats"))
