"""ONNX export, the deploy bundle and the torch-free runner, against torch on real digits and CIFAR images."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from calibration.threshold import threshold_at_fpr
from classifier_fixture import known_digits, train_digit_classifier
from edge_runtime.cli import export as export_cli
from edge_runtime.config import DeployConfig, ModelConfig, load_config, with_overrides
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.deploy.bundle import MANIFEST_FILE, MODEL_FILE, STATS_FILE, export_bundle, load_bundle
from edge_runtime.deploy.onnx_export import (
    BATCH_AXIS,
    MIN_OPSET,
    PARITY_ATOL,
    PARITY_RTOL,
    check_onnx_parity,
    export_onnx,
)
from edge_runtime.deploy.reference import decide
from edge_runtime.deploy.runner import DeployRunner, last_layer_scores
from edge_runtime.deploy.session_export import export_session_bundle
from edge_runtime.detectors.base import Observations
from edge_runtime.detectors.grad_mahalanobis import GradientMahalanobis
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.evaluation import adapt_session, adaptation_data
from edge_runtime.experiment import prepare_data, train_frozen_classifier
from edge_runtime.models.base import FrozenClassifier
from edge_runtime.models.registry import build_classifier
from edge_runtime.session import Session
from kernels.reference import last_layer_scores as reference_scores

REPO = Path(__file__).resolve().parents[1]
# Runner scores vs torch scores on the same images: |diff| <= SCORE_RTOL * max(score, threshold).
SCORE_RTOL = 1e-4


def _observe(classifier, images: np.ndarray) -> Observations:
    with torch.no_grad():
        features, logits = classifier.embed(to_tensor(images))
    return Observations(None, features, logits)


@pytest.fixture(scope="module")
def digits_session(tmp_path_factory):
    """A torch session on digits (9 held out): classifier, fitted detector, threshold, bundle, test images."""
    torch.manual_seed(0)
    known_train, _ = known_digits(load_digits_split("train"))
    classifier = train_digit_classifier(known_train)
    detector = GradientMahalanobis(classifier).fit(_observe(classifier, known_train.images),
                                                   torch.from_numpy(known_train.labels))
    threshold = threshold_at_fpr(detector.score(_observe(classifier, known_train.images)), 0.05)
    root = tmp_path_factory.mktemp("digits-bundle")
    onnx_path = export_onnx(classifier, root / "exported.onnx", input_size=8, in_channels=1)
    bundle = export_bundle(root / "bundle", onnx_path, threshold, known_train.classes, 8, 1, gaussian=detector.gaussian)
    return classifier, detector, threshold, bundle, load_digits_split("test")


@pytest.fixture(scope="module")
def cifar_resnet(cifar_small):
    """A CIFAR ResNet-18 at 32x32 whose BatchNorm statistics come from real CIFAR images."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", input_size=32, in_channels=3)
    classifier = build_classifier(cfg, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    with torch.no_grad():
        classifier.train()(to_tensor(cifar_small["train"].images[::3]))
    return classifier.eval()


def test_export_has_dynamic_batch_opset_and_both_outputs(digits_session):
    model = onnx.load(str(digits_session[3].model_path))
    onnx.checker.check_model(model)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= MIN_OPSET
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["features", "logits"]
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == BATCH_AXIS


def test_onnx_matches_torch_on_digits_at_several_batch_sizes(digits_session):
    classifier, _, _, bundle, test = digits_session
    pixels = to_tensor(test.images).numpy()
    for batch_size in (1, 7, 256):
        report = check_onnx_parity(classifier, bundle.model_path, pixels[:300], batch_size=batch_size)
        assert report.images == 300
        assert report.argmax_agreement == 1.0
        assert report.max_abs_logits <= PARITY_ATOL


def test_onnx_matches_torch_on_cifar_resnet18(cifar_resnet, cifar_small, tmp_path):
    path = export_onnx(cifar_resnet, tmp_path / "resnet18.onnx", input_size=32, in_channels=3)
    pixels = to_tensor(cifar_small["test"].images[::10]).numpy()
    report = check_onnx_parity(cifar_resnet, path, pixels, batch_size=16)
    with torch.no_grad():
        features, logits = cifar_resnet.embed(torch.from_numpy(pixels))
    assert report.max_abs_features <= PARITY_ATOL + PARITY_RTOL * float(features.abs().max())
    assert report.max_abs_logits <= PARITY_ATOL + PARITY_RTOL * float(logits.abs().max())
    assert report.argmax_agreement == 1.0


@pytest.mark.parametrize("shift", [0, 2])
def test_export_of_a_view_averaging_classifier_runs_every_view_in_the_graph(cifar_resnet, cifar_small, tmp_path, shift):
    """The deployed graph reads images as the torch runtime does: the mean over each image and its
    mirror, and with shifts over both moved left and right."""
    mirroring = FrozenClassifier(cifar_resnet.network, cifar_resnet.final_layer_name, mirror_average=True,
                                 shift_average=shift)
    path = export_onnx(mirroring, tmp_path / "mirrored.onnx", input_size=32, in_channels=3)
    pixels = to_tensor(cifar_small["test"].images[::25]).numpy()
    report = check_onnx_parity(mirroring, path, pixels, batch_size=5)
    with torch.no_grad():
        _, one_view = cifar_resnet.embed(torch.from_numpy(pixels))
        _, logits = mirroring.embed(torch.from_numpy(pixels))
    assert report.max_abs_logits <= PARITY_ATOL + PARITY_RTOL * float(logits.abs().max())
    assert report.argmax_agreement == 1.0
    assert float((logits - one_view).abs().max()) > 100 * report.max_abs_logits  # the graph read more than one view


def test_export_keeps_the_classifier_mode_and_refuses_old_opsets(digits_session, tmp_path):
    classifier = digits_session[0]
    classifier.train()
    try:
        export_onnx(classifier, tmp_path / "m.onnx", input_size=8, in_channels=1)
        assert classifier.training
    finally:
        classifier.eval()
    with pytest.raises(InputError, match="opset"):
        export_onnx(classifier, tmp_path / "old.onnx", input_size=8, in_channels=1, opset=13)


def test_parity_check_catches_a_graph_that_no_longer_matches(digits_session, tmp_path):
    classifier, _, _, _, test = digits_session
    path = export_onnx(classifier, tmp_path / "m.onnx", input_size=8, in_channels=1)
    changed = train_digit_classifier(known_digits(load_digits_split("train"))[0], steps=20, seed=1)
    with pytest.raises(StateError, match="disagrees with torch"):
        check_onnx_parity(changed, path, to_tensor(test.images[:50]).numpy())


def test_numpy_scores_match_the_torch_reference_in_float64():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(13, 6, generator=generator, dtype=torch.float64)
    logits = torch.randn(13, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (13,), generator=generator)
    means = torch.randn(4, 28, generator=generator, dtype=torch.float64)
    root = torch.randn(28, 28, generator=generator, dtype=torch.float64)
    precision = root @ root.T / 28
    expected = reference_scores(features, logits.softmax(dim=1), labels, means, precision).numpy()
    got = last_layer_scores(features.float().numpy(), logits.float().numpy(), labels.numpy(),
                            means.float().numpy(), precision.float().numpy())
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_runner_decisions_equal_the_torch_session_on_real_digits(digits_session):
    classifier, detector, threshold, bundle, test = digits_session
    labels, novel, scores = decide(detector, _observe(classifier, test.images), threshold)
    decisions = DeployRunner(bundle, batch_size=64).predict(test.images)
    scale = np.maximum(scores.numpy(), threshold)
    assert np.all(np.abs(decisions.scores - scores.numpy()) <= SCORE_RTOL * scale)
    borderline = np.abs(scores.numpy() - threshold) <= SCORE_RTOL * threshold
    assert np.array_equal(decisions.labels[~borderline], labels.numpy()[~borderline])
    assert np.array_equal(decisions.novel[~borderline], novel.numpy()[~borderline])
    assert borderline.sum() <= 1
    novel_digit = test.labels == 9
    assert decisions.novel[novel_digit].mean() > 0.5 > decisions.novel[~novel_digit].mean()
    assert set(decisions.labels[decisions.novel]) == {bundle.novel_label}


def test_runner_takes_uint8_frames_and_float_batches_alike(digits_session):
    bundle, test = digits_session[3], digits_session[4]
    runner = DeployRunner(bundle, batch_size=32)
    from_uint8 = runner.predict(test.images[:40])
    from_float = runner.predict(to_tensor(test.images[:40]).numpy())
    np.testing.assert_array_equal(from_uint8.labels, from_float.labels)
    np.testing.assert_array_equal(from_uint8.scores, from_float.scores)


def test_runner_rejects_malformed_frames(digits_session):
    runner = DeployRunner(digits_session[3])
    images = digits_session[4].images[:4]
    with pytest.raises(InputError, match=r"\[N, 8, 8, 1\]"):
        runner.predict(images[:, :7])
    broken = to_tensor(images).numpy()
    broken[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        runner.predict(broken)
    with pytest.raises(InputError, match="uint8 NHWC or float32 NCHW"):
        runner.predict(images.astype(np.int32))
    with pytest.raises(ConfigError, match="tensorrt"):
        DeployRunner(digits_session[3], precision="fp16")


def test_runner_imports_and_predicts_without_torch(digits_session, tmp_path):
    bundle, test = digits_session[3], digits_session[4]
    np.save(tmp_path / "frames.npy", test.images[:25])
    expected = DeployRunner(bundle).predict(test.images[:25]).labels
    script = ("import sys; sys.modules['torch'] = None\n"
              "import numpy as np\n"
              "from edge_runtime.deploy.runner import DeployRunner\n"
              f"frames = np.load({str(tmp_path / 'frames.npy')!r})\n"
              f"labels = DeployRunner.open({str(bundle.root)!r}).predict(frames).labels\n"
              "assert not any(name == 'torch' or name.startswith('torch.') for name in sys.modules if sys.modules[name])\n"
              "print(' '.join(map(str, labels)))\n")
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(label) for label in expected]


def test_bundle_round_trip_keeps_statistics_and_settings(digits_session):
    _, detector, threshold, bundle, _ = digits_session
    loaded = load_bundle(bundle.root)
    np.testing.assert_array_equal(loaded.means, detector.gaussian.means.numpy())
    np.testing.assert_array_equal(loaded.precision, detector.gaussian.precision.numpy())
    assert loaded.threshold == pytest.approx(threshold)
    assert loaded.classes == tuple(str(d) for d in range(9)) and loaded.novel_label == 9
    manifest = json.loads((bundle.root / MANIFEST_FILE).read_text())
    assert manifest["producer"]["torch"] == torch.__version__.split("+")[0]
    assert set(manifest["files"]) == {MODEL_FILE, STATS_FILE}


def test_bundle_refuses_altered_missing_or_foreign_files(digits_session, tmp_path):
    _, detector, threshold, bundle, _ = digits_session
    root = tmp_path / "copy"
    export_bundle(root, bundle.model_path, threshold, bundle.classes, 8, 1, gaussian=detector.gaussian)
    stats = (root / STATS_FILE).read_bytes()
    (root / STATS_FILE).write_bytes(stats[:-4] + b"\0\0\0\0")
    with pytest.raises(StateError, match=r"stats\.safetensors has sha256 .* the manifest expects"):
        load_bundle(root)
    (root / STATS_FILE).unlink()
    with pytest.raises(StateError, match="is missing"):
        load_bundle(root)
    manifest = json.loads((bundle.root / MANIFEST_FILE).read_text())
    (root / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(StateError, match="version 99"):
        load_bundle(root)
    with pytest.raises(StateError, match="cannot read bundle manifest"):
        load_bundle(tmp_path / "nowhere")


def test_bundle_refuses_statistics_of_another_shape(digits_session, tmp_path):
    _, detector, threshold, bundle, _ = digits_session
    with pytest.raises(InputError, match="8 classes"):
        export_bundle(tmp_path / "b", bundle.model_path, threshold, bundle.classes[:8], 8, 1, gaussian=detector.gaussian)


def test_device_profiles_validate_and_choose_their_backends():
    profiles = {name: export_cli.load_device_profile(str(REPO / "configs" / f"{name}.yaml"))
                for name in ("cpu", "rtx-desktop", "jetson-orin")}
    cpu = profiles["cpu"]
    assert (cpu.backbone, cpu.precision, cpu.kernel) == ("onnxruntime", "fp32", "numpy")
    assert (profiles["rtx-desktop"].precision, profiles["rtx-desktop"].kernel) == ("fp16", "cuda_fused")
    assert (profiles["jetson-orin"].precision, profiles["jetson-orin"].backbone) == ("int8", "tensorrt")
    assert profiles["jetson-orin"].batch_size < profiles["rtx-desktop"].batch_size
    with pytest.raises(ConfigError, match="only a 'deploy' section"):
        export_cli.load_device_profile(str(REPO / "configs" / "digits.yaml"))
    with pytest.raises(ConfigError, match="needs backbone 'tensorrt'"):
        DeployConfig(precision="int8")


def test_export_command_writes_a_bundle_whose_decisions_equal_torch(tmp_path):
    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(REPO / "configs" / "digits.yaml"), "--profile",
                              str(REPO / "configs" / "cpu.yaml"), "--out", str(tmp_path), "--set", "train.epochs=2",
                              "--parity-images", "200", "--no-progress"])
    assert export_cli.run(args) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["metrics"]["deploy_decision_agreement/per_sample/onnxruntime-fp32-numpy/digits-9"] == 1.0
    assert result["metrics"]["onnx_max_abs_err/logits/digits-9"] < 1e-3
    assert result["config"]["deploy"]["backbone"] == "onnxruntime"
    assert load_bundle(tmp_path / "bundle").classes == tuple(str(d) for d in range(9))


