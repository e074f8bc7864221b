"""Pure-torch maths of the gradient-Mahalanobis scoring path.

These are the correctness references that fused Triton / CUDA kernels are tested against, so they
favour plain, obviously-right formulas over speed. The cross-entropy gradient of a final linear
layer z = W a + b has the closed form dL/dW = (softmax(z) - onehot(y)) a^T, dL/db = softmax(z) -
onehot(y): no autograd pass is needed to get per-sample gradients.

Beside them live the pieces every scoring implementation shares: the per-fit `LastLayerStats`, the
per-batch `KernelOperands`, the unfused closed-form torch path (the CPU implementation and the
timing baseline), and the torch per-sample weight gradients of deeper layers (unfold + batched
outer product) that the Triton and CUDA C versions are checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from edge_runtime.errors import InputError


def softmax_residual(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """probs - onehot(labels), [B, C]: the gradient of cross-entropy w.r.t. the logits."""
    _check_probs_labels(probs, labels)
    residual = probs.clone()
    residual[torch.arange(len(labels), device=labels.device), labels] -= 1
    return residual


def last_layer_gradients(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient w.r.t. the final linear layer's [weight | bias], [B, C*(D+1)].

    Row-major flattening of the [C, D+1] matrix (probs - onehot) (outer) [features; 1]: entry
    c*(D+1) + d is dL/dW[c, d] for d < D and dL/db[c] for d = D.
    """
    if features.ndim != 2 or len(features) != len(probs):
        raise InputError(f"features must be [B, D] with B = {len(probs)} rows of probs, got {tuple(features.shape)}")
    residual = softmax_residual(probs, labels)
    augmented = torch.cat([features, features.new_ones(len(features), 1)], dim=1)
    return (residual.unsqueeze(2) * augmented.unsqueeze(1)).flatten(1)


