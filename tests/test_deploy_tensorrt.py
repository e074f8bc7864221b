"""The runner's GPU paths: TensorRT engines (version sidecar checked on load) and the CUDA C scoring kernel.

Building and running engines, and launching the kernel through pycuda, skip where tensorrt or
pycuda is absent; the sidecar checks, the kernel's numpy operands and the kernel source itself
(compiled by nvcc, and run on the CPU through the kernels' host emulation) are tested everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

import numpy as np
import pytest
import torch

from classifier_fixture import known_digits, train_digit_classifier
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.deploy.bundle import export_bundle, sha256_file
from edge_runtime.deploy.cuda_scorer import (
    SCORE_THREADS,
    SCORE_TILE_B,
    SCORE_TILE_K,
    kernel_operands,
    kernel_source_path,
    prepare_kernel_stats,
    score_tiles,
    scores_from_partials,
)
from edge_runtime.deploy.onnx_export import export_onnx
from edge_runtime.deploy.runner import DeployRunner, last_layer_scores
from edge_runtime.deploy.tensorrt_engine import (
    DeviceIdentity,
    EngineMetadata,
    build_engine,
    current_identity,
    engine_path_for,
    read_engine_metadata,
    sidecar_path,
    verify_engine,
)
from edge_runtime.detectors.base import Observations
from edge_runtime.detectors.grad_mahalanobis import GradientMahalanobis
from edge_runtime.errors import ConfigError, StateError
from kernels import cuda_build
from kernels.reference import kernel_operands as torch_kernel_operands
from kernels.reference import prepare_last_layer_stats
from kernels.reference import score_tiles as torch_score_tiles

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None
HAS_PYCUDA = importlib.util.find_spec("pycuda") is not None
NEEDS_TENSORRT = pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt or pycuda is not installed (CPU-only CI); "
                                                             "engine build and execution run only on a GPU machine")
ORIN = DeviceIdentity("10.3.0", "Orin", "8.7")
ONNX_SHA = "ab" * 32


def _fake_engine(tmp_path, built_for: DeviceIdentity = ORIN):
    """An engine file (opaque bytes, as far as these checks care) and the sidecar a build would write."""
    engine = engine_path_for(tmp_path, "int8")
    engine.write_bytes(b"serialized engine bytes")
    metadata = EngineMetadata(built_for.tensorrt_version, built_for.device_name, built_for.compute_capability, "int8",
                              ONNX_SHA, sha256_file(engine), 8, (3, 32, 32))
    sidecar_path(engine).write_text(metadata.to_json())
    return engine, metadata


def test_matching_engine_is_accepted_and_its_sidecar_round_trips(tmp_path):
    engine, metadata = _fake_engine(tmp_path)
    assert engine.name == "model.int8.engine" and sidecar_path(engine).name == "model.int8.engine.json"
    assert read_engine_metadata(engine) == metadata
    assert verify_engine(engine, ORIN, ONNX_SHA) == metadata


def test_engine_of_another_tensorrt_version_is_refused_naming_both(tmp_path):
    engine, _ = _fake_engine(tmp_path)
    with pytest.raises(StateError, match=r"built with TensorRT 10\.3\.0 .* this process has TensorRT 10\.7\.0"):
        verify_engine(engine, DeviceIdentity("10.7.0", "Orin", "8.7"), ONNX_SHA)


def test_engine_of_another_device_is_refused_naming_both(tmp_path):
    engine, _ = _fake_engine(tmp_path)
    both = r"'Orin' \(compute capability 8\.7\).*'NVIDIA H100 80GB HBM3' \(compute capability 9\.0\)"
    with pytest.raises(StateError, match=both):
        verify_engine(engine, DeviceIdentity("10.3.0", "NVIDIA H100 80GB HBM3", "9.0"), ONNX_SHA)


def test_engine_of_another_graph_or_replaced_file_is_refused(tmp_path):
    engine, _ = _fake_engine(tmp_path)
    with pytest.raises(StateError, match="built from ONNX sha256 abab"):
        verify_engine(engine, ORIN, "cd" * 32)
    engine.write_bytes(b"an engine built later, without its sidecar")
    with pytest.raises(StateError, match="replaced or truncated"):
        verify_engine(engine, ORIN, ONNX_SHA)


def test_engine_without_a_readable_sidecar_is_refused(tmp_path):
    engine, _ = _fake_engine(tmp_path)
    sidecar_path(engine).write_text(json.dumps({"tensorrt_version": "10.3.0"}))
    with pytest.raises(StateError, match="not a readable engine sidecar"):
        verify_engine(engine, ORIN, ONNX_SHA)
    sidecar_path(engine).unlink()
    with pytest.raises(StateError, match="no readable sidecar"):
        read_engine_metadata(engine)


def test_unknown_precision_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="deploy.precision"):
        engine_path_for(tmp_path, "int4")


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory):
    """A digits bundle (digit 9 held out) as `edge-runtime export` would write it."""
    known_train, _ = known_digits(load_digits_split("train"))
    classifier = train_digit_classifier(known_train)
    with torch.no_grad():
        features, logits = classifier.embed(to_tensor(known_train.images))
    detector = GradientMahalanobis(classifier).fit(Observations(None, features, logits),
                                                   torch.from_numpy(known_train.labels))
    threshold = float(detector.score(Observations(None, features, logits)).quantile(0.95))
    root = tmp_path_factory.mktemp("bundle")
    onnx_path = export_onnx(classifier, root / "model.onnx", input_size=8, in_channels=1)
    return export_bundle(root, onnx_path, threshold, known_train.classes, 8, 1, gaussian=detector.gaussian)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt and pycuda are importable here")
def test_without_tensorrt_building_or_running_an_engine_is_a_clear_config_error(digits_bundle, tmp_path):
    with pytest.raises(ConfigError, match="needs the 'tensorrt' package"):
        build_engine(digits_bundle.model_path, tmp_path / "m.engine", "fp16", 8, (1, 8, 8))
    with pytest.raises(ConfigError, match="needs the 'tensorrt' package"):
        DeployRunner(digits_bundle, backbone="tensorrt", precision="fp16")


@NEEDS_TENSORRT
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_runs_and_matches_the_onnxruntime_runner(digits_bundle, precision):
    engine = engine_path_for(digits_bundle.root, precision)
    metadata = build_engine(digits_bundle.model_path, engine, precision, 16, (1, 8, 8))
    assert metadata == verify_engine(engine, current_identity(), digits_bundle.model_sha256)
    test = load_digits_split("test")
    reference = DeployRunner(digits_bundle, batch_size=16).predict(test.images)
    decisions = DeployRunner(digits_bundle, backbone="tensorrt", precision=precision, batch_size=16).predict(test.images)
    tolerance = 1e-3 if precision == "fp32" else 2e-2
    scale = np.maximum(reference.scores, digits_bundle.threshold)
    assert np.all(np.abs(decisions.scores - reference.scores) <= tolerance * scale)
    assert (decisions.labels == reference.labels).mean() >= (0.999 if precision == "fp32" else 0.98)


@NEEDS_TENSORRT
def test_int8_engine_calibrates_writes_its_cache_and_reuses_it(digits_bundle):
    from calibration.int8 import CalibrationBatches, cache_path_for, entropy_calibrator

    known_train, _ = known_digits(load_digits_split("train"))
    cache = cache_path_for(digits_bundle.root, digits_bundle.model_sha256)
    engine = engine_path_for(digits_bundle.root, "int8")
    batches = CalibrationBatches(known_train, batch_size=16, cache_path=cache)
    build_engine(digits_bundle.model_path, engine, "int8", 16, (1, 8, 8), entropy_calibrator(batches))
    assert cache.stat().st_size > 0
    table = cache.read_bytes()
    build_engine(digits_bundle.model_path, engine, "int8", 16, (1, 8, 8), entropy_calibrator(batches))
    assert cache.read_bytes() == table
    test = load_digits_split("test")
    reference = DeployRunner(digits_bundle, batch_size=16).predict(test.images)
    decisions = DeployRunner(digits_bundle, backbone="tensorrt", precision="int8", batch_size=16).predict(test.images)
    assert (decisions.labels == reference.labels).mean() >= 0.9


@pytest.fixture(scope="module")
def digits_outputs(digits_bundle):
    """Features, logits and predicted labels of 70 real test digits, from the bundle's own graph."""
    features, logits = DeployRunner(digits_bundle).embed(load_digits_split("test").images[:70])
    return features, logits, logits.argmax(axis=1)


