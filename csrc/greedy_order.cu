// Greedy attention-guided order (AGDO Algorithm 1): one thread block per sequence, the row in registers.
//
// Thread t holds positions t, t + blockDim, t + 2*blockDim, ... (ITEMS of them), so the load of a picked
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

// Unsigned key whose order is (score ascending, position descending): its maximum is the pick.
__device__ __forceinline__ unsigned long long pick_key(float score, int position) {
  if (isnan(score)) score = -INFINITY;  // NaN counts as -inf (a NaN's bits would order it by its sign)
  unsigned int bits = __float_as_uint(score + 0.0f);  // + 0 turns -0 into +0: they tie, as floats do
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // float order as unsigned order
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

template <int ITEMS, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS)
    greedy_rank_kernel(const float* __restrict__ columns, const float* __restrict__ s0,
                       const std::uint8_t* __restrict__ valid, std::int32_t* __restrict__ rank,
                       int length, int step_size, int window) {
  static_assert(ITEMS <= 32, "the candidate flags of a thread live in one 32-bit word");
  __shared__ unsigned long long warp_best[2][kMaxWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  const long long row = static_cast<long long>(blockIdx.x) * length;
  const float* row_columns = columns + row * length;

  // Registers per element: S and delta only; valid/candidate flags are bits, ranks go straight to memory.
  float score[ITEMS];
  float delta[ITEMS];
  unsigned int valid_bits = 0;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int position = i * blockDim.x + threadIdx.x;
    const bool inside = position < length;
    score[i] = inside ? s0[row + position] : 0.0f;
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
      const int position = i * blockDim.x + threadIdx.x;
      const bool candidate = (valid_bits >> i & 1u) && position >= start && position - start < window;
      if (candidate) candidate_bits |= 1u << i;
      left += __syncthreads_count(candidate);
    }
    while (left > 0) {  // uniform across the block: every thread sees the same `left`
      const int take = left < step_size ? left : step_size;
      for (int p = 0; p < take; ++p) {
        unsigned long long best = 0;  // below every candidate's key
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const unsigned long long key =
              (candidate_bits >> i & 1u) ? pick_key(score[i], i * blockDim.x + threadIdx.x) : 0ull;
          best = key > best ? key : best;
        }
        best = warp_max(best);
        if (lane == 0) warp_best[buffer][warp] = best;
        __syncthreads();
        best = warp_max(lane < n_warps ? warp_best[buffer][lane] : 0ull);
        buffer ^= 1;

        const int picked = key_position(best);
        const float* column = row_columns + static_cast<long long>(picked) * length;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const int position = i * blockDim.x + threadIdx.x;
          if (position == picked) {
            candidate_bits &= ~(1u << i);
            rank[row + position] = round_index;
          }
          if (position < length) delta[i] += column[position];
        }
      }
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        score[i] += delta[i];
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
  // Short rows: one element per thread and no idle warps. Longer rows: 256 threads (1024 past 4096
  // positions) with a power-of-two number of elements each, few enough to stay in registers.
#define AGDO_LAUNCH(ITEMS, MAX_THREADS)                                                                  \
  greedy_rank_kernel<ITEMS, MAX_THREADS>                                                                 \
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
  } else {
    const int threads = 1024;
    if (length <= 8 * threads) {
      AGDO_LAUNCH(8, 1024);
    } else {
      AGDO_LAUNCH(16, 1024);
    }
  }
#undef AGDO_LAUNCH
  return cudaGetLastError();
}

}  // namespace agdo
