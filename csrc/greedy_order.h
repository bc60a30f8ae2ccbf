// Host launcher of the greedy attention-guided order (AGDO Algorithm 1), CUDA part of agdo_kernels.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace agdo {

// Longest row: 512 threads x 32 elements each (S in shared memory past 8192 positions, delta in registers).
constexpr int kGreedyMaxLength = 16384;

// Writes rank[b, i] = the greedy round at which valid token i of row b is picked, -1 where not valid.
// All pointers are device pointers to contiguous row-major arrays:
//   columns (B, R, R) float32, the transposed Abar: columns[b, j, i] = Abar[b, i, j];
//   s0 (B, R) float32; valid (B, R) bytes (0 = not valid); rank (B, R) int32 (written).
// The greedy runs over consecutive windows of `window` positions (R for the whole row), `step_size`
// tokens a round. Requires 1 <= R <= kGreedyMaxLength, step_size >= 1, window >= 1.
// Returns cudaSuccess or the launch error; the kernel runs asynchronously on `stream`.
cudaError_t launch_greedy_rank(const float* columns, const float* s0, const std::uint8_t* valid, std::int32_t* rank,
                               int batch, int length, int step_size, int window, cudaStream_t stream);

}  // namespace agdo
