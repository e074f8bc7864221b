"""`edge-runtime bench ACTION`: measurements that reproduce a paper's table or time a component.

Each action is one entry of ACTIONS (help, arguments, run); adding an action is adding an entry.

`bench budget` is the paper's Table 4: for each class held out as the novel one, a frozen
classifier trained on the others, then per memory budget a session adapted to the unlabeled
stream, its 10-way single-head accuracy on the whole test split under both protocols, its
adaptation time, state size and memory footprint.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from edge_runtime.atomic import write_text_atomic
from edge_runtime.cli.common import add_run_arguments, config_from_args
from edge_runtime.config import RunConfig, config_to_dict, with_overrides
from edge_runtime.continual.learner import needs_pixels, stat_layers
from edge_runtime.data.catalog import CATALOG, CIFAR10_CLASSES
from edge_runtime.detectors.base import PROTOCOLS
from edge_runtime.device import resolve_device
from edge_runtime.errors import ConfigError
from edge_runtime.evaluation import adapt_session, adaptation_data, session_accuracy, session_metrics
from edge_runtime.experiment import CLASSIFIER_FILE, embed, output_dir, start_classifier_run
from edge_runtime.results import format_table, metric_key, write_result
from edge_runtime.session import Session

matplotlib.use("Agg")  # headless: devices and CI have no display

# Seed paper, Table 4: 9+1 single-head accuracy (%) on CIFAR-10 per novel class, in CIFAR10_CLASSES order.
PAPER_TABLE4 = {
    500: (90.58, 82.16, 90.91, 91.70, 93.32, 83.28, 96.32, 86.42, 96.48, 84.29),
    1000: (95.56, 95.33, 91.08, 94.54, 92.40, 94.98, 96.06, 93.50, 96.44, 95.39),
}


@dataclass(frozen=True)
class BenchAction:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, action in ACTIONS.items():
        sub = actions.add_parser(name, help=action.help, description=action.help)
        action.add_arguments(sub)
        sub.set_defaults(bench_run=action.run)


def run(args: argparse.Namespace) -> int:
    return args.bench_run(args)


# -- bench budget ---------------------------------------------------------------------------------

def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--budgets", type=parse_budgets, default=(500, 1000), metavar="N,N",
                        help="rehearsal memory budgets, comma-separated (default: 500,1000)")
    parser.add_argument("--novel", default="all", metavar="all|CLASS,CLASS",
                        help="classes to hold out as the novel one, one at a time (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the classes already measured in OUT/result.json (same config and budgets) and "
                             "measure the rest; results are written after every class")
    parser.add_argument("--classifier-dir", metavar="DIR",
                        help="per-class frozen classifiers: DIR/<class>/classifier.safetensors is reused when "
                             "present, trained and saved there otherwise (default: OUT/classifiers)")


def run_budget(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.data.novel_condition is not None:
        raise ConfigError("bench budget holds each class out in turn; data.novel_condition would replace them all: "
                          "unset it (adapt and evaluate take novel conditions)")
    out = output_dir(args.out)
    device = resolve_device(cfg.device)
    classes = novel_classes(cfg, args.novel)
    classifier_root = Path(args.classifier_dir) if args.classifier_dir else out / "classifiers"
    config = {**config_to_dict(cfg), "budgets": list(args.budgets)}
    metrics = earlier_metrics(out / "result.json", config) if args.resume else {}
    todo = [c for c in classes if not measured(metrics, c, args.budgets)]
    if not todo:
        print(f"every class asked for is already in {out / 'result.json'}")
        return 0
    every_class = novel_classes(cfg, "all")
    for name in tqdm(todo, desc="novel classes", unit="class", disable=not args.progress):
        metrics |= measure_novel_class(cfg, name, args.budgets, classifier_root, args.progress)
        # Written after every class, so an interrupted run keeps what it measured (see --resume).
        report = write_budget_report(out, config, metrics, cfg,
                                     [c for c in every_class if measured(metrics, c, args.budgets)], args.budgets, device)
    print(report)
    return 0


def earlier_metrics(path: Path, config: dict[str, Any]) -> dict[str, float]:
    """The metrics of an interrupted run in `path`, refused when it ran another config or other budgets."""
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--resume: {path} cannot be read ({exc})") from None
    if earlier.get("config") != config:
        raise ConfigError(f"--resume: {path} holds results of another config or other budgets; use another --out")
    return earlier["metrics"]


def measured(metrics: dict[str, float], name: str, budgets: tuple[int, ...]) -> bool:
    """Whether every budget of novel class `name` already has its per_sample accuracy in `metrics`."""
    prefixes = [metric_key("single_head_acc", "per_sample", f"budget{b}") + "/" for b in budgets]
    suffix = "/" + metric_key("single_head_acc", name).rsplit("/", 1)[1]  # the name as metric keys spell it
    return all(any(k.startswith(p) and k.endswith(suffix) for k in metrics) for p in prefixes)


def write_budget_report(out: Path, config: dict[str, Any], metrics: dict[str, float], cfg: RunConfig,
                        classes: list[str], budgets: tuple[int, ...], device: torch.device) -> str:
    """result.json, budget.md and budget.png for the classes measured so far; returns the markdown."""
    write_result(out, config, metrics, device)
    tag = next(key for key in metrics if key.startswith("idd_acc/")).split("/")[1]
    report = budget_markdown(metrics, cfg, tag, tuple(classes), budgets)
    write_text_atomic(out / "budget.md", report)
    plot_budget(metrics, cfg, tag, tuple(classes), budgets, out / "budget.png")
    return report


def parse_budgets(text: str) -> tuple[int, ...]:
    try:
        budgets = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be comma-separated integers, got {text!r}") from None
    if not budgets or min(budgets) <= 0:
        raise argparse.ArgumentTypeError(f"budgets must be positive, got {text!r}")
    return budgets


def novel_classes(cfg: RunConfig, choice: str) -> tuple[str, ...]:
    """'all' (every class of the data set, in its order) or the listed classes, checked against it."""
    known = CATALOG[cfg.data.dataset].classes
    if known is None:
        raise ConfigError(f"{cfg.data.dataset} names its classes only once read: list them with --novel")
    if choice == "all":
        return known
    chosen = tuple(part.strip() for part in choice.split(",") if part.strip())
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise ConfigError(f"--novel {choice!r}: {', '.join(unknown) or 'no class'} is not a class of "
                          f"{cfg.data.dataset}; classes: {', '.join(known)}")
    return chosen


def measure_novel_class(cfg: RunConfig, name: str, budgets: tuple[int, ...], classifier_root: Path,
                        progress: bool) -> dict[str, float]:
    """Hold `name` out, get its frozen classifier, then adapt and measure one session per budget."""
    cfg = with_overrides(cfg, {"data.novel_class": name, "ood_sets": []})  # no OOD sets: only the held-out class
    class_dir = classifier_root / re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    saved = class_dir / CLASSIFIER_FILE
    started = start_classifier_run(cfg, class_dir, str(saved) if saved.exists() else None, progress)
    split, classifier, device, tag = started.split, started.classifier, started.device, started.tag
    labels = split.test.labels
    test = embed(classifier, split.test, device, keep_images=needs_pixels(cfg.detector),
                 stat_layers=stat_layers(cfg.detector))
    known = labels < len(split.known_classes)
    # The ceiling of single-head accuracy: the classifier's argmax on the known test images, as the session sees it.
    metrics = {metric_key("idd_acc", tag, name): float((test.logits[known].argmax(dim=1).numpy() == labels[known]).mean())}
    for budget in budgets:
        budget_cfg = with_overrides(cfg, {"memory.budget": budget})
        memory, stream = adaptation_data(budget_cfg, split, split.novel_train, classifier, device)
        session = Session(budget_cfg, classifier, split.known_classes, memory, name, device=device)
        seconds = adapt_session(session, stream, progress)
        with tempfile.TemporaryDirectory() as scratch:
            state_bytes = session.save(Path(scratch) / "session.state")
        routing = session_accuracy(session, test, labels, budget_cfg.stream.batch_size)
        metrics |= session_metrics(session, routing, seconds, state_bytes, tag, name)
    return metrics


def budget_markdown(metrics: dict[str, float], cfg: RunConfig, tag: str, classes: tuple[str, ...],
                    budgets: tuple[int, ...]) -> str:
    """Tables per protocol (rows budgets, columns novel classes, %), the paper's row beside the run's on
    CIFAR-10; the run's rows are named after its novelty head (the ssl mode for grad_mahalanobis_ssl)."""
    ssl = cfg.detector.name == "grad_mahalanobis_ssl"
    detector = cfg.detector.name + (f" ({cfg.detector.ssl_mode})" if ssl else "")
    head = cfg.detector.ssl_mode if ssl else cfg.detector.name
    lines = [f"# 9+1 single-head accuracy (%) per novel class: {cfg.data.dataset}", "",
             f"Frozen {cfg.model.arch} trained on the other classes; novelty head {detector}; memory policy "
             f"{cfg.memory.policy}; stream {cfg.stream.novel_samples} novel + known images not in the memory, "
             f"batches of {cfg.stream.batch_size}; an adaptation round every {cfg.session.adapt_every} stream samples; "
             f"whole test split, {len(CATALOG[cfg.data.dataset].classes)}-way. `per_sample` first.", ""]
    header = ["budget", *classes, "mean"]
    for protocol in PROTOCOLS:
        rows = []
        for budget in budgets:
            measured = [100 * metrics[metric_key("single_head_acc", protocol, f"budget{budget}", tag, c)] for c in classes]
            rows.append([f"{budget} ({head})", *_percent(measured)])
            if cfg.data.dataset == "cifar10" and budget in PAPER_TABLE4:
                paper = [PAPER_TABLE4[budget][CIFAR10_CLASSES.index(c)] for c in classes]
                rows.append([f"{budget} (paper, Table 4)", *_percent(paper)])
        lines += [f"## protocol `{protocol}`", "", format_table(rows, header), ""]
    cost_rows = [[c, str(budget),
                  f"{100 * metrics[metric_key('idd_acc', tag, c)]:.2f}",
                  f"{metrics[metric_key('adapt_seconds', f'budget{budget}', tag, c)]:.1f}",
                  str(int(metrics[metric_key('state_bytes', f'budget{budget}', tag, c)])),
                  str(int(metrics[metric_key('memory_bytes', 'host', f'budget{budget}', tag, c)])),
                  str(int(metrics[metric_key('memory_bytes', 'device', f'budget{budget}', tag, c)]))]
                 for c in classes for budget in budgets]
    routing_rows = [[c, str(budget), *(_rate(metrics, name, protocol, f"budget{budget}", tag, c)
                                       for protocol in PROTOCOLS for name in ("novel_recall", "false_alarm"))]
                    for c in classes for budget in budgets]
    lines += ["## where the misses are", "",
              "Novel recall: novel test images given the new class; false alarms: known test images sent to it (%).",
              "", format_table(routing_rows, ["novel class", "budget",
                                              *(f"{label}, `{protocol}`" for protocol in PROTOCOLS
                                                for label in ("novel recall", "false alarms"))]), ""]
    lines += ["## cost", "", format_table(cost_rows, ["novel class", "budget", "known-class test acc. (%)",
                                                      "adapt seconds", "state bytes", "memory host bytes",
                                                      "memory device bytes"]), ""]
    return "\n".join(lines)


