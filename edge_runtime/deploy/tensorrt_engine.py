"""TensorRT engines of the exported classifier: build (fp32/fp16/int8), version sidecar, execution.

An engine only runs on the TensorRT version and GPU it was built for, and it says nothing about
either when loaded on the wrong one (it fails deep inside, or runs with different kernels). So
every engine gets a JSON sidecar naming the TensorRT version, device, compute capability,
precision and the sha256 of the ONNX graph and of the engine itself; loading checks all of them
and refuses a mismatch with a StateError that names both sides.

tensorrt and pycuda are imported lazily: this module (and the metadata checks) work without them.
Torch-free, like the runner that uses it.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_runtime.atomic import write_bytes_atomic, write_text_atomic
from edge_runtime.deploy.bundle import INPUT_NAME, OUTPUT_NAMES, sha256_file
from edge_runtime.errors import ConfigError, InputError, StateError

PRECISIONS = ("fp32", "fp16", "int8")
SIDECAR_SUFFIX = ".json"


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional accelerator package, or say plainly which one is missing and for what."""
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError) as exc:  # pycuda raises a RuntimeError when no GPU answers
        raise ConfigError(f"{purpose} needs the '{module}' package, which cannot be loaded here ({exc}); "
                          f"use the cpu device profile (backbone onnxruntime, kernel numpy) on this machine") from exc


