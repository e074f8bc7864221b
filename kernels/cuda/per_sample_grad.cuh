// Batched outer-product GEMM for per-sample weight gradients of linear and conv layers:
// out[b][o][i] = sum_l grad_outputs[b][o][l] * columns[b][i][l], all float32 and contiguous.
// For a conv, columns = unfold(inputs) [B, I*kh*kw, L]; for a linear layer over T positions,
// L = T. One 16 x 16 output tile per block, the L axis walked in shared-memory chunks.
#ifndef OUTER_TILE
#error "compile with -DOUTER_TILE=... (kernels/cuda_build.py passes it)"
#endif

namespace edge_kernels {

constexpr int kOuterTile = OUTER_TILE;

__device__ __forceinline__ void batched_outer(const float* grad_outputs, const float* columns, float* out,
                                              int n_out, int n_in, int length) {
  __shared__ float dy[kOuterTile][kOuterTile + 1];
  __shared__ float cols[kOuterTile][kOuterTile + 1];
  const int b = blockIdx.z;
  const int o_base = blockIdx.y * kOuterTile, i_base = blockIdx.x * kOuterTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const float* dy_b = grad_outputs + (long long)b * n_out * length;
  const float* cols_b = columns + (long long)b * n_in * length;
  float acc = 0.0f;
  for (int l0 = 0; l0 < length; l0 += kOuterTile) {
    const int l = l0 + tx;
    dy[ty][tx] = (o_base + ty < n_out && l < length) ? dy_b[(long long)(o_base + ty) * length + l] : 0.0f;
    cols[ty][tx] = (i_base + ty < n_in && l < length) ? cols_b[(long long)(i_base + ty) * length + l] : 0.0f;
    __syncthreads();
    for (int k = 0; k < kOuterTile; ++k) acc += dy[ty][k] * cols[tx][k];
    __syncthreads();
  }
  if (o_base + ty < n_out && i_base + tx < n_in) {
    out[((long long)b * n_out + o_base + ty) * n_in + i_base + tx] = acc;
  }
}

}  // namespace edge_kernels

extern "C" __global__ void __launch_bounds__(edge_kernels::kOuterTile * edge_kernels::kOuterTile)
    batched_outer_f32(const float* grad_outputs, const float* columns, float* out, int n_out, int n_in, int length) {
  edge_kernels::batched_outer(grad_outputs, columns, out, n_out, n_in, length);
}
