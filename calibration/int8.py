"""INT8 calibration for TensorRT: known-IDD images in, per-tensor activation ranges (a cache) out.

Two halves. `CalibrationBatches` does everything that does not need TensorRT -- reading images
through the project's loaders, conforming them to the model's input, cutting them into contiguous
float32 batches, and reading / atomically writing the calibration cache -- so it is tested on any
machine. `entropy_calibrator` wraps it in a `tensorrt.IInt8EntropyCalibrator2` subclass, built
only when tensorrt and pycuda import.

The cache is TensorRT's own bytes, unchanged (trtexec --calib reads it too). It is only valid for
the graph it was measured on, so callers name it after the ONNX graph's sha256
(`cache_path_for`): a changed model can never pick up a stale cache.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.atomic import write_bytes_atomic
from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.loader import DEFAULT_CACHE_DIR, load_split
from edge_runtime.data.transforms import conform
from edge_runtime.deploy.tensorrt_engine import require
from edge_runtime.errors import DataError


def cache_path_for(directory: str | os.PathLike, onnx_sha256: str) -> Path:
    """The calibration cache of one ONNX graph, inside `directory`."""
    return Path(directory) / f"int8-calibration-{onnx_sha256[:16]}.cache"


class CalibrationBatches:
    """Full batches of [0,1] float32 NCHW images for a calibrator, and its cache file.

    Only full batches are served: TensorRT calibrates at the calibration profile's fixed batch
    size, so a trailing partial batch (fewer than `batch_size` images) is left out.
    """

    def __init__(self, images: ImageSet, batch_size: int, cache_path: str | os.PathLike) -> None:
        if batch_size < 1:
            raise DataError(f"calibration batch_size must be positive, got {batch_size}")
        if len(images) < batch_size:
            raise DataError(f"{images.name}: {len(images)} calibration images cannot fill one batch of {batch_size}")
        self.images = images
        self.batch_size = batch_size
        self.cache_path = Path(cache_path)
        self._next = 0

    @classmethod
    def from_dataset(cls, dataset: str, split: str, input_size: int, in_channels: int, batch_size: int,
                     cache_path: str | os.PathLike, *, limit: int | None = None, path: str | None = None,
                     cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, seed: int = 0,
                     progress: bool = False) -> CalibrationBatches:
        """Read `split` of a catalog data set, conform it to the model, keep a seeded `limit` of it."""
        data = load_split(dataset, split, path, cache_dir, progress=progress)
        if limit is not None and limit < len(data):
            keep = np.sort(np.random.default_rng(seed).choice(len(data), limit, replace=False))
            data = data.subset(keep)
        return cls(conform(data, input_size, in_channels), batch_size, cache_path)

    def __len__(self) -> int:
        """Number of full batches served per pass."""
        return len(self.images) // self.batch_size

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every batch."""
        _, height, width, channels = self.images.images.shape
        return channels, height, width

    def next_batch(self) -> np.ndarray | None:
        """The next full batch as contiguous float32 [B, C, H, W] in [0, 1], or None when done."""
        if self._next >= len(self):
            return None
        start = self._next * self.batch_size
        self._next += 1
        pixels = self.images.images[start:start + self.batch_size]
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)

    def reset(self) -> None:
        """Start again from the first batch (TensorRT may calibrate more than once)."""
        self._next = 0

    def read_cache(self) -> bytes | None:
        """The cached calibration, or None when there is none yet (TensorRT then calibrates)."""
        try:
            data = self.cache_path.read_bytes()
        except FileNotFoundError:
            return None
        return data or None

    def write_cache(self, data: bytes) -> None:
        """Store TensorRT's calibration table atomically, so a crash never leaves half a cache."""
        write_bytes_atomic(self.cache_path, bytes(data))


def entropy_calibrator(batches: CalibrationBatches) -> Any:
    """A `tensorrt.IInt8EntropyCalibrator2` serving `batches` from one pycuda device buffer."""
    return _entropy_calibrator_class()(batches)


@functools.cache
def _entropy_calibrator_class() -> type:
    """Defined on first use, since its base class exists only where tensorrt imports."""
    trt = require("tensorrt", "INT8 calibration")
    require("pycuda.autoprimaryctx", "INT8 calibration buffers")
    cuda = require("pycuda.driver", "INT8 calibration buffers")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self, batches: CalibrationBatches) -> None:
            super().__init__()
            self.batches = batches
            channels, height, width = batches.input_shape
            self._device = cuda.mem_alloc(batches.batch_size * channels * height * width * 4)

        def get_batch_size(self) -> int:
            return self.batches.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = self.batches.next_batch()
            if batch is None:
                return None
            cuda.memcpy_htod(self._device, batch)
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            return self.batches.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            self.batches.write_cache(bytes(cache))

    return EntropyCalibrator
