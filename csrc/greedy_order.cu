// Greedy attention-guided order (AGDO Algorithm 1): one thread block per sequence, the row in registers
// (S in shared memory for rows longer than 8192).
//
// Thread t holds positions t, t + MAX_THREADS, t + 2*MAX_THREADS, ... (ITEMS of them), so the load of a picked
// column is coalesced. A pick is a block-wide max over 64-bit keys (order-preserving score bits, then the
// complemented position), i.e. the largest S with ties going to the lowest position, in one reduction:
// warp shuffles, one slot per warp in shared memory, one __syncthreads, then every warp reduces the slots
// itself. The slots alternate between two buffers, so a pick needs a single barrier.
//
// Summation order (shared with the torch and Triton backends, see agdo_kernels/reference/ordering.py):
// a round's columns are summed into `delta` in pick order, then S += delta once per round.
//
// Non-finite scores (the same rule on every backend): a NaN score counts as -inf when picking, and -inf
// candidates are still picked (lowest position first), so every valid token gets exactly one rank. The key
// of a -inf candidate is nonzero, so it always beats the 0 of a non-candidate.

#include "greedy_order.h"

namespace agdo {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;

// The score as unsigned bits in float order (never 0, even for -inf): the high half of a pick key.
__device__ __forceinline__ unsigned int score_bits(float score) {
  if (isnan(score)) score = -INFINITY;  // NaN counts as -inf (a NaN's bits would order it by its sign)
  const unsigned int bits = __float_as_uint(score + 0.0f);  // + 0 turns -0 into +0: they tie, as floats do
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // float order as unsigned order
}

// Unsigned key whose order is (score ascending, position descending): its maximum is the pick.
__device__ __forceinline__ unsigned long long make_key(unsigned int bits, int position) {
  return (static_cast<unsigned long long>(bits) << 32) | (0xFFFFFFFFu - static_cast<unsigned int>(position));
}

__device__ __forceinline__ int key_position(unsigned long long key) {
  return static_cast<int>(0xFFFFFFFFu - static_cast<unsigned int>(key & 0xFFFFFFFFull));
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long key) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const unsigned long long other = __shfl_xor_sync(0xFFFFFFFFu, key, offset);
    key = other > key ? other : key;
  }
  return key;
}

// SHARED_SCORE: S lives in dynamic shared memory (ITEMS * MAX_THREADS floats, each thread reading only its own
// elements, so no barrier is needed) instead of registers; used for the longest rows, where S and delta in
// registers (plus the pick loop's temporaries) do not fit the 128 registers of a 512-thread block.
template <int ITEMS, int MAX_THREADS, bool SHARED_SCORE>
__global__ void __launch_bounds__(MAX_THREADS, 1)
    greedy_rank_kernel(const float* __restrict__ columns, const float* __restrict__ s0,
                       const std::uint8_t* __restrict__ valid, std::int32_t* __restrict__ rank,
                       int length, int step_size, int window) {
  static_assert(ITEMS <= 32, "the candidate flags of a thread live in one 32-bit word");
  // Positions step by the compile-time MAX_THREADS (the launch uses exactly MAX_THREADS threads whenever
  // ITEMS > 1), so a thread's positions are immediate offsets, not ITEMS live registers: with blockDim.x
  // here the 16-element kernels needed 128 registers and the 1024-thread one spilled (ptxas -v).
  __shared__ unsigned long long warp_best[2][kMaxWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  const long long row = static_cast<long long>(blockIdx.x) * length;
  const float* row_columns = columns + row * length;

  // Registers per element: S and delta only; valid/candidate flags are bits, ranks go straight to memory.
  extern __shared__ float shared_score[];  // SHARED_SCORE only
  float score_registers[SHARED_SCORE ? 1 : ITEMS];
  auto score = [&](int i) -> float& {
    if constexpr (SHARED_SCORE) {
      return shared_score[i * MAX_THREADS + threadIdx.x];
    } else {
      return score_registers[i];
    }
  };
  float delta[ITEMS];
  unsigned int valid_bits = 0;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int position = i * MAX_THREADS + threadIdx.x;
    const bool inside = position < length;
    score(i) = inside ? s0[row + position] : 0.0f;
    delta[i] = 0.0f;
    if (inside && valid[row + position] != 0) valid_bits |= 1u << i;
    if (inside) rank[row + position] = -1;
  }

  int round_index = 0;
  int buffer = 0;
  for (int start = 0; start < length; start += window) {
    unsigned int candidate_bits = 0;
    int left = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int position = i * MAX_THREADS + threadIdx.x;
      const bool candidate = (valid_bits >> i & 1u) && position >= start && position - start < window;
      if (candidate) candidate_bits |= 1u << i;
      left += __syncthreads_count(candidate);
    }
    while (left > 0) {  // uniform across the block: every thread sees the same `left`
      const int take = left < step_size ? left : step_size;
      for (int p = 0; p < take; ++p) {
        // This thread's best candidate: a 32-bit running max over its elements in position order (strict >
        // keeps the lowest position on ties), then one 64-bit key; the same pick as the max of every
        // element's key, with 2 live registers instead of a 64-bit key per element.
        unsigned int best_bits = 0;  // every candidate's bits are nonzero (score_bits)
        int best_item = 0;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const unsigned int bits = (candidate_bits >> i & 1u) ? score_bits(score(i)) : 0u;
          if (bits > best_bits) {
            best_bits = bits;
            best_item = i;
          }
        }
        unsigned long long best = best_bits ? make_key(best_bits, best_item * MAX_THREADS + threadIdx.x) : 0ull;
        best = warp_max(best);
        if (lane == 0) warp_best[buffer][warp] = best;
        __syncthreads();
        best = warp_max(lane < n_warps ? warp_best[buffer][lane] : 0ull);
        buffer ^= 1;

        const int picked = key_position(best);
        if (picked % MAX_THREADS == static_cast<int>(threadIdx.x)) {  // the owner of the picked position
          candidate_bits &= ~(1u << (picked / MAX_THREADS));
          rank[row + picked] = round_index;
        }
        const float* column = row_columns + static_cast<long long>(picked) * length;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const int position = i * MAX_THREADS + threadIdx.x;
          if (position < length) delta[i] += column[position];
        }
      }
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        score(i) += delta[i];
        delta[i] = 0.0f;
      }
      left -= take;
      ++round_index;
    }
  }
}

}  // namespace

