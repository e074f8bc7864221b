// Runs CUDA C kernels on the CPU, for tests on machines without a GPU: each block's threads become
// std::threads, __syncthreads() a std::barrier, and __shared__ arrays function-local statics (blocks
// run one after another, so one static copy is the running block's shared memory). Compile the
// kernel sources with g++ -std=c++20 -pthread after this header; only the subset of CUDA the
// kernels in this folder use is provided (no warp intrinsics, atomics or dynamic shared memory).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct EmuIndex {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local EmuIndex threadIdx;
inline thread_local EmuIndex blockIdx;
inline thread_local std::barrier<>* emu_block_barrier = nullptr;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

// Run kernel() once per thread of every block of the grid, block after block.
template <typename Kernel>
void emulate_launch(EmuIndex grid, EmuIndex block, const Kernel& kernel) {
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            blockIdx = {bx, by, bz};
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            emu_block_barrier = &barrier;
            kernel();
          });
        }
        for (auto& thread : pool) thread.join();
      }
    }
  }
}