def test_numpy_kernel_layout_equals_the_torch_kernels_layout(digits_bundle, digits_outputs):
    """The torch-free operands must stay the kernels' own: any change on either side fails here."""
    assert cuda_build.compile_definitions()[:3] == [f"-DSCORE_TILE_B={SCORE_TILE_B}", f"-DSCORE_TILE_K={SCORE_TILE_K}",
                                                     f"-DSCORE_THREADS={SCORE_THREADS}"]
    stats = prepare_kernel_stats(digits_bundle.means, digits_bundle.precision)
    reference = prepare_last_layer_stats(torch.from_numpy(digits_bundle.means), torch.from_numpy(digits_bundle.precision))
    for name in ("means", "precision_means", "mean_norms", "mean_quadratics", "means_absmax"):
        np.testing.assert_array_equal(getattr(stats, name), getattr(reference, name).numpy(), err_msg=name)
    np.testing.assert_array_equal(stats.precision, reference.precision_parts[0].numpy())
    assert stats.precision_scale == reference.precision_scale
    np.testing.assert_array_equal(stats.tiles, torch_score_tiles(9, 64, cuda_build.SCORE_TILE_K).numpy())
    np.testing.assert_array_equal(score_tiles(3, 70, 32), torch_score_tiles(3, 70, 32).numpy())
    features, logits, labels = digits_outputs
    operands = kernel_operands(features, logits, labels, stats)
    expected = torch_kernel_operands(torch.from_numpy(features), torch.from_numpy(logits).softmax(dim=1),
                                     torch.from_numpy(labels), reference)
    np.testing.assert_allclose(operands.x, expected.x.numpy(), rtol=1e-5, atol=1e-6)
    for name in ("mean_weight", "correction"):  # sums of residuals that cancel: compare on the array's scale
        want = getattr(expected, name).numpy()
        np.testing.assert_allclose(getattr(operands, name), want, rtol=0, atol=1e-4 * float(np.abs(want).max()),
                                   err_msg=name)
    assert np.mean(operands.scale == expected.scale.numpy()) > 0.95  # powers of two: equal unless on a boundary