@dataclass(frozen=True)
class EngineMetadata:
    """What an engine was built from and for; stored beside it as `<engine>.json`."""

    tensorrt_version: str
    device_name: str
    compute_capability: str  # "8.7" for Jetson Orin, "9.0" for H100
    precision: str
    onnx_sha256: str
    engine_sha256: str
    max_batch: int
    input_shape: tuple[int, int, int]  # C, H, W

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, origin: str) -> EngineMetadata:
        try:
            raw = json.loads(text)
            raw["input_shape"] = tuple(raw["input_shape"])
            return cls(**raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{origin} is not a readable engine sidecar ({exc})") from exc


@dataclass(frozen=True)
class DeviceIdentity:
    """The TensorRT version and GPU an engine is about to run on."""

    tensorrt_version: str
    device_name: str
    compute_capability: str


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    engine = Path(engine_path)
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def engine_path_for(bundle_root: str | os.PathLike, precision: str) -> Path:
    """Where a bundle keeps its engine of a given precision (one per precision; built on the target)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"deploy.precision must be one of {PRECISIONS}, got {precision!r}")
    return Path(bundle_root) / f"model.{precision}.engine"


def read_engine_metadata(engine_path: str | os.PathLike) -> EngineMetadata:
    sidecar = sidecar_path(engine_path)
    try:
        text = sidecar.read_text(encoding="utf-8")
    except OSError as exc:
        raise StateError(f"engine {engine_path} has no readable sidecar {sidecar} ({exc.strerror or exc}); "
                         f"rebuild the engine so its TensorRT version and device are recorded") from exc
    return EngineMetadata.from_json(text, str(sidecar))


def verify_engine(engine_path: str | os.PathLike, identity: DeviceIdentity, onnx_sha256: str) -> EngineMetadata:
    """The engine's metadata, after checking it was built here, from this graph, and is intact."""
    metadata = read_engine_metadata(engine_path)
    built = (f"TensorRT {metadata.tensorrt_version} on {metadata.device_name!r} "
             f"(compute capability {metadata.compute_capability})")
    here = (f"TensorRT {identity.tensorrt_version} on {identity.device_name!r} "
            f"(compute capability {identity.compute_capability})")
    if (metadata.tensorrt_version, metadata.device_name, metadata.compute_capability) != (
            identity.tensorrt_version, identity.device_name, identity.compute_capability):
        raise StateError(f"engine {engine_path} was built with {built}, but this process has {here}; "
                         f"rebuild the engine on this device")
    if metadata.onnx_sha256 != onnx_sha256:
        raise StateError(f"engine {engine_path} was built from ONNX sha256 {metadata.onnx_sha256}, but the bundle's "
                         f"model.onnx is {onnx_sha256}; rebuild the engine from this bundle")
    actual = sha256_file(engine_path)
    if actual != metadata.engine_sha256:
        raise StateError(f"engine {engine_path} has sha256 {actual}, its sidecar expects {metadata.engine_sha256} "
                         f"(replaced or truncated); rebuild the engine")
    return metadata


def current_identity() -> DeviceIdentity:
    """TensorRT version and the GPU of the primary CUDA context (needs tensorrt and pycuda)."""
    trt = require("tensorrt", "running a TensorRT engine")
    cuda = _cuda_driver()
    device = cuda.Context.get_device()
    major, minor = device.compute_capability()
    return DeviceIdentity(trt.__version__, device.name(), f"{major}.{minor}")


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, precision: str, max_batch: int,
                 input_shape: tuple[int, int, int], calibrator: Any = None, workspace_mib: int = 1024) -> EngineMetadata:
    """Build and write an engine for batches 1..max_batch, plus its sidecar (engine first, sidecar last).

    int8 needs `calibrator` (calibration.int8.entropy_calibrator) and also enables fp16 so layers
    TensorRT cannot quantise fall back to half rather than float. Written atomically; the sidecar
    carries the engine's sha256, so a crash between the two writes is caught at load time.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"deploy.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and calibrator is None:
        raise ConfigError("an int8 engine needs an entropy calibrator (calibration.int8.entropy_calibrator)")
    if max_batch < 1:
        raise ConfigError(f"deploy.batch_size must be positive, got {max_batch}")
    trt = require("tensorrt", "building a TensorRT engine")
    identity = current_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StateError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *input_shape), (max_batch, *input_shape), (max_batch, *input_shape))
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StateError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see its log above)")
    write_bytes_atomic(engine_path, bytes(serialized))
    metadata = EngineMetadata(identity.tensorrt_version, identity.device_name, identity.compute_capability, precision,
                              sha256_file(onnx_path), sha256_file(engine_path), max_batch, tuple(input_shape))
    write_text_atomic(sidecar_path(engine_path), metadata.to_json())
    return metadata


class TensorRTBackbone:
    """Runs a verified engine with pycuda page-locked host buffers and device buffers sized for max_batch."""

    def __init__(self, engine_path: str | os.PathLike, onnx_sha256: str) -> None:
        trt = require("tensorrt", "the tensorrt backbone")
        cuda = _cuda_driver()
        self.metadata = verify_engine(engine_path, current_identity(), onnx_sha256)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self._engine is None:
            raise StateError(f"TensorRT could not deserialize engine {engine_path}")
        self._context = self._engine.create_execution_context()
        self._cuda = cuda
        self._stream = cuda.Stream()
        batch = self.metadata.max_batch
        self._context.set_input_shape(INPUT_NAME, (batch, *self.metadata.input_shape))
        self._host = {INPUT_NAME: cuda.pagelocked_empty((batch, *self.metadata.input_shape), np.float32)}
        for name in OUTPUT_NAMES:
            shape = tuple(self._context.get_tensor_shape(name))
            self._host[name] = cuda.pagelocked_empty(shape, trt.nptype(self._engine.get_tensor_dtype(name)))
        self._device = {name: cuda.mem_alloc(host.nbytes) for name, host in self._host.items()}
        for name, allocation in self._device.items():
            self._context.set_tensor_address(name, int(allocation))

    @property
    def max_batch(self) -> int:
        return self.metadata.max_batch

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features [B, D], logits [B, C]) float32 for [0,1] float32 NCHW images, B <= max_batch."""
        count = len(images)
        if not 0 < count <= self.max_batch or images.shape[1:] != self.metadata.input_shape:
            raise InputError(f"engine takes 1..{self.max_batch} images of shape {self.metadata.input_shape}, "
                             f"got {images.shape}")
        cuda = self._cuda
        self._host[INPUT_NAME][:count] = images
        self._context.set_input_shape(INPUT_NAME, (count, *self.metadata.input_shape))
        cuda.memcpy_htod_async(self._device[INPUT_NAME], self._host[INPUT_NAME][:count], self._stream)
        if not self._context.execute_async_v3(self._stream.handle):
            raise StateError("TensorRT engine execution failed (see its log above)")
        for name in OUTPUT_NAMES:
            cuda.memcpy_dtoh_async(self._host[name][:count], self._device[name], self._stream)
        self._stream.synchronize()
        features, logits = (self._host[name][:count].astype(np.float32, copy=True) for name in OUTPUT_NAMES)
        return features, logits


def _cuda_driver() -> ModuleType:
    """pycuda's driver bound to the primary context, the one TensorRT's runtime also uses."""
    require("pycuda.autoprimaryctx", "TensorRT device buffers")
    return require("pycuda.driver", "TensorRT device buffers")
