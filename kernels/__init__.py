"""Compute kernels of the scoring path: pure-torch references first, fused GPU kernels beside them.

- kernels.reference: the float64-checkable maths, the precision variants, the per-fit
  `LastLayerStats`, the closed-form torch path, and the torch per-sample weight gradients
  (unfold + batched outer product).
- kernels.triton_fused / kernels.triton_per_sample: Triton kernels (imported only where Triton is).
- kernels.cuda_build: the CUDA C kernels of kernels/cuda through torch's extension loader or pycuda.
- kernels.dispatch: `score_last_layer` and `per_sample_weight_gradients`, which pick the best
  implementation for the device and return its name with the result.
"""

from kernels.dispatch import (
    GRADIENT_IMPLEMENTATIONS,
    SCORE_IMPLEMENTATIONS,
    per_sample_weight_gradients,
    pick_gradient_implementation,
    pick_score_implementation,
    score_last_layer,
    unavailable_reason,
)
from kernels.reference import (
    PRECISION_VARIANTS,
    LastLayerStats,
    PrecisionVariant,
    prepare_last_layer_stats,
)

__all__ = [
    "GRADIENT_IMPLEMENTATIONS",
    "PRECISION_VARIANTS",
    "SCORE_IMPLEMENTATIONS",
    "LastLayerStats",
    "PrecisionVariant",
    "per_sample_weight_gradients",
    "pick_gradient_implementation",
    "pick_score_implementation",
    "prepare_last_layer_stats",
    "score_last_layer",
    "unavailable_reason",
]
