"""`edge-runtime demo`: the main job on the embedded digits set, end to end, with a summary table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from edge_runtime.cli.common import REPO_CONFIGS, add_run_arguments, config_from_args
from edge_runtime.cli.evaluate import evaluate_and_report

HELP = "train on 9 of the 10 digits, detect the 10th as novel, route it to a new class; print a summary"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, default_config=str(REPO_CONFIGS / "digits.yaml"))


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    evaluate_and_report(config_from_args(args), Path(args.out), None, args.progress)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0
