"""`edge-runtime export`: a torch-free deploy bundle (ONNX + what decides novelty + threshold), checked.

From a config: fits the gradient-Mahalanobis statistics on the known training images and the
threshold on the held-back calibration slice (as `evaluate`'s 9+1 router does). From a saved
session (`--session`): takes its classifier and its novel class's head as adapted (the memory_pu
feature heads, or a static head's statistics). Either way it exports the classifier to ONNX,
checks it against torch with onnxruntime, writes the bundle, and replays a sample of the test
split through the torch-free runner to count how often its decisions equal torch's. With a
TensorRT device profile it also builds the engine when TensorRT is importable here.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from calibration.int8 import CalibrationBatches, cache_path_for, entropy_calibrator
from calibration.threshold import threshold_at_fpr
from edge_runtime.cli.common import add_classifier_argument, add_output_arguments, config_from_args
from edge_runtime.config import DeployConfig, RunConfig, config_to_dict, evolve_config, load_config
from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.splits import NovelClassSplit
from edge_runtime.data.transforms import to_tensor
from edge_runtime.deploy.bundle import MODEL_FILE, Bundle, export_bundle
from edge_runtime.deploy.onnx_export import check_onnx_parity, export_onnx
from edge_runtime.deploy.reference import decide
from edge_runtime.deploy.runner import DeployRunner
from edge_runtime.deploy.session_export import export_session_bundle
from edge_runtime.deploy.tensorrt_engine import build_engine, engine_path_for
from edge_runtime.detectors.grad_mahalanobis import GradientMahalanobis
from edge_runtime.device import resolve_device
from edge_runtime.errors import ConfigError
from edge_runtime.experiment import dataset_tag, embed, obtain_classifier, output_dir, prepare_data
from edge_runtime.results import format_table, metric_key, write_result
from edge_runtime.session import Session

HELP = "export the frozen classifier and its novelty statistics as a torch-free bundle (ONNX, TensorRT engine)"
BUNDLE_DIR = "bundle"
CPU = torch.device("cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML run config: fit the gradient statistics and threshold now")
    source.add_argument("--session", help="saved session state: export its classifier and adapted novelty head")
    add_output_arguments(parser)
    parser.add_argument("--profile", help="device profile YAML (configs/cpu.yaml, configs/rtx-desktop.yaml, "
                                          "configs/jetson-orin.yaml); default: the config's deploy section")
    add_classifier_argument(parser)
    parser.add_argument("--parity-images", type=int, default=1000,
                        help="test images replayed through torch and the runner to compare decisions (default 1000)")


def load_device_profile(path: str) -> DeployConfig:
    """The deploy section of a profile file; any other section would be silently ignored, so it is refused."""
    profile = load_config(path)
    if evolve_config(profile, deploy=DeployConfig()) != RunConfig():
        raise ConfigError(f"{path}: a device profile holds only a 'deploy' section")
    return profile.deploy


def run(args: argparse.Namespace) -> int:
    session = Session.load(args.session, device=CPU) if args.session else None
    if session is not None and (args.overrides or args.classifier):
        raise ConfigError("--set and --classifier go with --config; a session exports its own classifier and config")
    cfg = session.config if session is not None else config_from_args(args)
    if args.profile:
        cfg = evolve_config(cfg, deploy=load_device_profile(args.profile))
    if args.parity_images < 1:
        raise ConfigError(f"--parity-images must be positive, got {args.parity_images}")
    out = output_dir(args.out)
    split = prepare_data(cfg, args.progress).split
    if session is not None:
        bundle = export_session_bundle(session, out / BUNDLE_DIR, cfg.deploy.opset)
        classifier = session.classifier

        def torch_labels(sample: ImageSet) -> np.ndarray:
            return session.predict(sample.images).labels
    else:
        classifier, bundle, torch_labels = _fit_and_export(cfg, split, out, args)
    deploy, tag = cfg.deploy, dataset_tag(cfg, split)
    # Test images are only replayed to compare two implementations of one decision, never fitted on.
    sample = _seeded_subset(split.test, args.parity_images, cfg.seed)
    known = split.calibration if len(split.calibration) else sample
    parity = check_onnx_parity(classifier, bundle.model_path, to_tensor(known.images).numpy())
    metrics = {metric_key("onnx_max_abs_err", "features", tag): parity.max_abs_features,
               metric_key("onnx_max_abs_err", "logits", tag): parity.max_abs_logits}
    expected = torch_labels(sample)
    runners = [("onnxruntime", "fp32", "numpy")]
    if deploy.backbone == "tensorrt" and _build_engine_if_possible(deploy, bundle, split.calibration, cfg.seed):
        runners.append((deploy.backbone, deploy.precision, deploy.kernel))
    rows = []
    for backbone, precision, kernel in runners:
        runner = DeployRunner(bundle, backbone, kernel, precision, deploy.batch_size)
        agreement = float((runner.predict(sample.images).labels == expected).mean())
        path = f"{backbone}-{precision}-{kernel}"
        metrics[metric_key("deploy_decision_agreement", "per_sample", path, tag)] = agreement
        rows.append([backbone, precision, kernel, len(sample), agreement])
    engine_ran = len(runners) > 1  # a TensorRT engine ran on this machine's GPU
    config = {**config_to_dict(cfg), "exported_from": args.session or "config", "decision": bundle.decision}
    write_result(out, config, metrics, torch.device("cuda") if engine_ran else CPU)
    print(f"ONNX vs torch on {parity.images} calibration images: max |diff| features {parity.max_abs_features:.2e}, "
          f"logits {parity.max_abs_logits:.2e}")
    print(format_table(rows, ["backbone", "precision", "kernel", "test images", "decisions equal to torch"]))
    print(f"bundle written to {bundle.root} (decision {bundle.decision}, threshold {bundle.threshold:.6g}, "
          f"{len(bundle.classes)} known classes)")
    return 0


def _fit_and_export(cfg: RunConfig, split: NovelClassSplit, out: Path, args: argparse.Namespace
                    ) -> tuple[torch.nn.Module, Bundle, Callable[[ImageSet], np.ndarray]]:
    """Fit gradient statistics (training images) and threshold (calibration slice), export; the torch decision."""
    if cfg.detector.site != "last_linear":
        raise ConfigError(f"detector.site {cfg.detector.site!r}: deploy bundles carry the 'last_linear' site only")
    if len(split.calibration) == 0:
        raise ConfigError("data.calibration_holdout is 0: the exported threshold needs held-back known images")
    classifier = obtain_classifier(cfg, split, resolve_device(cfg.device), out, args.classifier, args.progress).to(CPU)
    detector = GradientMahalanobis(classifier, cfg.detector, cfg.seed, args.progress)
    detector.fit(embed(classifier, split.train, CPU, keep_images=False), torch.from_numpy(split.train.labels))
    threshold = threshold_at_fpr(detector.score(embed(classifier, split.calibration, CPU, keep_images=False)),
                                 cfg.detector.target_fpr)
    model_cfg = cfg.model
    onnx_path = export_onnx(classifier, out / BUNDLE_DIR / MODEL_FILE, model_cfg.input_size, model_cfg.in_channels,
                            cfg.deploy.opset)
    bundle = export_bundle(out / BUNDLE_DIR, onnx_path, threshold, split.known_classes, model_cfg.input_size,
                           model_cfg.in_channels, gaussian=detector.gaussian)

    def torch_labels(sample: ImageSet) -> np.ndarray:
        return decide(detector, embed(classifier, sample, CPU, keep_images=False), threshold)[0].numpy()
    return classifier, bundle, torch_labels


def _seeded_subset(data: ImageSet, count: int, seed: int) -> ImageSet:
    """`count` images drawn with `seed`, in their original order (all of them when there are fewer)."""
    if count >= len(data):
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data), count, replace=False))
    return data.subset(keep)


def _build_engine_if_possible(deploy: DeployConfig, bundle: Bundle, calibration: ImageSet, seed: int) -> bool:
    """Build the profile's engine into the bundle; where TensorRT is absent, say so and go on (build it on the target)."""
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None:
        print("TensorRT engine not built: tensorrt or pycuda is not importable here; run this command on the "
              "target device to build it into the bundle")
        return False
    calibrator = None
    if deploy.precision == "int8":
        images = _seeded_subset(calibration, deploy.calibration_images, seed)
        batches = CalibrationBatches(images, deploy.batch_size, cache_path_for(bundle.root, bundle.model_sha256))
        calibrator = entropy_calibrator(batches)
    engine_path = engine_path_for(bundle.root, deploy.precision)
    build_engine(bundle.model_path, engine_path, deploy.precision, deploy.batch_size,
                 (bundle.in_channels, bundle.input_size, bundle.input_size), calibrator, deploy.workspace_mib)
    print(f"TensorRT {deploy.precision} engine written to {engine_path}")
    return True
