// torch launchers of the kernels above, compiled after them by torch.utils.cpp_extension.load_inline
// (kernels/cuda_build.py joins the sources); only c10 CUDA headers, so no cuBLAS/cuSPARSE headers
// are needed (Jetson images often lack them). Arguments are checked here because a wrong pointer on
// the GPU fails far from its cause.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

namespace {

void check_operand(const torch::Tensor& t, const char* name, c10::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

}  // namespace

// whitened: precision is a lower Cholesky factor (bf16 or fp16), see last_layer_score.cuh.
torch::Tensor last_layer_partials(torch::Tensor x, torch::Tensor coef, torch::Tensor labels, torch::Tensor mean_weight,
                                  torch::Tensor inv_scale, torch::Tensor means, torch::Tensor precision,
                                  torch::Tensor tiles, bool whitened) {
  check_operand(x, "x", torch::kFloat);
  check_operand(coef, "coef", torch::kFloat);
  check_operand(labels, "labels", torch::kLong);
  check_operand(mean_weight, "mean_weight", torch::kFloat);
  check_operand(inv_scale, "inv_scale", torch::kFloat);
  check_operand(means, "means", torch::kFloat);
  check_operand(tiles, "tiles", torch::kInt);
  TORCH_CHECK(precision.is_cuda() && precision.is_contiguous(), "precision must be a contiguous CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int batch = x.size(0), num_tiles = tiles.size(0), dim = means.size(1);
  auto partial = torch::empty({num_tiles, batch}, x.options());
  if (batch == 0) return partial;
  const dim3 grid((batch + edge_kernels::kTileB - 1) / edge_kernels::kTileB, num_tiles);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* label_ptr = reinterpret_cast<const long long*>(labels.data_ptr<int64_t>());
#define EDGE_LAUNCH_SCORE(KERNEL, ELEMENT)                                                                     \
  (KERNEL)<<<grid, edge_kernels::kScoreThreads, 0, stream>>>(                                                    \
      x.data_ptr<float>(), coef.data_ptr<float>(), label_ptr, mean_weight.data_ptr<float>(),                  \
      inv_scale.data_ptr<float>(), means.data_ptr<float>(),                                                    \
      reinterpret_cast<const ELEMENT*>(precision.data_ptr()), tiles.data_ptr<int>(), partial.data_ptr<float>(),  \
      batch, dim, static_cast<int>(x.stride(0)), static_cast<int>(coef.stride(0)), num_tiles)
  switch (precision.scalar_type()) {
    case torch::kFloat:
      TORCH_CHECK(!whitened, "whitened scoring kernels read bfloat16 or float16 factors, got float32");
      EDGE_LAUNCH_SCORE(last_layer_score_f32, float);
      break;
    case torch::kBFloat16:
      EDGE_LAUNCH_SCORE(whitened ? last_layer_score_bf16_whitened : last_layer_score_bf16, __nv_bfloat16);
      break;
    case torch::kHalf:
      EDGE_LAUNCH_SCORE(whitened ? last_layer_score_f16_whitened : last_layer_score_f16, __half);
      break;
    default: TORCH_CHECK(false, "precision must be float32, bfloat16 or float16, got ", precision.scalar_type());
  }
#undef EDGE_LAUNCH_SCORE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial;
}

torch::Tensor batched_outer(torch::Tensor grad_outputs, torch::Tensor columns) {
  check_operand(grad_outputs, "grad_outputs", torch::kFloat);
  check_operand(columns, "columns", torch::kFloat);
  TORCH_CHECK(grad_outputs.dim() == 3 && columns.dim() == 3 && grad_outputs.size(0) == columns.size(0) &&
                  grad_outputs.size(2) == columns.size(2),
              "grad_outputs [B, O, L] and columns [B, I, L] disagree");
  const c10::cuda::CUDAGuard guard(grad_outputs.device());
  const int batch = grad_outputs.size(0), n_out = grad_outputs.size(1), n_in = columns.size(1);
  const int length = grad_outputs.size(2);
  auto out = torch::empty({batch, n_out, n_in}, grad_outputs.options());
  if (out.numel() == 0) return out;
  constexpr int tile = edge_kernels::kOuterTile;
  const dim3 grid((n_in + tile - 1) / tile, (n_out + tile - 1) / tile, batch);
  batched_outer_f32<<<grid, dim3(tile, tile), 0, c10::cuda::getCurrentCUDAStream()>>>(
      grad_outputs.data_ptr<float>(), columns.data_ptr<float>(), out.data_ptr<float>(), n_out, n_in, length);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
