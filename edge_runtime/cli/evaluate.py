"""`edge-runtime evaluate`: every detector against every OOD target, both protocols."""

from __future__ import annotations

import argparse

from edge_runtime.cli.common import add_run_arguments, config_from_args
from edge_runtime.device import resolve_device
from edge_runtime.evaluation import auroc_tables, evaluate_detectors, ood_targets
from edge_runtime.experiment import dataset_tag, obtain_classifier, output_dir, prepare_data
from edge_runtime.metrics import POSITIVE_CLASS_NOTE
from edge_runtime.results import write_result

HELP = "evaluate novelty detectors (rows) against OOD sets (columns) under both protocols"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--classifier", help="classifier.safetensors from `edge-runtime train` (default: train one now)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = output_dir(args.out)
    device = resolve_device(cfg.device)
    data = prepare_data(cfg, args.progress)
    classifier = obtain_classifier(cfg, data.split, device, out, args.classifier, args.progress)
    targets = ood_targets(data.split, data.ood_sets, cfg.seed)
    tag = dataset_tag(cfg, data.split)
    metrics = evaluate_detectors(cfg, classifier, data.split, targets, device, tag, out, args.progress)
    write_result(out, cfg.model_dump(mode="json"), metrics, device)
    print(auroc_tables(metrics, tag, [t.name for t in targets]))
    print(POSITIVE_CLASS_NOTE)
    return 0
