"""INT8 calibration batches and cache on real CIFAR and digits images; the TensorRT calibrator where it imports."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from calibration.int8 import CalibrationBatches, cache_path_for, entropy_calibrator
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.errors import ConfigError, DataError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None


@pytest.fixture(scope="module")
def cifar_cache_dir(tmp_path_factory) -> Path:
    """One decoded-data cache for the module, so the CIFAR tarball is decoded once."""
    return tmp_path_factory.mktemp("data-cache")


def _cifar_batches(shared_data: Path, cache_dir: Path, cache_path: Path) -> CalibrationBatches:
    """40 real CIFAR-10 test images (seeded choice) read through the project's loader, conformed to grey 16x16."""
    return CalibrationBatches.from_dataset(
        "cifar10", "test", input_size=16, in_channels=1, batch_size=16, cache_path=cache_path, limit=40,
        path=str(shared_data / "cifar10-jpeg.tar.gz"), cache_dir=cache_dir, seed=3)


@pytest.fixture(scope="module")
def cifar_batches(shared_data: Path, cifar_cache_dir: Path, tmp_path_factory) -> CalibrationBatches:
    return _cifar_batches(shared_data, cifar_cache_dir, tmp_path_factory.mktemp("int8") / "calibration.cache")


def test_batches_are_full_contiguous_float32_nchw_of_the_conformed_images(cifar_batches):
    assert len(cifar_batches.images) == 40 and len(cifar_batches) == 2
    assert cifar_batches.input_shape == (1, 16, 16)
    served = []
    while (batch := cifar_batches.next_batch()) is not None:
        assert batch.dtype == np.float32 and batch.shape == (16, 1, 16, 16) and batch.flags.c_contiguous
        served.append(batch)
    assert len(served) == 2  # the trailing 8 images would not fill a batch
    expected = to_tensor(cifar_batches.images.images[:32]).numpy()
    np.testing.assert_array_equal(np.concatenate(served), expected)
    assert 0.0 <= expected.min() and expected.max() <= 1.0 and expected.std() > 0.05


def test_reset_replays_the_same_batches(cifar_batches):
    cifar_batches.reset()
    first = cifar_batches.next_batch()
    cifar_batches.reset()
    np.testing.assert_array_equal(cifar_batches.next_batch(), first)


def test_the_seeded_limit_picks_the_same_images(cifar_batches, shared_data, cifar_cache_dir, tmp_path):
    again = _cifar_batches(shared_data, cifar_cache_dir, tmp_path / "c.cache")
    np.testing.assert_array_equal(again.images.images, cifar_batches.images.images)
    assert len(set(again.images.labels.tolist())) > 3


def test_cache_is_absent_then_written_atomically_and_reused(tmp_path):
    digits = load_digits_split("test")
    cache = tmp_path / "int8" / "calibration.cache"
    batches = CalibrationBatches(digits, batch_size=32, cache_path=cache)
    assert batches.read_cache() is None
    table = b"TRT-8601-EntropyCalibration2\nimages: 3c010a14\nfeatures: 3d8a3c1e\n"
    batches.write_cache(memoryview(table))
    assert cache.read_bytes() == table
    assert os.listdir(cache.parent) == ["calibration.cache"]  # no temp file left behind
    reused = CalibrationBatches(digits, batch_size=32, cache_path=cache)
    assert reused.read_cache() == table
    batches.write_cache(table + b"logits: 3e000000\n")
    assert reused.read_cache().endswith(b"logits: 3e000000\n")


def test_cache_file_is_named_after_the_graph():
    first, second = cache_path_for("/b", "ab" * 32), cache_path_for("/b", "cd" * 32)
    assert first != second and first.parent == Path("/b") and "abab" in first.name


def test_too_few_images_for_one_batch_is_a_data_error(tmp_path):
    digits = load_digits_split("test")
    with pytest.raises(DataError, match="cannot fill one batch of 1000"):
        CalibrationBatches(digits, batch_size=1000, cache_path=tmp_path / "c.cache")
    with pytest.raises(DataError, match="positive"):
        CalibrationBatches(digits, batch_size=0, cache_path=tmp_path / "c.cache")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt and pycuda are importable here")
def test_calibrator_without_tensorrt_is_a_clear_config_error(tmp_path):
    batches = CalibrationBatches(load_digits_split("test"), batch_size=32, cache_path=tmp_path / "c.cache")
    with pytest.raises(ConfigError, match="needs the 'tensorrt' package"):
        entropy_calibrator(batches)


@pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt or pycuda is not installed (CPU-only CI); "
                                              "the INT8 entropy calibrator runs only on a GPU machine")
def test_entropy_calibrator_serves_batches_to_tensorrt(tmp_path):
    import tensorrt

    batches = CalibrationBatches(load_digits_split("test"), batch_size=32, cache_path=tmp_path / "c.cache")
    calibrator = entropy_calibrator(batches)
    assert isinstance(calibrator, tensorrt.IInt8EntropyCalibrator2)
    assert calibrator.get_batch_size() == 32
    pointers = calibrator.get_batch(["images"])
    assert len(pointers) == 1 and pointers[0] != 0
    while calibrator.get_batch(["images"]) is not None:
        pass
    assert calibrator.read_calibration_cache() is None
    calibrator.write_calibration_cache(b"table")
    assert calibrator.read_calibration_cache() == b"table"
