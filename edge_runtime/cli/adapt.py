"""`edge-runtime adapt`: run a session over the configured unlabeled stream, log each round, save it."""

from __future__ import annotations

import argparse
import csv
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from edge_runtime.cli.common import add_classifier_argument, add_run_arguments, config_from_args
from edge_runtime.config import config_to_dict
from edge_runtime.continual.learner import RoundReport
from edge_runtime.detectors.base import PROTOCOLS
from edge_runtime.errors import ConfigError
from edge_runtime.evaluation import adapt_session, adaptation_data, session_accuracy, session_metrics
from edge_runtime.experiment import embed, start_classifier_run
from edge_runtime.results import format_table, metric_key, write_result
from edge_runtime.session import Session

HELP = "adapt a session to the configured unlabeled stream (held-out class + known images); log rounds, save state"
STATE_FILE = "session.state"
ROUNDS_FILE = "rounds.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    add_classifier_argument(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.data.novel_class is None and cfg.data.novel_condition is None:
        raise ConfigError("neither data.novel_class nor data.novel_condition is set: adapt needs a novel input type "
                          "for the stream to bring")
    started = start_classifier_run(cfg, args.out, args.classifier, args.progress)
    split, classifier, device, out = started.split, started.classifier, started.device, started.out
    tag = started.tag
    memory, stream = adaptation_data(cfg, split, split.novel_train, classifier, device)
    session = Session(cfg, classifier, split.known_classes, memory, split.novel_class, device=device)
    rounds: list[RoundReport] = []

    def log(report: RoundReport) -> None:
        rounds.append(report)
        tqdm.write(f"round {report.round:3d}  pool {report.pool_size:6d}  novel share {report.novel_share:.3f}  "
                   f"separation AUROC (out-of-fold) {report.separation_auroc:.4f}  "
                   f"pseudo-label accuracy {report.pseudo_label_acc:.4f}"
                   + (f"  kept {report.candidates}" if report.candidates else ""))

    seconds = adapt_session(session, stream, args.progress, log)
    state_bytes = session.save(out / STATE_FILE)
    write_rounds(rounds, out / ROUNDS_FILE)
    test = embed(classifier, split.test, device, keep_images=session.keep_pixels, stat_layers=session.stat_layers)
    routing = session_accuracy(session, test, split.test.labels, cfg.stream.batch_size)

    metrics = session_metrics(session, routing, seconds, state_bytes, tag, split.novel_class)
    if rounds:
        metrics[metric_key("separation_auroc", f"budget{cfg.memory.budget}", tag, split.novel_class)] = \
            rounds[-1].separation_auroc
    write_result(out, config_to_dict(cfg), metrics, device)
    print(format_table([[p, routing[p].accuracy, routing[p].novel_recall, routing[p].false_alarm] for p in PROTOCOLS],
                       ["protocol", f"single-head accuracy ({len(session.classes)} classes)", "novel recall",
                        "false alarms (known)"]))
    print(f"adapted in {seconds:.1f} s over {session.rounds} rounds; state {state_bytes} bytes in {out / STATE_FILE}")
    return 0


def write_rounds(rounds: list[RoundReport], path: Path) -> None:
    """The per-round log as CSV, one row per adaptation round."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(RoundReport.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(report) for report in rounds)