@pytest.fixture(scope="module")
def adapted_session_file(tmp_path_factory):
    """A digits session adapted on its stream (memory_pu feature heads), saved to a state file."""
    torch.set_num_threads(1)
    cfg = with_overrides(load_config(REPO / "configs" / "digits.yaml"), {"train.epochs": 8, "session.adapt_every": 80})
    split = prepare_data(cfg, progress=False).split
    classifier, _ = train_frozen_classifier(cfg, split, torch.device("cpu"), tmp_path_factory.mktemp("cls"),
                                            progress=False)
    memory, stream = adaptation_data(cfg, split, split.novel_train, classifier, torch.device("cpu"))
    session = Session(cfg, classifier, split.known_classes, memory, "9", device="cpu")
    adapt_session(session, stream, progress=False)
    path = tmp_path_factory.mktemp("session") / "adapted.state"
    session.save(path)
    return path, split.test


def test_adapted_session_exports_its_feature_heads_and_the_runner_decides_alike(adapted_session_file, tmp_path):
    path, test = adapted_session_file
    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    assert export_cli.run(parser.parse_args(["--session", str(path), "--out", str(tmp_path), "--no-progress"])) == 0
    bundle = load_bundle(tmp_path / "bundle")
    session = Session.load(path)
    assert bundle.decision == "feature_heads" and bundle.means is None
    assert len(bundle.heads) == len(session.learner.heads[0].detector.pu_heads)
    assert bundle.threshold == session.learner.heads[0].threshold
    expected, decided = session.predict(test.images), DeployRunner(bundle).predict(test.images)
    # Feature-head scores: float32 numpy vs torch on onnxruntime features (measured max diff ~1e-5).
    np.testing.assert_allclose(decided.scores, expected.scores, rtol=1e-3, atol=1e-3)
    assert (decided.labels == expected.labels).mean() >= 0.998 and decided.novel.any()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["config"]["decision"] == "feature_heads"
    assert result["metrics"]["deploy_decision_agreement/per_sample/onnxruntime-fp32-numpy/digits-9"] >= 0.998


def test_session_export_refuses_what_the_runner_cannot_reproduce(adapted_session_file, tmp_path):
    path, _ = adapted_session_file
    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    with pytest.raises(ConfigError, match="go with --config"):
        export_cli.run(parser.parse_args(["--session", str(path), "--out", str(tmp_path), "--set", "seed=1"]))
    with pytest.raises(SystemExit):  # --config and --session name two sources
        parser.parse_args(["--session", str(path), "--config", "c.yaml", "--out", str(tmp_path)])
    session = Session.load(path)
    session.learner.heads[0].detector.mode = "paper"  # the paper's head scores pixels: not exportable
    with pytest.raises(ConfigError, match="cannot be exported"):
        export_session_bundle(session, tmp_path / "paper", opset=17)


def test_bundle_needs_exactly_one_decision(digits_session, tmp_path):
    _, detector, threshold, bundle, _ = digits_session
    with pytest.raises(InputError, match="exactly one"):
        export_bundle(tmp_path / "none", bundle.model_path, threshold, bundle.classes, 8, 1)
