"""Accuracy of the frozen classifier under each test-time reading, on held-back training images.

How `model.mirror_average` and `model.shift_average` are decided on images the runtime may label:
the calibration split, known-class training images held back from training (they become the
rehearsal memory and the stream's known part). The test split is not read. Readings:
  one_view        the image as it comes
  mirror_average  the image and its mirror (2 backbone passes)
  mirror_shift_S  both, each also moved S pixels left and right (6 passes), for each S of --shifts

    python benchmarks/view_selection.py --config configs/cifar10-fastnet.yaml --set model.width=16 \\
        --classifier DIR/classifier.safetensors --out OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path; keep package imports unambiguous.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from edge_runtime.cli.common import add_classifier_argument, add_run_arguments, config_from_args  # noqa: E402
from edge_runtime.config import config_to_dict, evolve_config  # noqa: E402
from edge_runtime.errors import ConfigError  # noqa: E402
from edge_runtime.experiment import held_back_known_set, start_classifier_run  # noqa: E402
from edge_runtime.results import format_table, metric_key, write_result  # noqa: E402
from edge_runtime.training.trainer import evaluate_accuracy  # noqa: E402


def readings(shifts: str) -> dict[str, tuple[bool, int]]:
    """Reading name -> (mirror_average, shift_average), the shifted ones from a comma list of pixels."""
    try:
        pixels = [int(part) for part in shifts.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--shifts {shifts!r}: give a comma-separated list of whole pixels, e.g. 1,2") from None
    if any(shift <= 0 for shift in pixels):
        raise ConfigError(f"--shifts {shifts!r}: every shift must be a positive number of pixels")
    return {"one_view": (False, 0), "mirror_average": (True, 0),
            **{f"mirror_shift_{shift}": (True, shift) for shift in pixels}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    add_classifier_argument(parser)
    parser.add_argument("--shifts", default="1,2", help="pixels of the shifted readings, comma-separated")
    args = parser.parse_args(argv)
    chosen = readings(args.shifts)
    cfg = config_from_args(args)
    try:  # each reading within the model section's own bounds (at most 8 pixels, smaller than the images)
        for mirrored, shift in chosen.values():
            evolve_config(cfg.model, mirror_average=mirrored, shift_average=shift)
    except ConfigError as refusal:
        parser.error(f"--shifts: {refusal}")
    run = start_classifier_run(cfg, args.out, args.classifier, args.progress, needs_held_back=True)
    calibration, classifier, tag = held_back_known_set(run.split), run.classifier, run.tag
    metrics, rows = {}, []
    for reading, (mirrored, shift) in chosen.items():
        classifier.mirror_average, classifier.shift_average = mirrored, shift
        accuracy = evaluate_accuracy(classifier, calibration, run.device)
        metrics[metric_key("calibration_acc", reading, tag)] = accuracy
        rows.append([reading, classifier.view_count, accuracy])
    write_result(run.out, config_to_dict(cfg), metrics, run.device, "python benchmarks/view_selection.py "
                 + " ".join(sys.argv[1:] if argv is None else argv))
    print(format_table(rows, ["reading", "backbone passes", f"accuracy on {len(calibration)} held-back known training images"]))
    print(f"results in {run.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