def test_cuda_kernel_source_scores_like_numpy_under_host_emulation(digits_bundle, digits_outputs):
    try:
        emulated = cuda_build.load_cuda_kernels("host_emulation")
    except ConfigError as exc:
        pytest.skip(f"the CUDA C host emulation cannot be built here: {exc}")
    stats = prepare_kernel_stats(digits_bundle.means, digits_bundle.precision)
    features, logits, labels = digits_outputs
    operands = kernel_operands(features, logits, labels, stats)
    tensors = [torch.from_numpy(a) for a in (operands.x, operands.coef, labels, operands.mean_weight,
                                             operands.inv_scale, stats.means, stats.precision, stats.tiles)]
    scores = scores_from_partials(emulated.last_layer_partials(*tensors, False).numpy(), operands, stats)
    expected = last_layer_scores(features, logits, labels, digits_bundle.means, digits_bundle.precision)
    assert np.all(np.abs(scores - expected) <= 1e-4 * np.maximum(expected, digits_bundle.threshold))


@pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc is not installed; the CUDA C compile check needs it")
def test_the_runner_kernel_source_compiles_alone_for_jetson_orin(tmp_path):
    command = [cuda_build.find_nvcc(), "-x", "cu", "-arch=sm_87", "-cubin", "-O3", "--Werror", "all-warnings",
               f"-DSCORE_TILE_B={SCORE_TILE_B}", f"-DSCORE_TILE_K={SCORE_TILE_K}", f"-DSCORE_THREADS={SCORE_THREADS}",
               "-o", str(tmp_path / "score.cubin"), str(kernel_source_path())]
    build = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0 and not build.stderr.strip(), build.stderr
    assert (tmp_path / "score.cubin").stat().st_size > 0


@pytest.mark.skipif(HAS_PYCUDA, reason="pycuda is importable here")
def test_cuda_kernel_without_pycuda_is_a_clear_config_error(digits_bundle):
    with pytest.raises(ConfigError, match="needs the 'pycuda.compiler' package"):
        DeployRunner(digits_bundle, kernel="cuda_fused")


@pytest.mark.skipif(not HAS_PYCUDA, reason="pycuda is not installed (CPU-only CI); the cuda_fused scorer runs "
                                           "only on a GPU machine")
def test_cuda_scorer_on_the_gpu_matches_numpy(digits_bundle):
    test = load_digits_split("test")
    reference = DeployRunner(digits_bundle).predict(test.images)
    decisions = DeployRunner(digits_bundle, kernel="cuda_fused").predict(test.images)
    assert np.all(np.abs(decisions.scores - reference.scores) <= 1e-4 * np.maximum(reference.scores,
                                                                                   digits_bundle.threshold))
    assert (decisions.labels == reference.labels).mean() >= 0.998
