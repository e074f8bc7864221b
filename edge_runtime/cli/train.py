"""`edge-runtime train`: train the frozen classifier on the known classes and report its accuracy."""

from __future__ import annotations

import argparse

from edge_runtime.cli.common import add_run_arguments, config_from_args
from edge_runtime.config import config_to_dict
from edge_runtime.device import resolve_device
from edge_runtime.experiment import (CLASSIFIER_FILE, dataset_tag, known_test_set, output_dir, prepare_data,
                                     train_frozen_classifier)
from edge_runtime.results import format_table, write_result
from edge_runtime.training.trainer import evaluate_accuracy

HELP = "train the frozen (IDD) classifier on the known classes; checkpoints atomically and resumes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = output_dir(args.out)
    device = resolve_device(cfg.device)
    split = prepare_data(cfg, args.progress).split
    classifier, report = train_frozen_classifier(cfg, split, device, out, args.resume, args.progress)
    accuracy = evaluate_accuracy(classifier, known_test_set(split), device)
    tag = dataset_tag(cfg, split)
    metrics = {f"idd_acc/{tag}": accuracy, f"train_seconds/{tag}": report.seconds}
    write_result(out, config_to_dict(cfg), metrics, device)
    print(format_table([[tag, accuracy, report.epochs_run, report.seconds]],
                       ["known classes", "test accuracy", "epochs run", "seconds"]))
    print(f"classifier saved to {out / CLASSIFIER_FILE}")
    return 0
