"""Fused last-layer gradient Mahalanobis score in Triton; the B x K gradient never reaches memory.

The score (g - mu_y)^T P (g - mu_y), g = (p - onehot(y)) (outer) [a; 1] in kernel order, is split as
z^T P z + correction with z = g - t mu_y (see kernels.reference.LastLayerStats); the correction and
t come from small torch GEMMs, and this kernel does the K x K part. A program owns BLOCK_B samples and
one column tile j of the stored matrix. It rebuilds tiles of z / s (s a per-sample power of two,
|z / s| <= 1) from the residual, the features and the class means, and, P being symmetric, walks row
tiles i <= j only:

    z^T P z = sum_j [ 2 * sum_{i<j} z_i^T P_ij + z_j^T P_jj ] z_j,

half the multiply-adds of the unfused Z @ P. For whitened variants the stored matrix is P's lower
Cholesky factor L, zero above its diagonal, and the program walks row tiles i >= j:

    z^T P z = |L^T z|^2 = sum_j | sum_{i>=j} z_i^T L_ij |^2,

the same multiply-adds. Each program writes one partial sum per sample ([T, B] floats in all); the
wrapper adds them, undoes the scalings and adds the correction.

Accuracy: largest relative error per sample vs float64 `kernels.reference.last_layer_scores` (median in
brackets) over the 539 real digits test images (digit 9 novel), digits MLP D=64, C=9, K=585, predicted
labels, Ledoit-Wolf precision (condition number 1.7e3), measured through Triton's interpreter:
    fp32   (P float32, tl.dot tf32x3 on GPUs)            9e-7 (7e-8)
    bf16x3 (P = hi + lo bf16, products hi*hi+hi*lo+lo*hi) 2e-5 (6e-7)
    fp16x3 (the same with fp16)                          2e-6 (1e-7)
    fp16w  (L and z rounded once to fp16, |L^T z|^2)     5e-4 (3e-5)
    fp16   (P and z rounded once to fp16)                2e-3 (4e-5)
    bf16w  (L and z rounded once to bf16, |L^T z|^2)     4e-3 (2e-4)
    bf16   (P and z rounded once to bf16)                2e-2 (5e-4)
With an ill-conditioned precision (ridge shrinkage, condition 2e5) the interpreter gives fp32 7e-6,
bf16x3 2e-4, fp16w 9e-4, fp16 1e-2, bf16w 1e-2, bf16 6e-2: rounding P leaks its large eigenvalues,
which sit on directions the IDD gradients hardly visit, into the directions they do. Rounding the
factor L leaks far less, and less so as the condition grows (from the first precision to this one
fp16w's error doubles, fp16's grows 7x), so fp16w is the one-product 16-bit variant within 1e-3 on both precisions (with predicted labels; 2e-3 on the
ridge one with wrong given labels). bf16w gains 5x over bf16 but is not, so bf16x3 stays the
variant for bf16 matrix units when the score must stay within 1e-3.
tests/test_kernels_triton.py measures these bounds again on every run.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from edge_runtime.errors import ConfigError
from kernels.dispatch import triton_interpreted
from kernels.reference import (
    PRECISION_VARIANTS,
    LastLayerStats,
    kernel_operands,
    score_tiles,
    scores_from_partials,
)

DEFAULT_BLOCK_B = 64
DEFAULT_BLOCK_T = 64


@triton.jit
def _round_to_bf16(x):
    """Round float32 to the nearest bf16 (ties to even), kept in float32.

    Done with integer operations because Triton 3.8's interpreter rounds float32 -> bf16 casts
    wrongly; on a GPU this is as exact as the hardware conversion.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """x rounded to DTYPE's precision, still float32 (so a hi/lo split can subtract it)."""
    if DTYPE == tl.bfloat16:
        return _round_to_bf16(x)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b, a float32 holding values exact in b's element type, float32 accumulation."""
    if b.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    elif INTERPRETED:
        # The interpreter multiplies bf16 bit patterns as integers; float32 products of the same values are exact.
        return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _z_tile(tiles_ptr, t, x_ptr, coef_ptr, means_ptr, rows, row_ok, labels, mean_weight, inv_scale, cols,
            x_stride, coef_stride, dim):
    """Tile t of z / s = (g - t_b mu_y) / s for the program's rows, float32 [BLOCK_B, BLOCK_T], zero outside."""
    coef_col = tl.load(tiles_ptr + 4 * t)
    x_start = tl.load(tiles_ptr + 4 * t + 1)
    k_start = tl.load(tiles_ptr + 4 * t + 2)
    length = tl.load(tiles_ptr + 4 * t + 3)
    ok = row_ok[:, None] & (cols < length)[None, :]
    coef = tl.load(coef_ptr + rows * coef_stride + coef_col, mask=row_ok, other=0.0)
    x = tl.load(x_ptr + rows[:, None] * x_stride + x_start + cols[None, :], mask=ok, other=0.0)
    mu = tl.load(means_ptr + labels[:, None] * dim + k_start + cols[None, :], mask=ok, other=0.0)
    return (coef[:, None] * x - mean_weight[:, None] * mu) * inv_scale[:, None]