cudaError_t launch_greedy_rank(const float* columns, const float* s0, const std::uint8_t* valid, std::int32_t* rank,
                               int batch, int length, int step_size, int window, cudaStream_t stream) {
  if (batch < 0 || length < 1 || length > kGreedyMaxLength || step_size < 1 || window < 1) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0) return cudaSuccess;
  // Short rows: one element per thread and no idle warps. Longer rows: 256 threads (512 past 4096 positions)
  // with a power-of-two number of elements each, few enough to stay in registers (no spills: ptxas -v,
  // tests/test_cuda_compile.py); past 8192 positions S moves to shared memory. Not 1024 threads: that caps
  // ptxas at 64 registers, and 16 elements per thread spilled in the pick loop.
#define AGDO_LAUNCH(ITEMS, MAX_THREADS)                                                                  \
  greedy_rank_kernel<ITEMS, MAX_THREADS, false>                                                          \
      <<<batch, threads, 0, stream>>>(columns, s0, valid, rank, length, step_size, window)
  if (length <= 256) {
    const int threads = (length + kWarpSize - 1) / kWarpSize * kWarpSize;
    AGDO_LAUNCH(1, 256);
  } else if (length <= 4096) {
    const int threads = 256;
    const int per_thread = (length + threads - 1) / threads;
    if (per_thread <= 2) {
      AGDO_LAUNCH(2, 256);
    } else if (per_thread <= 4) {
      AGDO_LAUNCH(4, 256);
    } else if (per_thread <= 8) {
      AGDO_LAUNCH(8, 256);
    } else {
      AGDO_LAUNCH(16, 256);
    }
  } else if (length <= 8192) {
    const int threads = 512;
    AGDO_LAUNCH(16, 512);
  } else {
    constexpr int kThreads = 512;
    constexpr int kItems = kGreedyMaxLength / kThreads;
    auto kernel = greedy_rank_kernel<kItems, kThreads, true>;
    const int shared_bytes = kItems * kThreads * static_cast<int>(sizeof(float));  // 64 KiB: opt in past 48
    const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
    if (status != cudaSuccess) return status;
    kernel<<<batch, kThreads, shared_bytes, stream>>>(columns, s0, valid, rank, length, step_size, window);
  }
#undef AGDO_LAUNCH
  return cudaGetLastError();
}

}  // namespace agdo
