// Fused last-layer gradient Mahalanobis score for GPUs without Triton (Jetson): plain CUDA C,
// float32 arithmetic, the precision matrix read as float, bf16 or fp16.
//
// Same walk as kernels/triton_fused.py: block (bx, by) owns SCORE_TILE_B samples and one column tile
// j of the stored matrix; it rebuilds tiles of z / s = (g - t mu_y) / s from x = [features | residual],
// coef = [residual | 1] and the class means (tile table: kernels.reference.score_tiles; t, s and the
// terms that complete the score: kernels.reference.kernel_operands). For a symmetric P it takes
// j = num_tiles - 1 - by, visits row tiles i <= j only and writes
// partial[j][b] = [2 sum_{i<j} z_i P_ij + z_j P_jj] . z_j. For a whitened variant the matrix is P's
// lower Cholesky factor L; it takes j = by, visits row tiles i >= j (L is zero above its diagonal) and
// writes partial[j][b] = |sum_{i>=j} z_i L_ij|^2, so the partials still add up to z^T P z. Either
// way the longest walks are launched first. The B x K gradient is never written to global memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if !defined(SCORE_TILE_B) || !defined(SCORE_TILE_K) || !defined(SCORE_THREADS)
#error "compile with -DSCORE_TILE_B=... -DSCORE_TILE_K=... -DSCORE_THREADS=... (kernels/cuda_build.py passes them)"
#endif

namespace edge_kernels {

constexpr int kScoreThreads = SCORE_THREADS;
constexpr int kTileB = SCORE_TILE_B;
constexpr int kTileK = SCORE_TILE_K;
constexpr int kRowStep = kScoreThreads / kTileK;      // rows between one thread's accumulators
constexpr int kRowsPerThread = kTileB / kRowStep;
static_assert(kScoreThreads % kTileK == 0 && kTileB % kRowStep == 0, "tile shape must divide the block");

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

struct ScoreInputs {
  const float* x;            // [batch, x_stride]: features then residual
  const float* coef;         // [batch, coef_stride]: residual then 1
  const long long* labels;   // [batch]
  const float* mean_weight;  // [batch]: t_b
  const float* inv_scale;    // [batch]: 1 / s_b, a power of two
  const float* means;        // [C, dim] kernel order
  const int* tiles;          // [num_tiles, 4]: coef column, x start, k start, length
  int batch, dim, x_stride, coef_stride, num_tiles;
};

// Tile t of z / s for this block's samples into dst (zeros outside the batch and the tile's length).
__device__ __forceinline__ void load_z_tile(const ScoreInputs& in, int t, int first_row, float (*dst)[kTileK + 1]) {
  const int coef_col = in.tiles[4 * t], x_start = in.tiles[4 * t + 1];
  const int k_start = in.tiles[4 * t + 2], length = in.tiles[4 * t + 3];
  for (int e = threadIdx.x; e < kTileB * kTileK; e += kScoreThreads) {
    const int r = e / kTileK, c = e % kTileK, b = first_row + r;
    float v = 0.0f;
    if (b < in.batch && c < length) {
      const float g =
          in.coef[(long long)b * in.coef_stride + coef_col] * in.x[(long long)b * in.x_stride + x_start + c];
      v = (g - in.mean_weight[b] * in.means[in.labels[b] * in.dim + k_start + c]) * in.inv_scale[b];
    }
    dst[r][c] = v;
  }
}

template <typename Element>
__device__ __forceinline__ void load_precision_tile(const ScoreInputs& in, const Element* precision, int i, int j,
                                                    float (*dst)[kTileK + 1]) {
  const int row_start = in.tiles[4 * i + 2], rows = in.tiles[4 * i + 3];
  const int col_start = in.tiles[4 * j + 2], cols = in.tiles[4 * j + 3];
  for (int e = threadIdx.x; e < kTileK * kTileK; e += kScoreThreads) {
    const int r = e / kTileK, c = e % kTileK;
    const long long offset = (long long)(row_start + r) * in.dim + col_start + c;
    dst[r][c] = (r < rows && c < cols) ? to_float(precision[offset]) : 0.0f;
  }
}

// Whitened: the matrix is lower triangular and each partial is a squared norm (see the top of this file).
template <typename Element, bool Whitened>
__device__ __forceinline__ void last_layer_score(const ScoreInputs& in, const Element* precision, float* partial) {
  __shared__ float z_j[kTileB][kTileK + 1];
  __shared__ float z_i[kTileB][kTileK + 1];
  __shared__ float p[kTileK][kTileK + 1];
  const int col = threadIdx.x % kTileK;
  const int row0 = threadIdx.x / kTileK;
  const int first_row = blockIdx.x * kTileB;
  const int j = Whitened ? (int)blockIdx.y : in.num_tiles - 1 - (int)blockIdx.y;  // longest walks first
  const int first_tile = Whitened ? j : 0, last_tile = Whitened ? in.num_tiles - 1 : j;
  float acc[kRowsPerThread];
  for (int m = 0; m < kRowsPerThread; ++m) acc[m] = 0.0f;

  for (int i = first_tile; i <= last_tile; ++i) {
    float (*z)[kTileK + 1] = (i == j) ? z_j : z_i;
    load_z_tile(in, i, first_row, z);
    load_precision_tile(in, precision, i, j, p);
    __syncthreads();
    if (!Whitened && i == j) {
      for (int m = 0; m < kRowsPerThread; ++m) acc[m] *= 2.0f;  // off-diagonal blocks count twice
    }
    for (int k = 0; k < kTileK; ++k) {
      const float pk = p[k][col];
      for (int m = 0; m < kRowsPerThread; ++m) acc[m] += z[row0 + m * kRowStep][k] * pk;
    }
    __syncthreads();
  }
  for (int m = 0; m < kRowsPerThread; ++m) {
    const int r = row0 + m * kRowStep;
    z_i[r][col] = acc[m] * (Whitened ? acc[m] : z_j[r][col]);
  }
  __syncthreads();
  if (threadIdx.x < kTileB && first_row + (int)threadIdx.x < in.batch) {
    float sum = 0.0f;
    for (int c = 0; c < kTileK; ++c) sum += z_i[threadIdx.x][c];
    partial[(long long)j * in.batch + first_row + threadIdx.x] = sum;
  }
}

}  // namespace edge_kernels

#define EDGE_SCORE_ENTRY(NAME, ELEMENT, WHITENED)                                                            \
  extern "C" __global__ void __launch_bounds__(edge_kernels::kScoreThreads)                                  \
      NAME(const float* x, const float* coef, const long long* labels, const float* mean_weight,             \
           const float* inv_scale, const float* means, const ELEMENT* precision, const int* tiles,            \
           float* partial, int batch, int dim, int x_stride, int coef_stride, int num_tiles) {                \
    const edge_kernels::ScoreInputs in{x,     coef,  labels,   mean_weight, inv_scale,  means,               \
                                       tiles, batch, dim,      x_stride,    coef_stride, num_tiles};          \
    edge_kernels::last_layer_score<ELEMENT, WHITENED>(in, precision, partial);                               \
  }

EDGE_SCORE_ENTRY(last_layer_score_f32, float, false)
EDGE_SCORE_ENTRY(last_layer_score_bf16, __nv_bfloat16, false)
EDGE_SCORE_ENTRY(last_layer_score_f16, __half, false)
EDGE_SCORE_ENTRY(last_layer_score_bf16_whitened, __nv_bfloat16, true)
EDGE_SCORE_ENTRY(last_layer_score_f16_whitened, __half, true)
