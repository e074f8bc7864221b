"""Score error of every last-layer scoring path and precision variant on a trained classifier (issue 5).

benchmarks/kernels.py times a synthetic workload; this script measures accuracy where it matters:
the frozen classifier's own last layer, the tied Gaussian the detector fits on the known training
images, and a seeded sample of the test split (known and novel images) scored with the predicted
labels and with one given label for all (y_opt, as the paper scores believed-OOD inputs). Each path
runs where it can: closed_form always, the Triton kernel on a GPU or under TRITON_INTERPRET=1, the
CUDA C kernel on a GPU or, on a CPU, through its host emulation (g++). For each it reports the
largest and the median relative error against float64, and the AUROC (known vs novel, predicted
labels) its scores give, beside the float64 AUROC.

    TRITON_INTERPRET=1 python benchmarks/kernel_accuracy.py --config configs/cifar10-fastnet.yaml \\
        --set model.width=16 --classifier DIR/classifier.safetensors --out benchmarks/results/kernel_accuracy
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the `kernels` package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edge_runtime.cli.common import add_classifier_argument, add_run_arguments, config_from_args  # noqa: E402
from edge_runtime.config import config_to_dict  # noqa: E402
from edge_runtime.detectors.grad_mahalanobis import GradientMahalanobis  # noqa: E402
from edge_runtime.experiment import embed, start_classifier_run  # noqa: E402
from edge_runtime.metrics import ood_metrics  # noqa: E402
from edge_runtime.results import format_table, metric_key, write_result  # noqa: E402
from kernels.cuda_build import cuda_last_layer_scores, cuda_precision_refusal  # noqa: E402
from kernels.dispatch import score_last_layer, triton_interpreted, unavailable_reason  # noqa: E402
from kernels.reference import PRECISION_VARIANTS, LastLayerStats, last_layer_scores, prepare_last_layer_stats  # noqa: E402

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LastLayerStats], torch.Tensor]


def scoring_paths(device: torch.device) -> dict[str, Scorer | str]:
    """Implementation name -> scorer(features, probs, labels, stats), or why it cannot run here."""
    def dispatched(name: str) -> Scorer:
        return lambda f, p, y, s: score_last_layer(f, p, y, s, impl=name)[0]

    paths: dict[str, Scorer | str] = {"closed_form": dispatched("closed_form")}
    paths["triton_fused"] = unavailable_reason("triton_fused", device) or dispatched("triton_fused")
    if device.type == "cuda":
        paths["cuda_fused"] = unavailable_reason("cuda_fused", device) or dispatched("cuda_fused")
    elif shutil.which("g++") is None:
        paths["cuda_fused"] = "no GPU here and no g++ for the CUDA C kernels' host emulation"
    else:
        paths["cuda_fused"] = lambda f, p, y, s: cuda_last_layer_scores(f, p, y, s, backend="host_emulation")
    return paths


def relative_errors(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (scores.double() - reference).abs() / reference.abs()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    add_classifier_argument(parser, required=True)
    parser.add_argument("--samples", type=int, default=1000, help="test images scored (a seeded sample of the split)")
    parser.add_argument("--variants", nargs="+", default=list(PRECISION_VARIANTS), choices=sorted(PRECISION_VARIANTS))
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error(f"--samples must be at least 2, got {args.samples}")
    cfg = config_from_args(args)
    run = start_classifier_run(cfg, args.out, args.classifier, args.progress)
    split, classifier, device = run.split, run.classifier, run.device
    detector = GradientMahalanobis(classifier, cfg.detector).fit(
        embed(classifier, split.train, device, keep_images=False), torch.from_numpy(split.train.labels))
    pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(split.test))[:args.samples])
    is_novel = split.test.labels[pick] >= len(split.known_classes)
    if is_novel.all() or not is_novel.any():
        parser.error(f"--samples {args.samples} drew {int(is_novel.sum())} novel of {len(pick)} test images; "
                     "the AUROC needs both known and novel ones: draw more")
    test = embed(classifier, split.test.subset(pick), device, keep_images=False)
    features, probs = test.features.float(), test.logits.float().softmax(dim=1)
    means, precision = detector.gaussian.means.double().cpu(), detector.gaussian.precision.double().cpu()
    label_modes = {"predicted": probs.argmax(dim=1),
                   "y_opt": torch.full((len(test),), detector.select_novel_label(test), device=probs.device)}
    references = {mode: last_layer_scores(features.double().cpu(), test.logits.double().cpu().softmax(dim=1),
                                          labels.cpu(), means, precision) for mode, labels in label_modes.items()}
    reference_auroc = ood_metrics(references["predicted"][~is_novel].numpy(), references["predicted"][is_novel].numpy())["auroc"]
    tag = f"{run.tag}_k{precision.shape[0]}"
    metrics = {metric_key("auroc", "float64", tag): reference_auroc}
    rows = []
    paths = scoring_paths(device)
    for variant in args.variants:
        stats = prepare_last_layer_stats(means.to(device), precision.to(device), variant)
        for name, path in paths.items():
            if name == "cuda_fused" and not isinstance(path, str):
                path = cuda_precision_refusal(variant) or path
            if isinstance(path, str):
                rows.append([name, variant, "-", "-", "-", "-", path])
                continue
            scores = {mode: path(features, probs, labels, stats).cpu() for mode, labels in label_modes.items()}
            errors = {mode: relative_errors(scores[mode], references[mode]) for mode in label_modes}
            predicted = scores["predicted"].numpy()
            auroc = ood_metrics(predicted[~is_novel], predicted[is_novel])["auroc"]
            for mode, error in errors.items():
                metrics[metric_key("max_rel_error", name, variant, mode, tag)] = float(error.max())
                metrics[metric_key("median_rel_error", name, variant, mode, tag)] = float(error.median())
            metrics[metric_key("auroc", name, variant, tag)] = auroc
            rows.append([name, variant, f"{float(errors['predicted'].max()):.1e}",
                         f"{float(errors['predicted'].median()):.1e}", f"{float(errors['y_opt'].max()):.1e}",
                         f"{auroc:.6f}", ""])
    print(f"known vs novel AUROC with float64 scores: {reference_auroc:.6f} ({int(is_novel.sum())} novel of {len(test)})")
    print(format_table(rows, ["impl", "variant", "max rel err", "median rel err", "max rel err (y_opt)", "AUROC",
                              "skipped because"]))
    config = {"run": config_to_dict(cfg), "classifier": str(args.classifier), "samples": len(test),
              "novel_samples": int(is_novel.sum()), "variants": args.variants, "k": int(precision.shape[0]),
              "gaussian_fit": f"{cfg.detector.shrinkage} on the known training images' last-layer gradients",
              "cuda_fused": "compiled" if device.type == "cuda" else "host emulation (g++)",
              "triton_fused": "interpreter (TRITON_INTERPRET=1)" if triton_interpreted() else "compiled",
              "torch": torch.__version__}
    path = write_result(args.out, config, metrics, device,
                        command="python benchmarks/kernel_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
