"""`edge-runtime demo`: the main job on the embedded digits set, end to end, with a summary table."""

from __future__ import annotations

import argparse
import time

from edge_runtime.cli.common import REPO_CONFIGS, add_run_arguments, config_from_args
from edge_runtime.detectors.base import PROTOCOLS
from edge_runtime.device import resolve_device
from edge_runtime.evaluation import auroc_tables, evaluate_detectors, ood_targets
from edge_runtime.experiment import dataset_tag, known_test_set, output_dir, prepare_data, train_frozen_classifier
from edge_runtime.metrics import POSITIVE_CLASS_NOTE
from edge_runtime.reports import plot_training_loss
from edge_runtime.results import format_table, write_result
from edge_runtime.training.trainer import evaluate_accuracy

HELP = "train on 9 of the 10 digits, detect the 10th as novel, route it to a new class; print a summary"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, default_config=str(REPO_CONFIGS / "digits.yaml"))


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    cfg = config_from_args(args)
    out = output_dir(args.out)
    device = resolve_device(cfg.device)
    data = prepare_data(cfg, args.progress)
    split = data.split
    classifier, report = train_frozen_classifier(cfg, split, device, out, progress=args.progress)
    plot_training_loss(report.history, out / "training_loss.png")
    tag = dataset_tag(cfg, split)
    metrics = {f"idd_acc/{tag}": evaluate_accuracy(classifier, known_test_set(split), device, tta=cfg.train.tta)}
    targets = ood_targets(split, data.ood_sets, cfg.seed)
    metrics |= evaluate_detectors(cfg, classifier, split, targets, device, tag, out, args.progress)
    write_result(out, cfg.model_dump(mode="json"), metrics, device)

    print(f"\nknown classes {', '.join(split.known_classes)}; novel class {split.novel_class}; device {device}")
    print(f"frozen classifier test accuracy on the known classes: {metrics[f'idd_acc/{tag}']:.4f}\n")
    print(auroc_tables(metrics, tag, [t.name for t in targets]))
    routers = sorted((k for k in metrics if k.startswith("single_head_acc/")),
                     key=lambda k: (PROTOCOLS.index(k.split("/")[1]), k))
    if routers:
        print("\n9+1 single-head accuracy on the whole test split (10 classes)")
        print(format_table([[*k.split("/")[1:], metrics[k]] for k in routers],
                           ["protocol", "known data", "classes", "novel", "router", "accuracy"]))
    print(f"\n{POSITIVE_CLASS_NOTE}\nresults in {out / 'result.json'} ({time.perf_counter() - started:.0f} s)")
    return 0
