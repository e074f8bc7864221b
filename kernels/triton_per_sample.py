"""Per-sample weight gradients of linear and conv layers in Triton (deeper gradient sites).

For one sample b, dL_b/dW is a GEMM between the layer's output gradient and its input: a linear
layer over T positions gives sum_t dy[b,t] (outer) x[b,t]; a conv gives dy[b] [O, L] @ unfold(x[b])^T
[L, I*kh*kw] (L output positions). Both are the batched product out[b] = dy[b] @ cols[b]^T that one
kernel computes, one [BLOCK_O, BLOCK_I] output tile per program, walking L; nothing larger than the
result is written. kernels.reference holds the torch twin and the linear_columns / conv2d_columns
views that feed it; kernels.dispatch.per_sample_weight_gradients puts them together per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edge_runtime.errors import ConfigError, InputError
from kernels.dispatch import triton_interpreted


@triton.jit
def _batched_outer_kernel(dy_ptr, cols_ptr, out_ptr, n_out, n_in, length,
                          dy_sb, dy_so, dy_sl, cols_sb, cols_si, cols_sl, out_sb, out_so, out_si,
                          BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    sample = tl.program_id(2).to(tl.int64)
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    steps = tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for start in range(0, length, BLOCK_L):
        l = start + steps
        dy = tl.load(dy_ptr + sample * dy_sb + o[:, None] * dy_so + l[None, :] * dy_sl,
                     mask=(o < n_out)[:, None] & (l < length)[None, :], other=0.0)
        cols = tl.load(cols_ptr + sample * cols_sb + l[:, None] * cols_sl + i[None, :] * cols_si,
                       mask=(l < length)[:, None] & (i < n_in)[None, :], other=0.0)
        acc = tl.dot(dy.to(tl.float32), cols.to(tl.float32), acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + sample * out_sb + o[:, None] * out_so + i[None, :] * out_si, acc,
             mask=(o < n_out)[:, None] & (i < n_in)[None, :])


def batched_outer(grad_outputs: torch.Tensor, columns: torch.Tensor, *, dot_precision: str = "tf32x3",
                  block_o: int = 32, block_i: int = 64, block_l: int = 32) -> torch.Tensor:
    """out[b] = grad_outputs[b] [O, L] @ columns[b] [I, L]^T, [B, O, I] float32; any strides.

    dot_precision: "tf32x3" (float32 accuracy), "ieee" or "tf32" (fast, ~1e-3 relative).
    """
    if grad_outputs.ndim != 3 or columns.ndim != 3 or grad_outputs.shape[::2] != columns.shape[::2]:
        raise InputError(f"grad_outputs [B, O, L] and columns [B, I, L] disagree: "
                         f"{tuple(grad_outputs.shape)} vs {tuple(columns.shape)}")
    if grad_outputs.device.type != "cuda" and not triton_interpreted():
        raise ConfigError("the Triton per-sample kernel needs CUDA tensors (or TRITON_INTERPRET=1 for testing)")
    batch, n_out, length = grad_outputs.shape
    n_in = columns.shape[1]
    out = torch.empty(batch, n_out, n_in, dtype=torch.float32, device=grad_outputs.device)
    if out.numel():
        grid = (triton.cdiv(n_out, block_o), triton.cdiv(n_in, block_i), batch)
        _batched_outer_kernel[grid](grad_outputs, columns, out, n_out, n_in, length,
                                    *grad_outputs.stride(), *columns.stride(), *out.stride(),
                                    BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_L=block_l, DOT_PRECISION=dot_precision)
    return out