@triton.jit
def _times_precision_tile(z, p_hi_ptr, p_lo_ptr, offsets, mask, acc, SPLIT: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + z @ P_tile, with P_tile = hi (+ lo) and, when split, hi*hi + hi*lo + lo*hi."""
    p_hi = tl.load(p_hi_ptr + offsets, mask=mask, other=0.0)
    z_hi = _round_to(z, p_hi.dtype)
    acc = _mma(z_hi, p_hi, acc, DOT_PRECISION, INTERPRETED)
    if SPLIT:
        p_lo = tl.load(p_lo_ptr + offsets, mask=mask, other=0.0)
        acc = _mma(z_hi, p_lo, acc, DOT_PRECISION, INTERPRETED)
        acc = _mma(_round_to(z - z_hi, p_hi.dtype), p_hi, acc, DOT_PRECISION, INTERPRETED)
    return acc


@triton.jit
def _add_row_tile(acc, i, k_j, col_ok, tiles_ptr, x_ptr, coef_ptr, means_ptr, p_hi_ptr, p_lo_ptr, rows, row_ok,
                  labels, mean_weight, inv_scale, cols, x_stride, coef_stride, dim, SPLIT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """(acc + z_i @ M_ij, z_i): row tile i of z / s times block (i, j) of the stored matrix M."""
    z_i = _z_tile(tiles_ptr, i, x_ptr, coef_ptr, means_ptr, rows, row_ok, labels, mean_weight, inv_scale, cols,
                  x_stride, coef_stride, dim)
    k_i = tl.load(tiles_ptr + 4 * i + 2).to(tl.int64)  # K * K may pass 2^31
    offsets = (k_i + cols)[:, None] * dim + (k_j + cols)[None, :]
    mask = (cols < tl.load(tiles_ptr + 4 * i + 3))[:, None] & col_ok[None, :]
    return _times_precision_tile(z_i, p_hi_ptr, p_lo_ptr, offsets, mask, acc, SPLIT, DOT_PRECISION, INTERPRETED), z_i


@triton.jit
def _fused_score_kernel(x_ptr, coef_ptr, labels_ptr, mean_weight_ptr, inv_scale_ptr, means_ptr, p_hi_ptr, p_lo_ptr,
                        tiles_ptr, partial_ptr, batch, dim, x_stride, coef_stride, num_tiles,
                        BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT: tl.constexpr, WHITENED: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    # Row tiles walked for column tile j, the longest walks launched first: i < j of P's upper half
    # (the diagonal block comes last, below), or i >= j of the lower factor L (zero above its diagonal).
    if WHITENED:
        j = tl.program_id(1)
        first, stop = j, num_tiles
    else:
        j = num_tiles - 1 - tl.program_id(1)
        first, stop = 0, j
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    mean_weight = tl.load(mean_weight_ptr + rows, mask=row_ok, other=0.0)
    inv_scale = tl.load(inv_scale_ptr + rows, mask=row_ok, other=0.0)
    cols = tl.arange(0, BLOCK_T)
    k_j = tl.load(tiles_ptr + 4 * j + 2).to(tl.int64)
    col_ok = cols < tl.load(tiles_ptr + 4 * j + 3)
    acc = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32)
    for i in range(first, stop):
        acc, _ = _add_row_tile(acc, i, k_j, col_ok, tiles_ptr, x_ptr, coef_ptr, means_ptr, p_hi_ptr, p_lo_ptr, rows,
                               row_ok, labels, mean_weight, inv_scale, cols, x_stride, coef_stride, dim, SPLIT,
                               DOT_PRECISION, INTERPRETED)
    if WHITENED:
        partial = tl.sum(acc * acc, axis=1)  # acc is column tile j of z^T L
    else:
        acc = acc * 2.0  # every off-diagonal block of the symmetric P is met once but counts twice
        acc, z_j = _add_row_tile(acc, j, k_j, col_ok, tiles_ptr, x_ptr, coef_ptr, means_ptr, p_hi_ptr, p_lo_ptr, rows,
                                 row_ok, labels, mean_weight, inv_scale, cols, x_stride, coef_stride, dim, SPLIT,
                                 DOT_PRECISION, INTERPRETED)
        partial = tl.sum(acc * z_j, axis=1)
    tl.store(partial_ptr + j * batch + rows, partial, mask=row_ok)


@lru_cache(maxsize=32)
def _device_tiles(num_classes: int, feature_dim: int, tile: int, device: torch.device) -> torch.Tensor:
    return score_tiles(num_classes, feature_dim, tile).to(device)


def fused_last_layer_scores(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor,
                            stats: LastLayerStats, *, block_b: int = DEFAULT_BLOCK_B, block_t: int = DEFAULT_BLOCK_T,
                            dot_precision: str = "tf32x3", num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Gradient Mahalanobis scores [B] float32 of the last layer, in the stats' precision variant.

    features [B, D], probs [B, C] (softmax outputs), labels [B] int64, all on the stats' device.
    `dot_precision` only applies to the fp32 variant: "tf32x3" (float32 accuracy on tensor
    cores), "ieee" (plain float32 FMA) or "tf32" (fast, about 1e-3 relative per product).
    block_b and block_t are powers of two >= 16.
    """
    if stats.device.type != "cuda" and not triton_interpreted():
        raise ConfigError("triton_fused needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU for testing)")
    operands = kernel_operands(features, probs, labels, stats)
    batch = len(labels)
    tiles = _device_tiles(stats.num_classes, stats.feature_dim, block_t, stats.device)
    partial = torch.empty(len(tiles), batch, dtype=torch.float32, device=stats.device)
    if batch:
        p_hi, p_lo = stats.precision_parts[0], stats.precision_parts[-1]
        spec = PRECISION_VARIANTS[stats.variant]
        grid = (triton.cdiv(batch, block_b), len(tiles))
        _fused_score_kernel[grid](operands.x, operands.coef, labels.contiguous(), operands.mean_weight,
                                  operands.inv_scale, stats.means, p_hi, p_lo, tiles, partial, batch, stats.dim,
                                  operands.x.stride(0), operands.coef.stride(0), len(tiles), BLOCK_B=block_b, BLOCK_T=block_t,
                                  SPLIT=spec.parts == 2, WHITENED=spec.whitened, DOT_PRECISION=dot_precision,
                                  INTERPRETED=triton_interpreted(), num_warps=num_warps, num_stages=num_stages)
    return scores_from_partials(partial, operands, stats)
