"""Novel conditions: known classes seen through a new corruption, detected from VAE gradients.

    python benchmarks/novel_condition.py --dataset fashion_mnist --out benchmarks/results/novel_condition_fashion_mnist

A VAE is trained on clean training images of every class (the known condition). Each test image is
then scored clean and under every corruption of edge_runtime/data/corruptions.py at levels 1..5;
AUROC takes the clean test images as known and their corrupted copies as novel. Features, all
under both heads (vae_gradient's `noise_classifier`, the paper's, and `mahalanobis`, ours):
  gradient at the last decoder layer   the paper's choice for novel conditions
  gradient at the first decoder layer  its choice for novel classes, for contrast
  reconstruction error vector          the paper's activation baseline
One VAE serves every feature and head, so the table compares features and heads, not VAE luck.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# As a script, Python puts benchmarks/ first on sys.path, where sibling scripts (kernels.py) would
# shadow the project's packages of the same name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch
from tqdm.auto import tqdm

from edge_runtime.config import VAEGradientConfig, config_to_dict, evolve_config
from edge_runtime.data.corruptions import CORRUPTIONS, LEVELS, corrupt
from edge_runtime.data.loader import load_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.detectors.vae_gradient import VAEGradientDetector
from edge_runtime.device import resolve_device
from edge_runtime.metrics import ood_metrics
from edge_runtime.one_class import first_per_class, observations_of
from edge_runtime.results import format_table, metric_key, write_result

FEATURES = {"grad_last_decoder": {"feature": "gradient", "site": "last_decoder"},
            "grad_first_decoder": {"feature": "gradient", "site": "first_decoder"},
            "reconstruction": {"feature": "reconstruction"}}
HEADS = ("noise_classifier", "mahalanobis")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    train = first_per_class(load_split(args.dataset, "train", progress=not args.no_progress), args.limit_train)
    test = first_per_class(load_split(args.dataset, "test", progress=not args.no_progress), args.limit_eval)
    known, clean = to_tensor(train.images, device), to_tensor(test.images, device)
    base = VAEGradientConfig(vae_epochs=args.vae_epochs)
    image_shape = tuple(known.shape[1:])
    started = time.perf_counter()
    vae = VAEGradientDetector(image_shape, base, args.seed, not args.no_progress, device).fit_vae(known).vae
    conditions = {f"{kind}-{level}": corrupt(clean.cpu(), kind, level, args.seed).to(device)
                  for kind in CORRUPTIONS for level in LEVELS}
    metrics: dict[str, float] = {}
    methods = [f"{feature}/{head}" for feature in FEATURES for head in HEADS]
    for method in tqdm(methods, desc="features x heads", disable=args.no_progress):
        feature, head = method.split("/")
        detector = VAEGradientDetector(image_shape, evolve_config(base, **FEATURES[feature], head=head),
                                       args.seed, False, device)
        detector.vae = vae
        detector.fit_head(known)
        clean_scores = detector.score(observations_of(clean)).cpu().numpy()
        for condition, images in conditions.items():
            novel_scores = detector.score(observations_of(images)).cpu().numpy()
            metrics[metric_key("auroc", "novel_condition", f"{feature}-{head}", args.dataset, condition)] = \
                ood_metrics(clean_scores, novel_scores)["auroc"]
    for method in methods:
        name = method.replace("/", "-")
        metrics[metric_key("auroc", "novel_condition", name, args.dataset, "mean")] = float(np.mean(
            [metrics[metric_key("auroc", "novel_condition", name, args.dataset, c)] for c in conditions]))
    print(condition_table(metrics, args.dataset, [*conditions, "mean"], [m.replace("/", "-") for m in methods]))
    config = {"dataset": args.dataset, "limit_train_per_class": args.limit_train, "limit_eval_per_class": args.limit_eval,
              "vae": config_to_dict(base), "seed": args.seed, "seconds": time.perf_counter() - started,
              "split": "VAE and heads on the train split (all classes, clean); clean vs corrupted test images"}
    path = write_result(args.out, config, metrics, device, command="python benchmarks/novel_condition.py " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    print(f"wrote {path}")
    return 0


def condition_table(metrics: dict[str, float], dataset: str, rows: list[str], methods: list[str]) -> str:
    """Rows = corruption-level (then the mean); columns = feature-head pairs."""
    return format_table([[row, *(metrics[metric_key("auroc", "novel_condition", m, dataset, row)] for m in methods)]
                         for row in rows], ["condition", *methods])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=["digits", "fashion_mnist", "cifar10"])
    parser.add_argument("--out", required=True, type=Path, help="folder that receives result.json")
    parser.add_argument("--limit-train", type=int, default=600, help="first N training images per class")
    parser.add_argument("--limit-eval", type=int, default=100, help="first N test images per class")
    parser.add_argument("--vae-epochs", type=int, default=30)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
