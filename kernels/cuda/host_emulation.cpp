// The kernels of this folder compiled for the CPU emulator (host_emulation.h), with C entry points
// that take the same arguments as the GPU launchers and use the same grid; loaded through ctypes.
#include "host_emulation.h"

#include "last_layer_score.cuh"
#include "per_sample_grad.cuh"

// Returns 1, launching nothing, for an element type / form that has no kernel (whitened float32).
extern "C" int emulate_last_layer_score(int element_bits, int bfloat, int whitened, const float* x, const float* coef,
                                        const long long* labels, const float* mean_weight, const float* inv_scale,
                                        const float* means, const void* precision, const int* tiles, float* partial,
                                        int batch, int dim, int x_stride, int coef_stride, int num_tiles) {
  using namespace edge_kernels;
  const EmuIndex grid{unsigned((batch + kTileB - 1) / kTileB), unsigned(num_tiles), 1};
  const EmuIndex block{kScoreThreads, 1, 1};
  const auto run = [&](auto kernel, const auto* typed_precision) {
    emulate_launch(grid, block, [&] {
      kernel(x, coef, labels, mean_weight, inv_scale, means, typed_precision, tiles, partial, batch, dim, x_stride,
             coef_stride, num_tiles);
    });
    return 0;
  };
  if (element_bits == 32 && !whitened) return run(last_layer_score_f32, static_cast<const float*>(precision));
  if (element_bits == 16 && bfloat) {
    return run(whitened ? last_layer_score_bf16_whitened : last_layer_score_bf16,
               static_cast<const __nv_bfloat16*>(precision));
  }
  if (element_bits == 16) {
    return run(whitened ? last_layer_score_f16_whitened : last_layer_score_f16, static_cast<const __half*>(precision));
  }
  return 1;
}

extern "C" void emulate_batched_outer(const float* grad_outputs, const float* columns, float* out, int batch,
                                      int n_out, int n_in, int length) {
  using edge_kernels::kOuterTile;
  const EmuIndex grid{unsigned((n_in + kOuterTile - 1) / kOuterTile), unsigned((n_out + kOuterTile - 1) / kOuterTile),
                      unsigned(batch)};
  emulate_launch(grid, EmuIndex{kOuterTile, kOuterTile, 1},
                 [&] { batched_outer_f32(grad_outputs, columns, out, n_out, n_in, length); });
}
