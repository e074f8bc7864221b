"""Pick the best available implementation of each kernel for the device, and say which one ran.

Scoring (`score_last_layer`), best first:
- "triton_fused": CUDA device and Triton installed (desktop RTX, data-centre GPUs);
- "cuda_fused":   CUDA device without Triton (Jetson): the CUDA C kernel via torch's extension
                  loader or pycuda; it reads P (or, whitened, its Cholesky factor) in one part, so
                  split variants (bf16x3, fp16x3) fall back to closed_form;
- "closed_form":  pure torch, any device (the CPU choice).
Per-sample weight gradients of deeper layers (`per_sample_weight_gradients`): "triton", "cuda",
"torch" in the same order. Asking for an implementation the machine cannot run is a ConfigError
that says why, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from edge_runtime.errors import ConfigError, InputError
from kernels.cuda_build import cuda_batched_outer, cuda_last_layer_scores, cuda_precision_refusal
from kernels.reference import (
    PRECISION_VARIANTS,
    LastLayerStats,
    batched_outer_product,
    closed_form_scores,
    conv2d_columns,
    linear_columns,
)

SCORE_IMPLEMENTATIONS = ("triton_fused", "cuda_fused", "closed_form")
GRADIENT_IMPLEMENTATIONS = ("triton", "cuda", "torch")


def triton_interpreted() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(impl: str, device: torch.device | str) -> str | None:
    """Why `impl` (a scoring or gradient implementation) cannot run on `device`, or None when it can."""
    device = torch.device(device)
    if impl in ("closed_form", "torch"):
        return None
    if impl in ("triton_fused", "triton"):
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        if device.type != "cuda" and not triton_interpreted():
            return f"Triton kernels run on CUDA devices (or with TRITON_INTERPRET=1), not on {device.type}"
        return None
    if impl in ("cuda_fused", "cuda"):
        return None if device.type == "cuda" else f"CUDA C kernels run on CUDA devices, not on {device.type}"
    raise ConfigError(f"unknown kernel implementation {impl!r}; scoring: {SCORE_IMPLEMENTATIONS}, "
                      f"per-sample gradients: {GRADIENT_IMPLEMENTATIONS}")


def pick_score_implementation(device: torch.device | str, variant: str = "fp32") -> str:
    """The implementation `score_last_layer(impl="auto")` uses on `device` for stats of `variant`."""
    if variant not in PRECISION_VARIANTS:
        raise ConfigError(f"precision variant must be one of {sorted(PRECISION_VARIANTS)}, got {variant!r}")
    device = torch.device(device)
    if device.type != "cuda":
        return "closed_form"
    if unavailable_reason("triton_fused", device) is None:
        return "triton_fused"
    return "closed_form" if cuda_precision_refusal(variant) else "cuda_fused"


def pick_gradient_implementation(device: torch.device | str) -> str:
    """The implementation `per_sample_weight_gradients(impl="auto")` uses on `device`."""
    device = torch.device(device)
    if device.type != "cuda":
        return "torch"
    return "triton" if unavailable_reason("triton", device) is None else "cuda"


def score_last_layer(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor | None,
                     stats: LastLayerStats, *, impl: str = "auto", from_logits: bool = False) -> tuple[torch.Tensor, str]:
    """(gradient Mahalanobis scores [B] float32, name of the implementation that computed them).

    features [B, D] and probs [B, C] come from the frozen classifier (`from_logits=True` takes logits
    and applies the softmax); labels [B] int64 are the chosen labels, or None for the predicted ones.
    `stats` is a `kernels.reference.LastLayerStats` (prepare_last_layer_stats(means, precision,
    variant) once per fit), on the same device as the batch.
    """
    if from_logits:
        probs = probs.float().softmax(dim=1)
    if labels is None:
        labels = probs.argmax(dim=1)
    chosen = pick_score_implementation(stats.device, stats.variant) if impl == "auto" else impl
    if chosen not in SCORE_IMPLEMENTATIONS:
        raise ConfigError(f"scoring implementation must be 'auto' or one of {SCORE_IMPLEMENTATIONS}, got {impl!r}")
    reason = unavailable_reason(chosen, stats.device)
    if reason is not None:
        raise ConfigError(f"scoring implementation {chosen!r} is unavailable: {reason}")
    if chosen == "triton_fused":
        from kernels.triton_fused import fused_last_layer_scores

        return fused_last_layer_scores(features, probs, labels, stats), chosen
    if chosen == "cuda_fused":
        return cuda_last_layer_scores(features, probs, labels, stats), chosen
    return closed_form_scores(features, probs, labels, stats), chosen


def per_sample_weight_gradients(layer: nn.Module, inputs: torch.Tensor, grad_outputs: torch.Tensor, *,
                                impl: str = "auto") -> tuple[torch.Tensor, str]:
    """(per-sample dL/dW [B, *layer.weight.shape] float32, implementation name) for an nn.Linear or nn.Conv2d.

    inputs are the layer's inputs and grad_outputs each sample's own loss gradient w.r.t. the
    layer's outputs (as a backward hook sees them). A bias gradient, where wanted, is grad_outputs
    summed over positions and needs no kernel.
    """
    if impl == "auto":
        impl = pick_gradient_implementation(inputs.device)
    elif impl not in GRADIENT_IMPLEMENTATIONS:
        raise ConfigError(f"per-sample gradient implementation must be 'auto' or one of {GRADIENT_IMPLEMENTATIONS}, "
                          f"got {impl!r}")
    reason = unavailable_reason(impl, inputs.device)
    if reason is not None:
        raise ConfigError(f"per-sample gradient implementation {impl!r} is unavailable: {reason}")
    if isinstance(layer, nn.Linear):
        columns, flat_grad = linear_columns(inputs, grad_outputs)
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise InputError("per-sample conv gradients need groups=1, numeric padding and padding_mode='zeros', got "
                             f"groups={layer.groups}, padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
        columns, flat_grad = conv2d_columns(inputs, grad_outputs, layer.kernel_size, layer.stride, layer.padding,
                                            layer.dilation)
    else:
        raise InputError(f"per-sample weight gradients are implemented for nn.Linear and nn.Conv2d, "
                         f"not {type(layer).__name__}")
    if impl == "triton":
        from kernels.triton_per_sample import batched_outer

        product = batched_outer(flat_grad, columns)
    elif impl == "cuda":
        product = cuda_batched_outer(flat_grad, columns)
    else:
        product = batched_outer_product(flat_grad.float(), columns.float())
    return product.reshape(len(inputs), *layer.weight.shape), impl
