"""`edge-runtime evaluate`: every detector against every OOD target, both protocols, and the 9+1 router."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_runtime.cli.common import add_classifier_argument, add_run_arguments, config_from_args
from edge_runtime.config import RunConfig, config_to_dict
from edge_runtime.errors import ConfigError
from edge_runtime.evaluation import SSL_MODES, auroc_tables, evaluate_detectors, ood_targets, router_table
from edge_runtime.experiment import known_test_set, start_classifier_run
from edge_runtime.metrics import POSITIVE_CLASS_NOTE
from edge_runtime.results import write_result
from edge_runtime.training.trainer import evaluate_accuracy

HELP = "evaluate novelty detectors (rows) against OOD sets (columns) under both protocols, and the 9+1 router"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    add_classifier_argument(parser)
    parser.add_argument("--ssl-modes", default=",".join(SSL_MODES),
                        help=f"self-supervised modes to adapt and report, comma-separated (default: all, "
                             f"{','.join(SSL_MODES)}; the paper's Algorithm 1 retrains a pixel CNN per stream batch, "
                             f"tens of minutes per OOD set on a CPU)")


def run(args: argparse.Namespace) -> int:
    modes = tuple(mode.strip() for mode in args.ssl_modes.split(",") if mode.strip())
    unknown = [mode for mode in modes if mode not in SSL_MODES]
    if unknown or not modes:
        raise ConfigError(f"--ssl-modes takes a comma-separated subset of {', '.join(SSL_MODES)}; got {args.ssl_modes!r}")
    evaluate_and_report(config_from_args(args), Path(args.out), args.classifier, args.progress, modes)
    return 0


def evaluate_and_report(cfg: RunConfig, out: Path, classifier_path: str | None, progress: bool,
                        ssl_modes: tuple[str, ...] = SSL_MODES) -> dict[str, float]:
    """Prepare data, get the classifier, evaluate everything, write result.json and print the tables."""
    run = start_classifier_run(cfg, out, classifier_path, progress)
    split, classifier, device, out, tag = run.split, run.classifier, run.device, run.out, run.tag
    metrics = {f"idd_acc/{tag}": evaluate_accuracy(classifier, known_test_set(split), device)}
    targets = ood_targets(split, run.data.ood_sets, cfg.seed)
    metrics |= evaluate_detectors(cfg, classifier, split, targets, device, tag, out, progress, ssl_modes)
    write_result(out, config_to_dict(cfg), metrics, device)

    print(f"\nknown classes {', '.join(split.known_classes)}; novel class {split.novel_class}; device {device}")
    print(f"frozen classifier test accuracy on the known classes: {metrics[f'idd_acc/{tag}']:.4f}\n")
    print(auroc_tables(metrics, tag, [t.name for t in targets]))
    if routers := router_table(metrics):
        print("\n" + routers)
    print(f"\n{POSITIVE_CLASS_NOTE}\nresults in {out / 'result.json'}")
    return metrics
