"""One-class per-class AUROC of the pixel detectors, the published numbers beside ours.

    python benchmarks/one_class.py --dataset mnist --out benchmarks/results/one_class_mnist
    python benchmarks/one_class.py --dataset mnist --folds 5 --out benchmarks/results/one_class_mnist_5fold
    python benchmarks/one_class.py --dataset cifar10 --device cuda --profile paper --out DIR
    python benchmarks/one_class.py --dataset cifar10 --validation --methods drocc --sweep drocc.radius=2,8,32 --out DIR

For each class a fresh detector is fitted on that class's training images and scores the whole
evaluation split (edge_runtime/one_class.py states the splits; MNIST exists here only as its test
split). Methods:
  vae_gradient              Kwon et al. as published: first-decoder-layer gradients + the 2-layer
                            classifier trained against noise-distorted inliers      (paper)
  vae_reconstruction        reconstruction error vector, same classifier              (baseline)
  vae_latent                per-dimension latent (KL) loss, same classifier           (baseline)
  vae_gradient_mahalanobis  the same gradients, Mahalanobis head instead              (ours)
  vae_gradient_factors_mahalanobis  the same gradients as their factors (bias gradient,
                            latent code), Mahalanobis head                            (ours)
  drocc, drocc_lf           DROCC / DROCC-LF on a LeNet                               (paper / ours)
  rotation                  rotation prediction on a FastNet (Golan & El-Yaniv;
                            Hendrycks et al.): no distances, no negatives     (published, in
                                                                              neither paper's table)
The VAE methods of one class share one trained VAE (only their heads differ), so they compare
features and heads, not VAE luck. `--profile cpu` (default) shrinks epochs and nets to fit a
shared 2-core machine; `--profile paper` uses the papers' sizes (a GPU job); result.json stores
the resolved detector config either way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Iterator


# As a script, Python puts benchmarks/ first on sys.path, where sibling scripts (kernels.py) would
# shadow the project's packages of the same name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from edge_runtime.config import DetectorConfig, config_from_dict, config_to_dict, evolve_config, with_overrides
from edge_runtime.data.catalog import CATALOG
from edge_runtime.detectors.drocc import DROCCDetector
from edge_runtime.detectors.rotation import RotationDetector
from edge_runtime.detectors.vae_gradient import VAEGradientDetector
from edge_runtime.device import resolve_device
from edge_runtime.one_class import (PAPER_MEAN_AUROC, OneClassData, evaluation_auroc, first_per_class,
                                    load_one_class_data, load_one_class_folds, normal_class_images,
                                    observations_of)
from edge_runtime.results import format_table, metric_key, write_result

VAE_METHODS: dict[str, dict[str, str]] = {
    "vae_gradient": {"feature": "gradient", "head": "noise_classifier"},
    "vae_reconstruction": {"feature": "reconstruction", "head": "noise_classifier"},
    "vae_latent": {"feature": "latent", "head": "noise_classifier"},
    "vae_gradient_mahalanobis": {"feature": "gradient", "head": "mahalanobis"},
    "vae_gradient_factors_mahalanobis": {"feature": "gradient_factors", "head": "mahalanobis"},
}
DROCC_METHODS = ("drocc", "drocc_lf")
METHODS = (*VAE_METHODS, *DROCC_METHODS, "rotation")
# Sizes that fit a shared 2-core CPU; 'paper' is the papers' recipes (a GPU job).
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {"detector.drocc.width": 8, "detector.drocc.epochs": 10, "detector.drocc.ce_epochs": 2,
            "detector.drocc.ascent_steps": 5, "detector.drocc.projection_interval": 5,
            "detector.drocc.batch_size": 128},
    # The DROCC authors' published CIFAR-10 command: radius 8, gamma 1 (negatives on the sphere of
    # radius r), Adam lr 1e-3, ascent step 1e-3, batch 256, 40 epochs, no CE-only epochs; the
    # config defaults hold all of it except gamma.
    "paper": {"detector.drocc.gamma": 1.0},
}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    overrides = {**PROFILES[args.profile], **dict(_assignment(item) for item in args.set)}
    settings = _settings(overrides, args.sweep)
    folds = _folds(args)
    first = folds[0]
    classes = args.classes if args.classes is not None else list(range(len(first.train.classes)))
    runs = [f"{method}{suffix}" for suffix in settings for method in args.methods]
    image_shape = _image_shape(first)
    metrics: dict[str, float] = {}
    seconds: dict[str, float] = {run: 0.0 for run in runs}
    for label in tqdm(classes, desc=f"{args.dataset} classes", disable=args.no_progress):
        name = first.train.classes[label]
        per_fold: dict[str, list[float]] = {run: [] for run in runs}
        for suffix, detector_config in settings.items():
            for data in folds:
                for method, auroc, elapsed in _run_class(args.methods, detector_config, image_shape, data, label,
                                                         args.limit_train, device, args.seed, not args.no_progress):
                    per_fold[method + suffix].append(auroc)
                    seconds[method + suffix] += elapsed
                    print(f"{args.dataset} class {name} {method}{suffix}: AUROC {auroc:.4f} ({elapsed:.0f} s)",
                          flush=True)
        for method, values in per_fold.items():
            metrics[metric_key("auroc", "one_class", method, args.dataset, name)] = float(np.mean(values))
    for method in runs:
        values = [metrics[metric_key("auroc", "one_class", method, args.dataset, first.train.classes[c])]
                  for c in classes]
        metrics[metric_key("auroc", "one_class", method, args.dataset, "mean")] = float(np.mean(values))
    print(one_class_table(metrics, args.dataset, [first.train.classes[c] for c in classes], tuple(runs)))
    config = {"dataset": args.dataset, "split": first.split_note, "folds": len(folds),
              "classes": [first.train.classes[c] for c in classes],
              "limit_train_per_class": args.limit_train, "limit_eval_per_class": args.limit_eval,
              "methods": list(args.methods), "profile": args.profile, "validation": args.validation,
              "seed": args.seed, "detector": config_to_dict(next(iter(settings.values()))),
              "fit_and_score_seconds": seconds, "torch_threads": torch.get_num_threads()}
    if args.sweep:
        config["sweep"] = {"key": args.sweep[0], "values": args.sweep[1],
                           "note": "'detector' holds the first value's config; each metric's method name ends "
                                   "with the value it ran with"}
    path = write_result(args.out, config, metrics, device, command="python benchmarks/one_class.py " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    print(f"wrote {path}")
    return 0


def _settings(overrides: dict[str, Any], sweep: tuple[str, list[Any]] | None) -> dict[str, DetectorConfig]:
    """{method-name suffix: detector config}: one unnamed setting, or one per value of the swept key."""
    if sweep is None:
        return {"": with_overrides(config_from_dict({}), overrides).detector}
    key, values = sweep
    leaf = key.rsplit(".", 1)[-1]
    return {f".{leaf}-{value}": with_overrides(config_from_dict({}), {**overrides, key: value}).detector
            for value in values}


def _folds(args: argparse.Namespace) -> list[OneClassData]:
    """The (train, evaluation) pairs to run: one split, or the folds of `--folds`; `--limit-eval` applied to each."""
    progress = not args.no_progress
    if args.folds is not None:
        folds = load_one_class_folds(args.dataset, args.folds, progress=progress)
    else:
        folds = [load_one_class_data(args.dataset, progress=progress, validation=args.validation)]
    if args.limit_eval is None:
        return folds
    return [OneClassData(d.train, first_per_class(d.evaluation, args.limit_eval), d.split_note) for d in folds]


def _run_class(methods: tuple[str, ...], config: DetectorConfig, image_shape: tuple[int, int, int],
               data: OneClassData, label: int, limit_train: int | None, device: torch.device, seed: int,
               progress: bool) -> Iterator[tuple[str, float, float]]:
    """(method, AUROC, seconds) per method for one normal class; VAE methods share one trained VAE."""
    normal = normal_class_images(data, label, limit_train, device)
    shared_vae = None
    for method in methods:
        start = time.perf_counter()
        if method in VAE_METHODS:
            detector = VAEGradientDetector(image_shape, evolve_config(config.vae, **VAE_METHODS[method]), seed, progress)
            if shared_vae is None:
                shared_vae = detector.fit_vae(normal).vae
            detector.vae = shared_vae
            detector.fit_head(normal)
        elif method in DROCC_METHODS:
            detector = DROCCDetector(image_shape, config.drocc, method, seed, progress).fit(observations_of(normal))
        else:
            detector = RotationDetector(image_shape, config.rotation, seed, progress).fit(observations_of(normal))
        yield method, evaluation_auroc(detector, data, label, device), time.perf_counter() - start


def one_class_table(metrics: dict[str, float], dataset: str, class_names: list[str], methods: tuple[str, ...]) -> str:
    """Rows = classes then the mean; columns = the papers' published means, then each method."""
    bases = dict.fromkeys(m.split(".")[0] for m in methods)  # a swept method's name carries a .key-value suffix
    paper_columns = [m for m in bases if (m, dataset) in PAPER_MEAN_AUROC]
    header = ["class", *(f"paper {m}" for m in paper_columns), *methods]
    rows = []
    for name in [*class_names, "mean"]:
        row: list[Any] = [name]
        for method in paper_columns:
            published = PAPER_MEAN_AUROC[(method, dataset)] if name == "mean" else None  # DESIGN.md quotes means only
            row.append("n/a" if published is None else published)
        row += [metrics[metric_key("auroc", "one_class", m, dataset, name)] for m in methods]
        rows.append(row)
    return format_table(rows, header)


