"""The runner's GPU scoring path: the project's CUDA C kernel (kernels/cuda/last_layer_score.cuh) via pycuda.

kernels/cuda_build.py loads the same kernel for torch sessions, but it (and the `kernels` package)
imports torch, so this module prepares the kernel's operands in numpy instead: the fit's
statistics as `kernels.reference.prepare_last_layer_stats(..., "fp32")` does, the per-sample
operands as `kernels.reference.kernel_operands` does, and the tile table as
`kernels.reference.score_tiles`. tests/test_deploy_tensorrt.py checks each against its torch twin
and runs the kernel source on the CPU through the kernels' host emulation.

Accuracy (the kernel's float32 arithmetic with an fp32 precision): scores within 1e-4 relative of
the numpy scorer on real digits.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.deploy.runner import softmax
from edge_runtime.deploy.tensorrt_engine import require
from edge_runtime.errors import InputError

# Must equal kernels/cuda_build.py's compile_definitions(); a test compares them.
SCORE_TILE_B = 64
SCORE_TILE_K = 32
SCORE_THREADS = 256
KERNEL_FILE = "last_layer_score.cuh"
KERNEL_NAME = "last_layer_score_f32"


@dataclass(frozen=True)
class KernelStats:
    """A fit in the kernel's layout (weight entries first, then the C biases), as the kernel reads it.

    The kernel evaluates (g - mu)^T P (g - mu) as z^T P z + (1 - t)((1 + t) mu^T P mu - 2 g^T P mu)
    with z = g - t mu and t = <g, mu> / |mu|^2 (see kernels.reference.LastLayerStats for why).
    """

    means: np.ndarray  # float32 [C, K] mu_c
    precision_means: np.ndarray  # float32 [C, K] P mu_c
    mean_norms: np.ndarray  # float32 [C] |mu_c|^2
    mean_quadratics: np.ndarray  # float32 [C] mu_c^T P mu_c
    means_absmax: np.ndarray  # float32 [C] max_k |mu_c,k|
    precision: np.ndarray  # float32 [K, K] symmetrised P / precision_scale
    precision_scale: float  # a power of two >= max |P|
    tiles: np.ndarray  # int32 [T, 4]: coef column, x start, k start, length
    num_classes: int
    feature_dim: int


def kernel_order(num_classes: int, feature_dim: int) -> np.ndarray:
    """Indices into the row-major [C, D+1] gradient listing every weight entry first, then the biases."""
    stride = feature_dim + 1
    weights = (np.arange(num_classes)[:, None] * stride + np.arange(feature_dim)[None, :]).ravel()
    return np.concatenate([weights, np.arange(num_classes) * stride + feature_dim])


def score_tiles(num_classes: int, feature_dim: int, tile: int = SCORE_TILE_K) -> np.ndarray:
    """The kernel's tile table: every tile is one coefficient column times a contiguous slice of x."""
    rows = [(c, d, c * feature_dim + d, min(tile, feature_dim - d))
            for c in range(num_classes) for d in range(0, feature_dim, tile)]
    rows += [(num_classes, feature_dim + c, num_classes * feature_dim + c, min(tile, num_classes - c))
             for c in range(0, num_classes, tile)]
    return np.array(rows, dtype=np.int32)


def prepare_kernel_stats(means: np.ndarray, precision: np.ndarray) -> KernelStats:
    """Reorder, symmetrise and scale a fitted (means [C, K], precision [K, K]) in float64, store float32."""
    num_classes, dim = means.shape
    if dim % num_classes or dim // num_classes < 2 or precision.shape != (dim, dim):
        raise InputError(f"means {means.shape} and precision {precision.shape} are not a last-layer fit (K = C*(D+1))")
    feature_dim = dim // num_classes - 1
    order = kernel_order(num_classes, feature_dim)
    mu = means.astype(np.float64)[:, order]
    sym = precision.astype(np.float64)[np.ix_(order, order)]
    sym = (sym + sym.T) / 2
    projected = mu @ sym
    largest = float(np.abs(sym).max())
    scale = 2.0 ** math.ceil(math.log2(largest)) if largest > 0 else 1.0
    return KernelStats(_float32(mu), _float32(projected), _float32((mu * mu).sum(axis=1)),
                       _float32((projected * mu).sum(axis=1)), _float32(np.abs(mu).max(axis=1)), _float32(sym / scale),
                       scale, score_tiles(num_classes, feature_dim), num_classes, feature_dim)


def _float32(values: np.ndarray) -> np.ndarray:
    """Rounded once from float64, contiguous: what the kernel reads."""
    return np.ascontiguousarray(values, dtype=np.float32)


@dataclass(frozen=True)
class KernelOperands:
    """Per-batch kernel inputs instead of the B x K gradient, all float32 [B, ...] and contiguous."""

    x: np.ndarray  # [B, D + C] features then residual
    coef: np.ndarray  # [B, C + 1] residual then 1
    mean_weight: np.ndarray  # [B] t
    scale: np.ndarray  # [B] a power of two >= max |z|
    inv_scale: np.ndarray  # [B]
    correction: np.ndarray  # [B] the score's terms that do not go through P


