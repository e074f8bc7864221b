"""Choose `detector.pu_head.layer_stats` without labels: the memory-vs-stream separation of each candidate.

memory_pu keeps the round whose cross-fitted heads separate the rehearsal memory (known IDD) from
the unlabeled stream best: with the stream a fixed mixture, that out-of-fold AUROC rises with the
known-vs-novel AUROC, so it ranks candidates without a label of the stream. This script adapts a
memory_pu detector to each OOD target's stream once per candidate layer set and reports that
separation (`pu_separation`, the selection criterion). Beside it, for the record only, the
out-of-fold known-vs-novel AUROC within the stream (`stream_auroc`), which needs the stream's
labels (training-split images; the test split is never touched). A candidate is a '+'-joined list
of layer names; 'none' is the plain head.

    python benchmarks/layer_stats_selection.py --config configs/cifar10-fastnet.yaml --set model.width=16 \\
        --classifier DIR/classifier.safetensors --candidates none,groups.group3,act+groups.group1 --out OUT
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
from edge_runtime.config import RunConfig, config_to_dict, evolve_config  # noqa: E402
from edge_runtime.data.arrays import ImageSet  # noqa: E402
from edge_runtime.evaluation import ood_targets, whole_stream  # noqa: E402
from edge_runtime.experiment import embed, start_classifier_run  # noqa: E402
from edge_runtime.detectors.self_supervised import SelfSupervisedDetector  # noqa: E402
from edge_runtime.errors import ConfigError  # noqa: E402
from edge_runtime.metrics import ood_metrics  # noqa: E402
from edge_runtime.models.base import FrozenClassifier  # noqa: E402
from edge_runtime.results import format_table, metric_key, write_result  # noqa: E402

NO_LAYERS = "none"


def parse_candidates(text: str) -> dict[str, tuple[str, ...]]:
    """'none,a+b' -> {'none': (), 'a+b': ('a', 'b')}."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError("--candidates needs at least one layer set ('none' for the plain head)")
    return {name: () if name == NO_LAYERS else tuple(name.split("+")) for name in names}


def separation(cfg: RunConfig, classifier: FrozenClassifier, memory: ImageSet, stream: ImageSet,
               layers: tuple[str, ...], device: torch.device) -> dict[str, float]:
    """Adapt memory_pu with `layers` on the whole stream at once; its kept round's out-of-fold scores."""
    head = evolve_config(cfg.detector.pu_head, layer_stats=layers)
    detector_cfg = evolve_config(cfg.detector, ssl_mode="memory_pu", pu_head=head)
    detector = SelfSupervisedDetector(classifier, detector_cfg, cfg.seed)
    kept = {"keep_images": detector.keep_images, "stat_layers": detector.stat_layers}
    detector.set_memory(embed(classifier, memory, device, **kept), torch.from_numpy(memory.labels))
    detector.observe(embed(classifier, stream, device, **kept))
    memory_scores, pool_scores = detector.out_of_fold_scores()
    novel = stream.labels == len(memory.classes)
    return {"pu_separation": ood_metrics(memory_scores.numpy(), pool_scores.numpy())["auroc"],
            "stream_auroc": ood_metrics(pool_scores[~novel].numpy(), pool_scores[novel].numpy())["auroc"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    add_classifier_argument(parser)
    parser.add_argument("--candidates", required=True, help="comma-separated layer sets, each '+'-joined or 'none'")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    candidates = parse_candidates(args.candidates)
    run = start_classifier_run(cfg, args.out, args.classifier, args.progress)
    classifier, device = run.classifier, run.device
    metrics, rows = {}, []
    targets = ood_targets(run.split, run.data.ood_sets, cfg.seed)
    bar = tqdm(total=len(targets) * len(candidates), desc="layer sets", disable=not args.progress)
    for target in targets:
        memory, stream = whole_stream(cfg, run.split, target.stream_pool, classifier, device)
        for name, layers in candidates.items():
            values = separation(cfg, classifier, memory, stream, layers, device)
            candidate = name.replace("+", "-and-")
            metrics |= {metric_key(metric, candidate, f"{run.tag}_vs_{target.name}"): value
                        for metric, value in values.items()}
            rows.append([target.name, name, values["pu_separation"], values["stream_auroc"]])
            bar.update()
    bar.close()
    write_result(run.out, config_to_dict(cfg), metrics, device, "python benchmarks/layer_stats_selection.py "
                 + " ".join(sys.argv[1:] if argv is None else argv))
    print(format_table(rows, ["target", "layer_stats", "pu_separation (criterion)", "stream_auroc (record)"]))
    print(f"results in {run.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