def _image_shape(data: OneClassData) -> tuple[int, int, int]:
    _, height, width, channels = data.train.images.shape
    return channels, height, width


def _assignment(item: str) -> tuple[str, Any]:
    """'vae.vae_epochs=50' -> ('detector.vae.vae_epochs', 50); values parsed as YAML scalars."""
    key, _, value = item.partition("=")
    if not value:
        raise SystemExit(f"--set expects key=value, got {item!r}")
    return f"detector.{key.strip()}", yaml.safe_load(value)


def _sweep(item: str) -> tuple[str, list[Any]]:
    """'drocc.radius=2,8,32' -> ('detector.drocc.radius', [2, 8, 32]); values parsed as YAML scalars (as --set)."""
    key, _, values = item.partition("=")
    parsed = [yaml.safe_load(value) for value in values.split(",") if value.strip()]
    if not key.strip() or len(parsed) < 2 or len(set(map(str, parsed))) < len(parsed):
        raise argparse.ArgumentTypeError(f"--sweep expects key=value,value[,...] with distinct values, got {item!r}")
    return f"detector.{key.strip()}", parsed


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=[d for d in ("mnist", "fashion_mnist", "cifar10") if d in CATALOG])
    parser.add_argument("--out", required=True, type=Path, help="folder that receives result.json")
    parser.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=METHODS,
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--classes", type=lambda s: [int(c) for c in s.split(",")], default=None,
                        help="class indices to run (default: all)")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training images per class")
    parser.add_argument("--limit-eval", type=int, default=None, help="first N evaluation images per class (quick runs)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--folds", type=int, default=None, metavar="K",
                        help="MNIST: K-fold cross-validation over its one split instead of halves (AUROC averaged)")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on a held-out part of the training images (to choose hyper-parameters)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="detector config override, e.g. --set vae.vae_epochs=50 --set drocc.radius=4")
    parser.add_argument("--sweep", type=_sweep, default=None, metavar="KEY=V1,V2,...",
                        help="run every method once per value of one detector config key (after --set), e.g. "
                             "--sweep drocc.radius=2,8,32; each method name gains the suffix .radius-<value>")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.folds is not None and (args.validation or args.dataset != "mnist"):
        parser.error("--folds is for MNIST's one split and does not go with --validation")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    return args


if __name__ == "__main__":
    raise SystemExit(main())
