"""DROCC's synthetic tables on CPU: a 1-D sine manifold and a sphere, DROCC beside simple baselines.

    python benchmarks/drocc_synthetic.py --table sine --out benchmarks/results/drocc_sine
    python benchmarks/drocc_synthetic.py --table sphere --out benchmarks/results/drocc_sphere

Sine (edge_runtime/synthetic.py): 1,024 training positives on y = sin x; test positives are fresh
points of the curve, test negatives the curve shifted up or down by each displacement 0.2 .. 2.0.
DROCC sees positives only; DROCC-LF and the cross-entropy baseline also get `--labelled-negatives`
points shifted by `--negative-displacement` (the limited-negatives setting DROCC-LF is made for).
Sphere: positives uniform on the unit sphere in R^d; negatives on spheres of radius 1.2 .. 2.0.
Baselines: one-class SVM (RBF) and the distance to the k-th nearest training positive (kNN).
The paper's own numbers for these tables are not part of DESIGN.md and cannot be checked offline,
so the printed tables leave their column 'n/a' rather than quote them from memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


# As a script, Python puts benchmarks/ first on sys.path, where sibling scripts (kernels.py) would
# shadow the project's packages of the same name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch
from sklearn.svm import OneClassSVM

from edge_runtime.config import DROCCConfig, config_to_dict, evolve_config
from edge_runtime.detectors.drocc import mlp, train_drocc
from edge_runtime.metrics import ood_metrics
from edge_runtime.results import format_table, metric_key, write_result
from edge_runtime.synthetic import SINE_DISPLACEMENTS, SPHERE_RADII, sine_manifold, sphere

TRAIN_POSITIVES = 1024
TEST_POINTS = 1000
KNN_K = 5
MLP_WIDTH = 64
SINE_DROCC = DROCCConfig(radius=0.1, gamma=2.0, mu=1.0, ce_epochs=5, epochs=100, ascent_steps=10,
                         ascent_step_size=1e-3, projection_interval=5, lr=3e-3, batch_size=128)
SPHERE_DROCC = evolve_config(SINE_DROCC, radius=0.5)

Scorer = Callable[[torch.Tensor], np.ndarray]  # test points -> novelty scores (higher = more novel)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    if args.table == "sine":
        positives = sine_manifold(TRAIN_POSITIVES, seed=args.seed)
        negatives = sine_manifold(args.labelled_negatives, seed=args.seed + 1, displacement=args.negative_displacement)
        methods = {
            "drocc": _drocc(positives, SINE_DROCC, args.seed),
            "drocc_lf": _drocc(positives, SINE_DROCC, args.seed, negatives=negatives, feature_weighted=True),
            "ce_negatives": _drocc(positives, evolve_config(SINE_DROCC, mu=0.0), args.seed, negatives=negatives),
            "ocsvm": _ocsvm(positives),
            "knn": _knn(positives),
        }
        known = sine_manifold(TEST_POINTS, args.seed + 2)
        tests = {f"displacement-{d}": sine_manifold(TEST_POINTS, args.seed + 100 + i, d)
                 for i, d in enumerate(SINE_DISPLACEMENTS)}
        drocc_config = SINE_DROCC
    else:
        positives = sphere(TRAIN_POSITIVES, args.sphere_dim, 1.0, seed=args.seed)
        methods = {"drocc": _drocc(positives, SPHERE_DROCC, args.seed), "ocsvm": _ocsvm(positives),
                   "knn": _knn(positives)}
        known = sphere(TEST_POINTS, args.sphere_dim, 1.0, args.seed + 2)
        tests = {f"radius-{r}": sphere(TEST_POINTS, args.sphere_dim, r, args.seed + 200 + i)
                 for i, r in enumerate(SPHERE_RADII)}
        drocc_config = SPHERE_DROCC
    metrics = _evaluate(args.table, methods, known, tests)
    print(_table(metrics, args.table, list(methods), list(tests)))
    config = {"table": args.table, "train_positives": TRAIN_POSITIVES, "test_points_per_set": TEST_POINTS,
              "seed": args.seed, "mlp_width": MLP_WIDTH, "knn_k": KNN_K, "drocc": config_to_dict(drocc_config),
              "ocsvm": {"kernel": "rbf", "gamma": "scale", "nu": 0.1}, "torch_threads": args.threads,
              "paper_numbers": "not available offline; the table shows ours and baselines only"}
    if args.table == "sine":
        config.update(labelled_negatives=args.labelled_negatives, negative_displacement=args.negative_displacement)
    else:
        config.update(sphere_dim=args.sphere_dim)
    path = write_result(args.out, config, metrics, "cpu", command="python benchmarks/drocc_synthetic.py " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    print(f"wrote {path}")
    return 0


def _drocc(positives: torch.Tensor, config: DROCCConfig, seed: int, negatives: torch.Tensor | None = None,
           feature_weighted: bool = False) -> Scorer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = mlp(positives.shape[1], MLP_WIDTH)
    train_drocc(network, positives, config, feature_weighted, negatives, seed)

    def score(points: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return (-network(points)).numpy()
    return score


def _ocsvm(positives: torch.Tensor) -> Scorer:
    model = OneClassSVM(kernel="rbf", gamma="scale", nu=0.1).fit(positives.numpy())
    return lambda points: -model.decision_function(points.numpy())


def _knn(positives: torch.Tensor) -> Scorer:
    return lambda points: torch.cdist(points, positives).topk(KNN_K, dim=1, largest=False).values[:, -1].numpy()


def _evaluate(dataset: str, methods: dict[str, Scorer], test_positives: torch.Tensor,
              test_negatives: dict[str, torch.Tensor]) -> dict[str, float]:
    metrics = {}
    for method, scorer in methods.items():
        known = scorer(test_positives)
        for name, points in test_negatives.items():
            metrics[metric_key("auroc", "one_class", method, dataset, name)] = ood_metrics(known, scorer(points))["auroc"]
    return metrics


def _table(metrics: dict[str, float], dataset: str, methods: list[str], rows: list[str]) -> str:
    header = [dataset, "paper", *methods]
    return format_table([[row, "n/a", *(metrics[metric_key("auroc", "one_class", m, dataset, row)] for m in methods)]
                         for row in rows], header)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", required=True, choices=["sine", "sphere"])
    parser.add_argument("--out", required=True, type=Path, help="folder that receives result.json")
    parser.add_argument("--labelled-negatives", type=int, default=16)
    parser.add_argument("--negative-displacement", type=float, default=1.0)
    parser.add_argument("--sphere-dim", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