def penultimate_gradients(weight: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient w.r.t. the final layer's input features, (probs - onehot) @ W, [B, D]."""
    if weight.ndim != 2 or weight.shape[0] != probs.shape[-1]:
        raise InputError(f"weight must be [C, D] with C = {probs.shape[-1]} classes of probs, got {tuple(weight.shape)}")
    return softmax_residual(probs, labels) @ weight


def mahalanobis_scores(
    x: torch.Tensor, means: torch.Tensor, labels: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """(x - mu_y)^T P (x - mu_y) per row, [B], with mu_y the mean of each row's label."""
    if x.ndim != 2 or means.ndim != 2 or means.shape[1] != x.shape[1]:
        raise InputError(f"x [B, K] and means [C, K] disagree: {tuple(x.shape)} vs {tuple(means.shape)}")
    if precision.shape != (x.shape[1], x.shape[1]):
        raise InputError(f"precision must be [{x.shape[1]}, {x.shape[1]}], got {tuple(precision.shape)}")
    _check_labels(labels, len(x), len(means))
    centred = x - means[labels]
    return ((centred @ precision) * centred).sum(dim=1)


def last_layer_scores(
    features: torch.Tensor,
    probs: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    precision: torch.Tensor,
) -> torch.Tensor:
    """Mahalanobis score of each sample's last-layer gradient: what a fused kernel must reproduce."""
    return mahalanobis_scores(last_layer_gradients(features, probs, labels), means, labels, precision)


def _check_probs_labels(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.ndim != 2:
        raise InputError(f"probs must be [B, C], got {tuple(probs.shape)}")
    _check_labels(labels, len(probs), probs.shape[1])


def _check_labels(labels: torch.Tensor, batch: int, num_classes: int) -> None:
    if labels.shape != (batch,) or labels.dtype != torch.long:
        raise InputError(f"labels must be int64 [{batch}], got {labels.dtype} {tuple(labels.shape)}")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")


# --- Precomputed statistics and the closed-form torch path shared by every scoring kernel -------------------------

@dataclass(frozen=True)
class PrecisionVariant:
    """How a variant stores P and multiplies by it.

    dtype:    element type of the stored matrix.
    parts:    1: the matrix rounded once; 2: it is hi + lo, each rounded to dtype, multiplied as
              hi*hi + hi*lo + lo*hi (three products, about 16 significant bits for bf16) so that a
              low-precision matrix unit keeps most of fp32's accuracy.
    whitened: the stored matrix is P's lower Cholesky factor L and z^T P z is computed as |L^T z|^2.
              Rounding L instead of P lowers the worst-case relative error from about the unit
              roundoff times condition(P) to times sqrt(condition(P)), for the same multiply-adds
              (L is triangular as P's upper half is). On the real digits case of kernels/triton_fused.py the largest
              relative error is fp16w 5e-4 vs fp16 2e-3 and bf16w 4e-3 vs bf16 2e-2 (Ledoit-Wolf
              precision, condition 1.7e3); fp16w 9e-4 vs fp16 1e-2 and bf16w 1e-2 vs bf16 6e-2
              (ridge precision, condition 2e5). It needs P positive definite.
    """

    dtype: torch.dtype
    parts: int
    whitened: bool = False


PRECISION_VARIANTS: dict[str, PrecisionVariant] = {
    "fp32": PrecisionVariant(torch.float32, 1),
    "bf16": PrecisionVariant(torch.bfloat16, 1),
    "fp16": PrecisionVariant(torch.float16, 1),
    "bf16x3": PrecisionVariant(torch.bfloat16, 2),
    "fp16x3": PrecisionVariant(torch.float16, 2),
    "bf16w": PrecisionVariant(torch.bfloat16, 1, whitened=True),
    "fp16w": PrecisionVariant(torch.float16, 1, whitened=True),
}


def kernel_order(num_classes: int, feature_dim: int) -> torch.Tensor:
    """Indices into the row-major [C, D+1] gradient that list every weight entry first, then the C biases.

    With the biases moved to the end, each class's D weight entries are one contiguous run, so a
    kernel's tiles line up with the feature vector whenever D is a multiple of the tile width.
    """
    stride = feature_dim + 1
    weights = (torch.arange(num_classes)[:, None] * stride + torch.arange(feature_dim)[None, :]).flatten()
    return torch.cat([weights, torch.arange(num_classes) * stride + feature_dim])


def score_tiles(num_classes: int, feature_dim: int, tile: int) -> torch.Tensor:
    """The tiles a fused kernel walks over the kernel-order gradient, int32 [T, 4].

    Each row is (coefficient column, start in x, start in K, length): the tile's entries are
    coef[:, column] * x[:, start : start + length] with x = [features | residual] [B, D + C] and
    coef = [residual | 1] [B, C + 1]. Weight tiles never straddle two classes, so every tile is one
    row coefficient times a contiguous slice of x; the C bias entries get tiles of their own.
    """
    rows = [(c, d, c * feature_dim + d, min(tile, feature_dim - d))
            for c in range(num_classes) for d in range(0, feature_dim, tile)]
    rows += [(num_classes, feature_dim + c, num_classes * feature_dim + c, min(tile, num_classes - c))
             for c in range(0, num_classes, tile)]
    return torch.tensor(rows, dtype=torch.int32)


@dataclass(frozen=True)
class LastLayerStats:
    """Everything a scoring kernel needs from one fit, computed once in float64, kept in kernel order.

    Kernels evaluate (g - mu)^T P (g - mu) as z^T P z + (1 - t) ((1 + t) mu^T P mu - 2 g^T P mu) with
    z = g - t mu and t = <g, mu> / |mu|^2 per sample (mu = mu_y). That t makes z as short as it can
    be, and only z^T P z meets the rounded P: on real digits it cuts the bf16/fp16 error 5-10x
    against centring (t = 1) or expanding (t = 0), because confident samples have g near 0 while
    mu_y is not. The other terms need only the per-class vectors below (a [B, C*C] GEMM).

    means:             [C, K] float32 class means mu_c.
    precision_means:   [C, K] float32 P mu_c.
    mean_norms:        [C] float32 |mu_c|^2.
    mean_quadratics:   [C] float32 mu_c^T P mu_c.
    means_absmax:      [C] float32 max_k |mu_c,k| (to bound |z| for the per-sample scaling).
    precision_parts:   one or two [K, K] tensors of the variant's element type. Plain variants: their
                       sum is P / precision_scale (P symmetrised, in kernel order; kernels read its
                       upper triangle, tiles i <= j). Whitened variants: one lower-triangular part L
                       with L L^T = P / precision_scale (entries above the diagonal are zero and
                       never read; kernels read tiles i >= j).
    precision_scale:   a power of two with every stored entry in [-1, 1] (fp16 range): >= max |P|,
                       or for whitened variants the square of a power of two >= max |L|.
    variant:           a key of PRECISION_VARIANTS.
    """

    means: torch.Tensor
    precision_means: torch.Tensor
    mean_norms: torch.Tensor
    mean_quadratics: torch.Tensor
    means_absmax: torch.Tensor
    precision_parts: tuple[torch.Tensor, ...]
    precision_scale: float
    variant: str
    num_classes: int
    feature_dim: int

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device: torch.device | str) -> LastLayerStats:
        tensors = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **tensors, precision_parts=tuple(part.to(device) for part in self.precision_parts))


def prepare_last_layer_stats(means: torch.Tensor, precision: torch.Tensor, variant: str = "fp32") -> LastLayerStats:
    """Reorder, symmetrise, scale and round a fitted (means [C, K], precision [K, K]) for the kernels.

    K must be C * (D + 1) in the row-major layout of `last_layer_gradients`. The work (the Cholesky
    factorisation too, for whitened variants) is done in float64 so that the only rounding is the
    final one to the variant's element type. Whitened variants refuse a P that is not positive
    definite with an InputError.
    """
    if variant not in PRECISION_VARIANTS:
        raise InputError(f"precision variant must be one of {sorted(PRECISION_VARIANTS)}, got {variant!r}")
    if means.ndim != 2 or means.shape[1] % means.shape[0] or means.shape[1] // means.shape[0] < 2:
        raise InputError(f"means must be [C, C*(D+1)] with D >= 1, got {tuple(means.shape)}")
    num_classes, dim = means.shape
    if precision.shape != (dim, dim):
        raise InputError(f"precision must be [{dim}, {dim}] to match means, got {tuple(precision.shape)}")
    order = kernel_order(num_classes, dim // num_classes - 1).to(means.device)
    mu = means.double()[:, order]
    sym = precision.double()[order][:, order]
    sym = (sym + sym.T) / 2
    projected = mu @ sym
    spec = PRECISION_VARIANTS[variant]
    if spec.whitened:
        factor = _cholesky_factor(sym, variant)
        factor_scale = _power_of_two_bound(factor)
        stored, scale = factor / factor_scale, factor_scale ** 2
    else:
        scale = _power_of_two_bound(sym)
        stored = sym / scale
    return LastLayerStats(
        means=mu.float().contiguous(), precision_means=projected.float().contiguous(),
        mean_norms=(mu * mu).sum(dim=1).float(), mean_quadratics=(projected * mu).sum(dim=1).float(),
        means_absmax=mu.abs().amax(dim=1).float(), precision_parts=_rounded_parts(stored, spec),
        precision_scale=scale, variant=variant, num_classes=num_classes, feature_dim=dim // num_classes - 1)


def _cholesky_factor(sym: torch.Tensor, variant: str) -> torch.Tensor:
    """Lower L with L L^T = sym (float64); a whitened variant needs P positive definite."""
    factor, info = torch.linalg.cholesky_ex(sym)
    if int(info) != 0:
        plain = ", ".join(name for name, spec in PRECISION_VARIANTS.items() if not spec.whitened)
        raise InputError(f"precision variant {variant!r} stores P's Cholesky factor, but P is not positive definite "
                         f"(its leading minor of order {int(info)} in kernel order is not), as with a pseudo-inverse "
                         f"of a singular covariance; the un-whitened variants ({plain}) take any symmetric P")
    return factor


def _power_of_two_bound(matrix: torch.Tensor) -> float:
    """The smallest power of two >= max |matrix| (1 for a zero matrix): dividing by it is exact."""
    largest = float(matrix.abs().max())
    return 2.0 ** math.ceil(math.log2(largest)) if largest > 0 else 1.0


def _rounded_parts(matrix: torch.Tensor, spec: PrecisionVariant) -> tuple[torch.Tensor, ...]:
    """matrix (float64) as spec.parts tensors of spec.dtype whose sum rounds it as closely as they can."""
    remainder, rounded = matrix, []
    for _ in range(spec.parts):
        rounded.append(remainder.to(spec.dtype).contiguous())
        remainder = remainder - rounded[-1].double()
    return tuple(rounded)


@dataclass(frozen=True)
class KernelOperands:
    """The small per-batch tensors a fused kernel reads instead of the B x K gradient (see `score_tiles`).

    x [B, D + C] = [features | residual] and coef [B, C + 1] = [residual | 1], float32, contiguous;
    mean_weight [B] is t; scale [B] a power of two >= max |z| (z / scale lies in [-1, 1], exactly
    representable scaling), inv_scale its reciprocal; correction [B] the terms of the score that
    do not go through P (see LastLayerStats).
    """

    x: torch.Tensor
    coef: torch.Tensor
    mean_weight: torch.Tensor
    scale: torch.Tensor
    inv_scale: torch.Tensor
    correction: torch.Tensor


def kernel_operands(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor,
                    stats: LastLayerStats) -> KernelOperands:
    """Everything per batch that a fused kernel needs besides the stats; O(B * (D + C * C)) work."""
    _check_last_layer_inputs(features, probs, labels, stats)
    features = features.float()
    residual = softmax_residual(probs.float(), labels)
    norms = stats.mean_norms[labels]
    quadratics = stats.mean_quadratics[labels]
    along_mean = _class_vector_dot(features, residual, labels, stats.means)
    t = torch.where(norms > 0, along_mean / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    correction = (1 - t) * ((1 + t) * quadratics - 2 * _class_vector_dot(features, residual, labels,
                                                                          stats.precision_means))
    feature_bound = features.abs().amax(dim=1).clamp_min(1.0)  # the bias entry multiplies by 1
    bound = residual.abs().amax(dim=1) * feature_bound + t.abs() * stats.means_absmax[labels]
    scale = torch.exp2(torch.ceil(torch.log2(bound.clamp_min(torch.finfo(torch.float32).tiny))))
    x = torch.cat([features, residual], dim=1).contiguous()
    coef = torch.cat([residual, residual.new_ones(len(residual), 1)], dim=1).contiguous()
    return KernelOperands(x, coef, t.contiguous(), scale, (1.0 / scale).contiguous(), correction)


def _class_vector_dot(features: torch.Tensor, residual: torch.Tensor, labels: torch.Tensor,
                      vectors: torch.Tensor) -> torch.Tensor:
    """<g_b, vectors[y_b]> for kernel-order vectors [C, K], without forming g: sum_c r_c (<a, w_c> + w_c,bias)."""
    batch, feature_dim = features.shape
    num_classes = residual.shape[1]
    blocks = vectors[:, : num_classes * feature_dim].reshape(num_classes * num_classes, feature_dim)
    weight_part = (features @ blocks.T).view(batch, num_classes, num_classes)[torch.arange(batch), labels]
    return (residual * (weight_part + vectors[labels, num_classes * feature_dim:])).sum(dim=1)


def scores_from_partials(partial: torch.Tensor, operands: KernelOperands, stats: LastLayerStats) -> torch.Tensor:
    """Add a fused kernel's per-tile sums [T, B] of z^T P z, undo both scalings, add the correction: [B]."""
    return partial.sum(dim=0) * operands.scale.square() * stats.precision_scale + operands.correction


def _check_last_layer_inputs(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor,
                            stats: LastLayerStats) -> None:
    """Shapes, label range and devices that every scoring implementation relies on."""
    shape = (len(labels), stats.feature_dim)
    if features.shape != shape:
        raise InputError(f"features must be {list(shape)} for these stats, got {tuple(features.shape)}")
    if probs.shape != (len(labels), stats.num_classes):
        raise InputError(f"probs must be [{len(labels)}, {stats.num_classes}] for these stats, got {tuple(probs.shape)}")
    _check_labels(labels, len(labels), stats.num_classes)
    devices = {features.device, probs.device, labels.device, stats.device}
    if len(devices) != 1:
        raise InputError(f"features, probs, labels and stats must share one device, got {sorted(map(str, devices))}")


def closed_form_scores(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor,
                       stats: LastLayerStats) -> torch.Tensor:
    """The unfused torch path: write z [B, K], one GEMM with the stored P (or factor), reduce. float32 [B].

    Same arithmetic as the fused kernels (operands rounded to the variant's type, float32
    products and sums), so it is both the CPU implementation and the baseline they are timed against.
    """
    operands = kernel_operands(features, probs, labels, stats)
    residual, features = operands.coef[:, :-1], operands.x[:, : stats.feature_dim]
    gradient = torch.cat([(residual[:, :, None] * features[:, None, :]).flatten(1), residual], dim=1)
    z = (gradient - operands.mean_weight[:, None] * stats.means[labels]) * operands.inv_scale[:, None]
    return scores_from_partials(_quadratic_form(z, stats)[None], operands, stats)


def _quadratic_form(z: torch.Tensor, stats: LastLayerStats) -> torch.Tensor:
    """z^T (P / precision_scale) z per row of z [B, K] float32, [B], in the variant's arithmetic.

    Plain variants: (z @ P) . z. Whitened: |z @ L|^2, each entry of z @ L being one column of the
    fused kernels' walk.
    """
    product = _stored_product(z, stats)
    if PRECISION_VARIANTS[stats.variant].whitened:
        return (product * product).sum(dim=1)
    return (product * z).sum(dim=1)


def _stored_product(x: torch.Tensor, stats: LastLayerStats) -> torch.Tensor:
    """x [B, K] float32 times the stored matrix (P / precision_scale, or its factor L), float32.

    x is rounded to the element type like the stored matrix; split variants add the hi*lo and lo*hi
    products. Products and sums are float32.
    """
    spec = PRECISION_VARIANTS[stats.variant]
    if spec.dtype == torch.float32:
        return x @ stats.precision_parts[0]
    high = x.to(spec.dtype)
    out = _float32_product(high, stats.precision_parts[0])
    if spec.parts == 2:
        out += _float32_product(high, stats.precision_parts[1])
        out += _float32_product((x - high.float()).to(spec.dtype), stats.precision_parts[0])
    return out


def _float32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of low-precision operands with float32 accumulation and a float32 result (not rounded back)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # products of bf16/fp16 values are exact in float32


# --- Per-sample weight gradients of deeper layers (the unfold-GEMM / outer-product form) -----------------------------

def batched_outer_product(grad_outputs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """out[b] = grad_outputs[b] [O, L] @ columns[b] [I, L]^T, [B, O, I]: the GEMM behind every per-sample weight gradient.

    With (columns, grad_outputs) from `linear_columns` or `conv2d_columns` this is the per-sample
    dL/dW of a linear or ungrouped conv layer (reshape to [B, *weight.shape]).
    """
    return torch.einsum("bol,bil->boi", grad_outputs, columns)


def linear_columns(inputs: torch.Tensor, grad_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs as [B, I, T], grad_outputs as [B, O, T]) views for inputs [B, (T,) I] and grad_outputs [B, (T,) O].

    grad_outputs are dL_b/dy for each sample's own loss; 2-D tensors are one position (T = 1).
    """
    if inputs.ndim == 2 and grad_outputs.ndim == 2:
        inputs, grad_outputs = inputs[:, None], grad_outputs[:, None]
    if inputs.ndim != 3 or grad_outputs.ndim != 3 or grad_outputs.shape[:2] != inputs.shape[:2]:
        raise InputError(f"inputs [B, (T,) I] and grad_outputs [B, (T,) O] disagree: "
                         f"{tuple(inputs.shape)} vs {tuple(grad_outputs.shape)}")
    return inputs.transpose(1, 2), grad_outputs.transpose(1, 2)


def conv2d_columns(inputs: torch.Tensor, grad_outputs: torch.Tensor, kernel_size: tuple[int, int],
                   stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(unfolded inputs [B, I*kh*kw, L], grad_outputs flattened to [B, O, L]) with their shapes checked."""
    if inputs.ndim != 4 or grad_outputs.ndim != 4 or len(inputs) != len(grad_outputs):
        raise InputError(f"inputs [B, I, H, W] and grad_outputs [B, O, Ho, Wo] expected, got "
                         f"{tuple(inputs.shape)} and {tuple(grad_outputs.shape)}")
    columns = torch.nn.functional.unfold(inputs, kernel_size, dilation=dilation, padding=padding, stride=stride)
    if columns.shape[2] != grad_outputs.shape[2] * grad_outputs.shape[3]:
        raise InputError(f"grad_outputs {tuple(grad_outputs.shape)} do not match a conv with kernel {kernel_size}, "
                         f"stride {stride}, padding {padding}, dilation {dilation} on inputs {tuple(inputs.shape)}")
    return columns, grad_outputs.flatten(2)