def plot_budget(metrics: dict[str, float], cfg: RunConfig, tag: str, classes: tuple[str, ...],
                budgets: tuple[int, ...], path: Path) -> Path:
    """Grouped bars: per_sample single-head accuracy per novel class and budget (paper's as outlines)."""
    series = [(f"budget {b}", [100 * metrics[metric_key("single_head_acc", "per_sample", f"budget{b}", tag, c)]
                               for c in classes], True) for b in budgets]
    if cfg.data.dataset == "cifar10":
        series += [(f"paper, budget {b}", [PAPER_TABLE4[b][CIFAR10_CLASSES.index(c)] for c in classes], False)
                   for b in budgets if b in PAPER_TABLE4]
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(classes) + 2), 3.6))
    positions = np.arange(len(classes))
    for index, (label, values, filled) in enumerate(series):
        axes.bar(positions + (index - (len(series) - 1) / 2) * width, values, width, label=label,
                 fill=filled, hatch=None if filled else "//", edgecolor=None if filled else "black")
    lowest = min(min(values) for _, values, _ in series)
    axes.set(xticks=positions, ylabel="single-head accuracy (%)", ylim=(max(0.0, lowest - 10), 100),
             title=f"9+1 per novel class, {cfg.data.dataset}, per_sample")
    axes.set_xticklabels(classes, rotation=30, ha="right")
    axes.legend(fontsize=7, ncol=2)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _rate(metrics: dict[str, float], *parts: str) -> str:
    """One routing rate in %, or n/a for a class resumed from a result written before the rates were kept."""
    value = metrics.get(metric_key(*parts))
    return "n/a" if value is None else f"{100 * value:.2f}"


def _percent(values: list[float]) -> list[str]:
    return [f"{v:.2f}" for v in values] + [f"{sum(values) / len(values):.2f}"]


ACTIONS: dict[str, BenchAction] = {
    "budget": BenchAction("9+1 single-head accuracy per novel class and memory budget (the paper's Table 4)",
                          add_budget_arguments, run_budget),
}
HELP = "benchmarks: " + ", ".join(ACTIONS)