def kernel_operands(features: np.ndarray, logits: np.ndarray, labels: np.ndarray, stats: KernelStats) -> KernelOperands:
    """The small per-sample arrays the kernel reads, as kernels.reference.kernel_operands builds them."""
    batch = len(labels)
    if features.shape != (batch, stats.feature_dim) or logits.shape != (batch, stats.num_classes):
        raise InputError(f"features {features.shape} / logits {logits.shape} do not fit {batch} samples, "
                         f"D = {stats.feature_dim}, C = {stats.num_classes}")
    tiny = np.finfo(np.float32).tiny
    features = features.astype(np.float32, copy=False)
    residual = softmax(logits.astype(np.float32, copy=False))
    residual[np.arange(batch), labels] -= 1
    norms = stats.mean_norms[labels]
    along_mean = _class_vector_dot(features, residual, labels, stats.means)
    t = np.where(norms > 0, along_mean / np.maximum(norms, tiny), np.float32(0.0)).astype(np.float32)
    correction = (1 - t) * ((1 + t) * stats.mean_quadratics[labels]
                            - 2 * _class_vector_dot(features, residual, labels, stats.precision_means))
    feature_bound = np.maximum(np.abs(features).max(axis=1), np.float32(1.0))  # the bias entry multiplies by 1
    bound = np.abs(residual).max(axis=1) * feature_bound + np.abs(t) * stats.means_absmax[labels]
    scale = np.exp2(np.ceil(np.log2(np.maximum(bound, tiny)))).astype(np.float32)
    x = np.ascontiguousarray(np.concatenate([features, residual], axis=1))
    coef = np.ascontiguousarray(np.concatenate([residual, np.ones((batch, 1), np.float32)], axis=1))
    return KernelOperands(x, coef, t, scale, (np.float32(1.0) / scale).astype(np.float32),
                          correction.astype(np.float32))


def _class_vector_dot(features: np.ndarray, residual: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """<g_b, vectors[y_b]> for kernel-order vectors [C, K] without forming g: sum_c r_c (<a, v_c> + v_c,bias)."""
    batch, feature_dim = features.shape
    num_classes = residual.shape[1]
    rows = vectors[labels]
    weight_part = np.einsum("bcd,bd->bc", rows[:, :num_classes * feature_dim].reshape(batch, num_classes, feature_dim),
                            features)
    return (residual * (weight_part + rows[:, num_classes * feature_dim:])).sum(axis=1)


def scores_from_partials(partial: np.ndarray, operands: KernelOperands, stats: KernelStats) -> np.ndarray:
    """Add the kernel's per-tile sums [T, B] of z^T P z, undo both scalings, add the correction: float32 [B]."""
    quadratic = partial.sum(axis=0) * np.square(operands.scale) * np.float32(stats.precision_scale)
    return (quadratic + operands.correction).astype(np.float32)


def kernel_source_path() -> Path:
    """kernels/cuda/last_layer_score.cuh, found without importing the (torch-importing) kernels package."""
    spec = importlib.util.find_spec("kernels")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the 'kernels' package of this project is not installed; "
                         "the cuda_fused scorer needs its CUDA C source")
    return Path(next(iter(spec.submodule_search_locations))) / "cuda" / KERNEL_FILE


class CudaScorer:
    """Scores on the GPU: statistics uploaded once, per-batch operands uploaded per call."""

    name = "cuda_fused"

    def __init__(self, means: np.ndarray, precision: np.ndarray) -> None:
        compiler = require("pycuda.compiler", "the cuda_fused scoring kernel")
        require("pycuda.autoprimaryctx", "the cuda_fused scoring kernel")  # the context TensorRT uses too
        self._gpuarray = require("pycuda.gpuarray", "the cuda_fused scoring kernel")
        defines = [f"-DSCORE_TILE_B={SCORE_TILE_B}", f"-DSCORE_TILE_K={SCORE_TILE_K}", f"-DSCORE_THREADS={SCORE_THREADS}"]
        module = compiler.SourceModule(kernel_source_path().read_text(), no_extern_c=True, options=["-O3", *defines])
        self._kernel = module.get_function(KERNEL_NAME)
        self.stats = prepare_kernel_stats(means, precision)
        to_gpu = self._gpuarray.to_gpu
        self._means, self._precision, self._tiles = (to_gpu(a) for a in (self.stats.means, self.stats.precision,
                                                                          self.stats.tiles))

    def __call__(self, features: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        operands = kernel_operands(features, logits, labels, self.stats)
        batch, num_tiles = len(labels), len(self.stats.tiles)
        to_gpu = self._gpuarray.to_gpu
        x, coef, mean_weight, inv_scale = (to_gpu(a) for a in (operands.x, operands.coef, operands.mean_weight,
                                                                operands.inv_scale))
        device_labels = to_gpu(np.ascontiguousarray(labels, dtype=np.int64))
        partial = self._gpuarray.empty((num_tiles, batch), np.float32)
        self._kernel(x.gpudata, coef.gpudata, device_labels.gpudata, mean_weight.gpudata, inv_scale.gpudata,
                     self._means.gpudata, self._precision.gpudata, self._tiles.gpudata, partial.gpudata, np.int32(batch),
                     np.int32(self.stats.means.shape[1]), np.int32(operands.x.shape[1]),
                     np.int32(operands.coef.shape[1]), np.int32(num_tiles),
                     block=(SCORE_THREADS, 1, 1), grid=(-(-batch // SCORE_TILE_B), num_tiles))
        return scores_from_partials(partial.get(), operands, self.stats)
