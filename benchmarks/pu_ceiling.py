"""How close memory_pu's label-free rounds come to the same heads trained with the stream's labels.

For each OOD target, two detectors adapt to the same rehearsal memory and stream as `evaluate`
builds them, with the same head recipe, folds and seed:
  memory_pu       the label-free rounds, what a session runs
  stream_labels   the cross-fitted heads trained on the memory vs the stream's truly novel samples
                  (SelfSupervisedDetector.fit_confirmed); the labels are those of training-split images
Both score the known test images against the target's test images under both protocols. The gap
between the two rows is what better pseudo-labels could still win; what `stream_labels` itself
misses is bounded by the frozen classifier's outputs and the data sizes, which no pseudo-labelling
can move. `novel_share` is the share of novel samples in the stream: memory_pu's estimate, and the
truth beside it. `memory_vs_stream_known_auroc` compares the out-of-fold scores of the memory with
those of the stream's known samples, two draws of the same known data: 0.5 when the cross-fitting is
unbiased (see the memory_pu notes in edge_runtime/detectors/self_supervised.py).
`false_alarm_rate` and `novel_flagged_rate` are the shares of the known and the target's test images
that `is_novel` flags at the threshold calibrated on the memory: the first should stay near
`detector.target_fpr`.

    python benchmarks/pu_ceiling.py --config configs/cifar10-fastnet.yaml --set model.width=16 \\
        --classifier DIR/classifier.safetensors --out OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path; keep package imports unambiguous.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from edge_runtime.cli.common import add_classifier_argument, add_run_arguments, config_from_args  # noqa: E402
from edge_runtime.config import config_to_dict, evolve_config  # noqa: E402
from edge_runtime.data.arrays import ImageSet  # noqa: E402
from edge_runtime.detectors.base import PROTOCOLS, Observations  # noqa: E402
from edge_runtime.detectors.self_supervised import SelfSupervisedDetector  # noqa: E402
from edge_runtime.evaluation import embed_as_kept, ood_targets, score_by_protocol, whole_stream  # noqa: E402
from edge_runtime.experiment import known_test_set, start_classifier_run  # noqa: E402
from edge_runtime.metrics import ood_metrics  # noqa: E402
from edge_runtime.results import format_table, metric_key, write_result  # noqa: E402

METHODS = ("memory_pu", "stream_labels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    add_classifier_argument(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    cfg = evolve_config(cfg, detector=evolve_config(cfg.detector, ssl_mode="memory_pu"))
    run = start_classifier_run(cfg, args.out, args.classifier, args.progress)
    split, classifier, device = run.split, run.classifier, run.device

    def embedded(images: ImageSet) -> Observations:
        return embed_as_kept(cfg.detector, classifier, images, device)

    known_test = embedded(known_test_set(split))
    metrics, rows = {}, []
    targets = ood_targets(split, run.data.ood_sets, cfg.seed)
    for target in tqdm(targets, desc="targets", disable=not args.progress):
        memory, stream = whole_stream(cfg, split, target.stream_pool, classifier, device)
        stream_obs = embedded(stream)
        novel = torch.from_numpy(stream.labels == len(split.known_classes))
        detectors = {name: SelfSupervisedDetector(classifier, cfg.detector, cfg.seed, args.progress)
                     for name in METHODS}
        memory_obs = embedded(memory)
        for detector in detectors.values():
            detector.set_memory(memory_obs, torch.from_numpy(memory.labels))
        detectors["memory_pu"].observe(stream_obs)
        detectors["stream_labels"].fit_confirmed(stream_obs, novel)
        target_test = embedded(target.test)
        pair = f"{run.tag}_vs_{target.name}"
        for name, detector in detectors.items():
            row = [target.name, name]
            for protocol in PROTOCOLS:
                idd = score_by_protocol(detector, known_test, protocol, cfg.stream.batch_size)
                ood = score_by_protocol(detector, target_test, protocol, cfg.stream.batch_size)
                values = ood_metrics(idd, ood)
                metrics |= {metric_key(metric, protocol, name, pair): value for metric, value in values.items()}
                row.append(values["auroc"])
            for family, images in (("false_alarm_rate", known_test), ("novel_flagged_rate", target_test)):
                rate = detector.is_novel(images).float().mean().item()
                metrics[metric_key(family, name, pair)] = rate
                row.append(rate)
            memory_scores, pool_scores = detector.out_of_fold_scores()
            bias = ood_metrics(memory_scores.numpy(), pool_scores[~novel].numpy())["auroc"]
            metrics[metric_key("novel_share", name, pair)] = detector.novel_share
            metrics[metric_key("memory_vs_stream_known_auroc", name, pair)] = bias
            rows.append(row + [detector.novel_share, bias])
    write_result(run.out, config_to_dict(cfg), metrics, device, "python benchmarks/pu_ceiling.py "
                 + " ".join(sys.argv[1:] if argv is None else argv))
    print(format_table(rows, ["target", "heads trained on", *(f"AUROC {p}" for p in PROTOCOLS),
                              f"known flagged (target {cfg.detector.target_fpr})", "novel flagged",
                              "novel share (estimated / true)", "memory vs stream's known, out of fold"]))
    print(f"IDD (known test images) is the positive class of AUROC; results in {run.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
