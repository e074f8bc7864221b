"""What ReAct's clipping costs the frozen classifier, per percentile, on held-back training images.

ReAct (edge_runtime/detectors/react.py) assumes clipping the penultimate units at a high percentile
of the known activations leaves known inputs' predictions almost unchanged; the authors' 90 was set
on ResNets whose features are average-pooled. Whether that holds for another backbone can be read
without a novel image: clip at each percentile of the known training features, as `fit` does, and
measure the classifier's accuracy with the clipped logits on the calibration split (known-class
training images held back from training). `clipped_share` is the fraction of those images' feature
values above the clip. The test split is not read.

    python benchmarks/react_percentile_selection.py --config configs/cifar10-fastnet.yaml --set model.width=16 \\
        --classifier DIR/classifier.safetensors --out OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path; keep package imports unambiguous.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from edge_runtime.cli.common import add_classifier_argument, add_run_arguments, config_from_args  # noqa: E402
from edge_runtime.config import config_to_dict  # noqa: E402
from edge_runtime.detectors.react import ReActDetector  # noqa: E402
from edge_runtime.experiment import embed, held_back_known_set, start_classifier_run  # noqa: E402
from edge_runtime.results import format_table, metric_key, write_result  # noqa: E402

PERCENTILES = (90.0, 95.0, 99.0, 99.9, 100.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    add_classifier_argument(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    run = start_classifier_run(cfg, args.out, args.classifier, args.progress, needs_held_back=True)
    split, classifier, device, tag = run.split, run.classifier, run.device, run.tag
    calibration = held_back_known_set(split)
    known = embed(classifier, split.train, device, keep_images=False)
    held_back = embed(classifier, calibration, device, keep_images=False)
    labels = torch.from_numpy(calibration.labels)
    unclipped = float((held_back.logits.argmax(1).cpu() == labels).double().mean())
    metrics = {metric_key("calibration_acc", "unclipped", tag): unclipped}
    rows = [["unclipped", "-", "0.000", f"{unclipped:.4f}"]]
    for percentile in PERCENTILES:
        react = ReActDetector(classifier, percentile=percentile).fit(known, torch.from_numpy(split.train.labels))
        clip = react.clip
        accuracy = float((react.clipped_logits(held_back).argmax(1).cpu() == labels).double().mean())
        share = float((held_back.features.float() > clip).double().mean())
        reading = f"p{percentile:g}".replace(".", "_")
        metrics[metric_key("calibration_acc", reading, tag)] = accuracy
        metrics[metric_key("clipped_share", reading, tag)] = share
        rows.append([f"{percentile:g}", f"{clip:.4g}", f"{share:.3f}", f"{accuracy:.4f}"])
    write_result(run.out, config_to_dict(cfg), metrics, device, "python benchmarks/react_percentile_selection.py "
                 + " ".join(sys.argv[1:] if argv is None else argv))
    print(format_table(rows, ["percentile", "clip", "clipped share",
                              f"accuracy on {len(calibration)} held-back known training images"]))
    print(f"results in {run.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
