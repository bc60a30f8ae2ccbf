// Attention statistics on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate), sm_80 and newer.
//
// valid_attention_kernel — FlashAttention-2 style forward. One CTA of 4 warps per (batch, query head, tile of
// 64 query rows); warp w owns rows 16w..16w+15 and keeps their Q fragments in registers for the whole pass.
// Key/value tiles of 64 rows stream through shared memory with cp.async (one K and one V buffer: the next K
// tile loads while the softmax and P@V of this one run, the next V tile while the next S = Q K^T runs). The
// online softmax lives in registers (each thread holds 2 rows x 16 keys of a tile). Beside the denominator
// l = sum_k p it keeps u = sum_{k in U} p, rescaled by the same exp2(m_old - m_new) factor, so S_h = u / l is
// exact at the end. P is converted in registers from the accumulator layout to the A-operand layout of the
// P@V mma (no shared-memory round trip).
//
// influence_kernel — FlashAttention-backward structure. One CTA per (batch, query head, tile of 64 keys); warp
// w keeps keys 16w..16w+15 as A fragments in registers and streams every query tile (double-buffered Q and
// its base-2 lse) computing the transposed logits K Q^T, so a key's sum over queries is a row sum: per-thread
// partial sums in fp32, reduced over the 4 threads of a quad at the end.
//
// Head averaging (both kernels): each CTA writes its head's fp32 row to a (B, H, rows) buffer and the caller
// sums over heads (agdo_kernels/_cuda.py). No atomics: every output element is written by exactly one thread
// in a fixed summation order, so results are bitwise reproducible run to run (SPEC §3, and what the Triton
// backend does). A loop over heads inside one CTA would also avoid the buffer, but leaves SMs idle for B = 1
// (B * ceil(N / 64) CTAs).
//
// Shared-memory rows are padded by 8 elements (16 bytes): the 8 row addresses of an ldmatrix phase then fall
// in 8 different 16-byte bank groups (no bank conflicts), and rows stay 16-byte aligned for cp.async.
// Bounds: tile rows past the end are zero-filled by cp.async (src-size 0) and their keys carry bias -inf or
// lse2 = +inf (p = 0); only rows inside the tensors are written.

#include "attention_stats.h"
#include "ptx.cuh"

#include <climits>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace agdo {
namespace {

constexpr int kTile = kAttnTile;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowPad = 8;  // elements of padding per shared-memory row
static_assert(kTile == kWarps * 16, "each warp owns 16 rows of a tile");

// ---------------------------------------------------------------------------------------------------------
// Fragments and quads

// Two floats as one register of two 16-bit values, `low` in the low half (the lower column of a fragment).
template <typename T>
__device__ __forceinline__ std::uint32_t pack2(float low, float high) {
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 pair = __floats2half2_rn(low, high);
    return *reinterpret_cast<const std::uint32_t*>(&pair);
  } else {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const std::uint32_t*>(&pair);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xFFFFFFFFu, x, 1);
  return x + __shfl_xor_sync(0xFFFFFFFFu, x, 2);
}

// ---------------------------------------------------------------------------------------------------------
// Tiles

// Rows [row0, row0 + kTile) of a (rows, D) matrix with row stride `stride` (elements) into a padded shared
// tile; rows at or past `rows` are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* tile, const T* base, std::int64_t stride, int row0, int rows) {
  constexpr int kLd = D + kRowPad;
  constexpr int kChunksPerRow = D / 8;  // 16-byte chunks
  constexpr int kChunks = kTile * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "whole chunks per thread");
  const std::uint32_t tile_address = smem_address(tile);
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = static_cast<int>(threadIdx.x) + i * kThreads;
    const int row = chunk / kChunksPerRow;
    const int column = (chunk % kChunksPerRow) * 8;
    const bool inside = row0 + row < rows;
    const T* src = inside ? base + static_cast<std::int64_t>(row0 + row) * stride + column : base;
    cp_async_16(tile_address + static_cast<std::uint32_t>((row * kLd + column) * sizeof(T)), src, inside);
  }
}

// kTile bytes (or floats) of a padded per-key row into shared memory, 16 bytes per thread.
template <typename E>
__device__ __forceinline__ void load_row(E* dst, const E* src) {
  constexpr int kChunks = kTile * static_cast<int>(sizeof(E)) / 16;
  static_assert(kChunks <= kThreads, "one chunk per thread");
  if (threadIdx.x < kChunks) {
    constexpr int kPerChunk = 16 / static_cast<int>(sizeof(E));
    cp_async_16(smem_address(dst + threadIdx.x * kPerChunk), src + threadIdx.x * kPerChunk, true);
  }
}

// The key rows (bias, U) of key tile `block` into buffer `block & 1` of `key_tiles` (2 x 2 x kTile floats).
__device__ __forceinline__ void load_key_rows(float* key_tiles, const float* keys, int padded_keys, int block) {
  float* dst = key_tiles + (block & 1) * 2 * kTile;
  load_row(dst, keys + block * kTile);
  load_row(dst + kTile, keys + padded_keys + block * kTile);
}

// A fragments (16 rows x D) of the warp's rows [16 * warp, 16 * warp + 16) of a padded shared tile.
template <typename T, int D>
__device__ __forceinline__ void load_row_fragments(std::uint32_t (&fragment)[D / 16][4], const T* tile, int warp,
                                                   int lane) {
  constexpr int kLd = D + kRowPad;
  // Matrices: (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15).
  const T* row = tile + (warp * 16 + (lane & 15)) * kLd + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(fragment[kk], smem_address(row + kk * 16));
}

// acc[j] (16 x 8, columns 8j..8j+7 of the tile) = A (the warp's 16 rows, D) @ tile^T, for the 64 rows of a
// padded shared tile taken as the n dimension (B operand, "col": a tile row is a B column).
template <typename T, int D>
__device__ __forceinline__ void rows_times_tile(float (&acc)[kTile / 8][4], const std::uint32_t (&a)[D / 16][4],
                                                const T* tile, int lane) {
  constexpr int kLd = D + kRowPad;
#pragma unroll
  for (int j = 0; j < kTile / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  // Matrices: (rows 0-7, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 0-7), (rows 8-15, k 8-15) of a 16-row
  // group: registers 0/1 are the B fragment of n-tile 2p, registers 2/3 that of n-tile 2p + 1.
  const T* row = tile + ((lane & 7) + (lane >> 4) * 8) * kLd + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int p = 0; p < kTile / 16; ++p) {
      std::uint32_t b[4];
      ldmatrix_x4(b, smem_address(row + p * 16 * kLd + kk * 16));
      mma_16816<T>(acc[2 * p], a[kk], b[0], b[1]);
      mma_16816<T>(acc[2 * p + 1], a[kk], b[2], b[3]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// valid attention

template <typename T, int D, bool OUTPUT>
__global__ void __launch_bounds__(kThreads) valid_attention_kernel(const ValidAttentionArgs args) {
  constexpr int kLd = D + kRowPad;
  constexpr int kDTiles = D / 8;  // n-tiles of the output
  extern __shared__ __align__(16) unsigned char shared[];
  T* q_tile = reinterpret_cast<T*>(shared);
  T* k_tile = q_tile + kTile * kLd;
  T* v_tile = k_tile + kTile * kLd;  // only with OUTPUT
  // Key rows (bias, U) of a key tile, double-buffered: U is read after the barrier that frees the K tile.
  float* key_tiles = reinterpret_cast<float*>(k_tile + (OUTPUT ? 2 : 1) * kTile * kLd);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int quad_row = lane >> 2;  // g: fragment row (and row + 8)
  const int quad_col = lane & 3;   // t: fragment columns 2t, 2t + 1

  const int n_queries = args.n_queries;
  const int n_keys = args.n_keys;
  const int tiles = (n_queries + kTile - 1) / kTile;
  const std::int64_t bh = blockIdx.x / tiles;
  const int m0 = static_cast<int>(blockIdx.x % tiles) * kTile;
  const int b = static_cast<int>(bh / args.heads);
  const int h = static_cast<int>(bh % args.heads);
  const int kv = h / (args.heads / args.kv_heads);

  const T* q = static_cast<const T*>(args.q) + b * args.q_stride[0] + h * args.q_stride[1];
  const T* k = static_cast<const T*>(args.k) + b * args.k_stride[0] + kv * args.k_stride[1];
  const T* v = OUTPUT ? static_cast<const T*>(args.v) + b * args.v_stride[0] + kv * args.v_stride[1] : nullptr;
  const float* keys = args.key_rows + static_cast<std::int64_t>(b) * 2 * args.padded_keys;

  // Groups in flight: Q, then K0 (+ its key rows), then V0.
  load_tile<T, D>(q_tile, q, args.q_stride[2], m0, n_queries);
  cp_async_commit();
  load_tile<T, D>(k_tile, k, args.k_stride[2], 0, n_keys);
  load_key_rows(key_tiles, keys, args.padded_keys, 0);
  cp_async_commit();
  if constexpr (OUTPUT) {
    load_tile<T, D>(v_tile, v, args.v_stride[2], 0, n_keys);
    cp_async_commit();
    cp_async_wait<2>();
  } else {
    cp_async_wait<1>();
  }
  __syncthreads();
  std::uint32_t q_fragment[D / 16][4];
  load_row_fragments<T, D>(q_fragment, q_tile, warp, lane);

  float acc_o[OUTPUT ? kDTiles : 1][4];
#pragma unroll
  for (int j = 0; j < (OUTPUT ? kDTiles : 1); ++j) acc_o[j][0] = acc_o[j][1] = acc_o[j][2] = acc_o[j][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // base-2 logits, rows g and g + 8
  float row_sum[2] = {0.0f, 0.0f};            // this thread's partial sums (its 2 columns of each n-tile)
  float u_sum[2] = {0.0f, 0.0f};

  const float qk_scale = args.qk_scale;
  const int n_blocks = (n_keys + kTile - 1) / kTile;
  for (int block = 0; block < n_blocks; ++block) {
    const bool more = block + 1 < n_blocks;
    if constexpr (OUTPUT) {
      cp_async_wait<1>();  // K of this block (its V may still be in flight)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    float s[kTile / 8][4];
    rows_times_tile<T, D>(s, q_fragment, k_tile, lane);
    __syncthreads();  // every warp is done with this K tile
    if (more) {
      load_tile<T, D>(k_tile, k, args.k_stride[2], (block + 1) * kTile, n_keys);
      load_key_rows(key_tiles, keys, args.padded_keys, block + 1);
      cp_async_commit();
    }

    // Keys: column 8j + 2t + c of n-tile j, elements c (row g) and 2 + c (row g + 8). The bias puts -inf on
    // padding and keys past N. The logits stay unscaled: the scale is folded into the exp2 argument below.
    const float* key_tile = key_tiles + (block & 1) * 2 * kTile;
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
      const float2 bias = *reinterpret_cast<const float2*>(key_tile + 8 * j + 2 * quad_col);
      s[j][0] += bias.x;
      s[j][1] += bias.y;
      s[j][2] += bias.x;
      s[j][3] += bias.y;
    }

    // Online softmax of rows g (r = 0: elements 0, 1) and g + 8 (r = 1: elements 2, 3).
    float reference[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float block_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j) block_max = fmaxf(block_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      const float new_max = fmaxf(row_max[r], quad_max(block_max) * qk_scale);  // qk_scale > 0
      // A row that has only seen padding keeps max -inf: subtract 0 instead, so exp2 gives 0, not NaN.
      reference[r] = new_max == -INFINITY ? 0.0f : new_max;
      alpha[r] = fast_exp2(row_max[r] - reference[r]);
      row_max[r] = new_max;
    }
    float block_sum[2] = {0.0f, 0.0f};
    float block_u[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
      const float2 u = *reinterpret_cast<const float2*>(key_tile + kTile + 8 * j + 2 * quad_col);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float p = fast_exp2(fmaf(s[j][2 * r + c], qk_scale, -reference[r]));
          s[j][2 * r + c] = p;
          block_sum[r] += p;
          block_u[r] = fmaf(p, c == 0 ? u.x : u.y, block_u[r]);  // S: one FFMA per logit
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[r] = row_sum[r] * alpha[r] + block_sum[r];
      u_sum[r] = u_sum[r] * alpha[r] + block_u[r];
      if constexpr (OUTPUT) {
#pragma unroll
        for (int j = 0; j < kDTiles; ++j) {
          acc_o[j][2 * r] *= alpha[r];
          acc_o[j][2 * r + 1] *= alpha[r];
        }
      }
    }

    if constexpr (OUTPUT) {
      if (more) {
        cp_async_wait<1>();  // V of this block (the next K may still be in flight)
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      // O += P @ V: the accumulator layout of n-tiles 2kk, 2kk + 1 is the A layout of keys 16kk..16kk+15.
      // ldmatrix.trans matrices: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15):
      // registers 0/1 are the B fragment of d-tile 2p, registers 2/3 that of d-tile 2p + 1.
      const T* v_row = v_tile + ((lane & 7) + ((lane >> 3) & 1) * 8) * kLd + (lane >> 4) * 8;
#pragma unroll
      for (int kk = 0; kk < kTile / 16; ++kk) {
        const std::uint32_t p_fragment[4] = {
            pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
            pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int p = 0; p < D / 16; ++p) {
          std::uint32_t b[4];
          ldmatrix_x4_trans(b, smem_address(v_row + kk * 16 * kLd + p * 16));
          mma_16816<T>(acc_o[2 * p], p_fragment, b[0], b[1]);
          mma_16816<T>(acc_o[2 * p + 1], p_fragment, b[2], b[3]);
        }
      }
      __syncthreads();  // every warp is done with this V tile
      if (more) {
        load_tile<T, D>(v_tile, v, args.v_stride[2], (block + 1) * kTile, n_keys);
        cp_async_commit();
      }
    }
  }

  // Rows without a real key have l = 0 (every p was exp2(-inf)): S = O = lse = 0.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    const float u = quad_sum(u_sum[r]);
    const int row = m0 + warp * 16 + quad_row + 8 * r;
    if (row >= n_queries) continue;
    const bool has_keys = l > 0.0f;
    const float inverse = has_keys ? 1.0f / l : 0.0f;
    const std::int64_t index = bh * n_queries + row;
    if (quad_col == 0) {
      // A padded query row gets S = 0 (its O and lse stay SDPA's); query row i is key N - Nq + i.
      const bool real_row = keys[n_keys - n_queries + row] == 0.0f;  // bias 0
      args.s_part[index] = real_row ? u * inverse : 0.0f;
      if (args.lse != nullptr) {
        args.lse[index] = has_keys ? (row_max[r] + log2f(l)) * 0.6931471805599453f : 0.0f;
      }
    }
    if constexpr (OUTPUT) {
      std::uint32_t* out_row = reinterpret_cast<std::uint32_t*>(static_cast<T*>(args.out) + index * D);
#pragma unroll
      for (int j = 0; j < kDTiles; ++j) {
        out_row[(8 * j + 2 * quad_col) / 2] = pack2<T>(acc_o[j][2 * r] * inverse, acc_o[j][2 * r + 1] * inverse);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// influence

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) influence_kernel(const InfluenceArgs args) {
  constexpr int kLd = D + kRowPad;
  extern __shared__ __align__(16) unsigned char shared[];
  T* k_tile = reinterpret_cast<T*>(shared);
  T* q_tiles = k_tile + kTile * kLd;                                          // 2 buffers
  float* lse_tiles = reinterpret_cast<float*>(q_tiles + 2 * kTile * kLd);  // 2 buffers of kTile

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int quad_row = lane >> 2;
  const int quad_col = lane & 3;

  const int n = args.n_keys;
  const int tiles = (n + kTile - 1) / kTile;
  const std::int64_t bh = blockIdx.x / tiles;
  const int n0 = static_cast<int>(blockIdx.x % tiles) * kTile;
  const int b = static_cast<int>(bh / args.heads);
  const int h = static_cast<int>(bh % args.heads);
  const int kv = h / (args.heads / args.kv_heads);
  const T* q = static_cast<const T*>(args.q) + b * args.q_stride[0] + h * args.q_stride[1];
  const T* k = static_cast<const T*>(args.k) + b * args.k_stride[0] + kv * args.k_stride[1];
  const float* lse2 = args.lse2 + bh * args.padded_keys;

  load_tile<T, D>(k_tile, k, args.k_stride[2], n0, n);
  load_tile<T, D>(q_tiles, q, args.q_stride[2], 0, n);
  load_row(lse_tiles, lse2);
  cp_async_commit();

  std::uint32_t k_fragment[D / 16][4];
  float col_sum[2] = {0.0f, 0.0f};  // keys g and g + 8 of the warp's 16 (this thread's queries only)
  const float qk_scale = args.qk_scale;
  const int n_blocks = tiles;
  for (int block = 0; block < n_blocks; ++block) {
    const int buffer = block & 1;
    if (block + 1 < n_blocks) {  // its buffer was last read in block - 1, before that block's final barrier
      load_tile<T, D>(q_tiles + (buffer ^ 1) * kTile * kLd, q, args.q_stride[2], (block + 1) * kTile, n);
      load_row(lse_tiles + (buffer ^ 1) * kTile, lse2 + (block + 1) * kTile);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (block == 0) load_row_fragments<T, D>(k_fragment, k_tile, warp, lane);

    // logits^T: rows = the warp's keys, columns = queries 8j + 2t + c of this query tile.
    float s[kTile / 8][4];
    rows_times_tile<T, D>(s, k_fragment, q_tiles + buffer * kTile * kLd, lane);
    const float* lse_tile = lse_tiles + buffer * kTile;
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
      const float2 row_lse = *reinterpret_cast<const float2*>(lse_tile + 8 * j + 2 * quad_col);
      col_sum[0] += fast_exp2(s[j][0] * qk_scale - row_lse.x) + fast_exp2(s[j][1] * qk_scale - row_lse.y);
      col_sum[1] += fast_exp2(s[j][2] * qk_scale - row_lse.x) + fast_exp2(s[j][3] * qk_scale - row_lse.y);
    }
    __syncthreads();  // every warp is done with this query buffer
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(col_sum[r]);
    const int key = n0 + warp * 16 + quad_row + 8 * r;
    if (quad_col == 0 && key < n) {
      const std::int64_t at = static_cast<std::int64_t>(b) * n + key;
      const bool real_key = args.attention_mask == nullptr || args.attention_mask[at] != 0;
      args.part[bh * n + key] = real_key ? total : 0.0f;  // padded keys: 0 (they do not affect other keys)
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Preparation: the per-key rows the attention kernels read as whole tiles, one thread per element

constexpr int kPrepThreads = 256;

// Key rows (bias, U) of valid_attention from its masks, past N included (bias -inf, U 0).
__global__ void __launch_bounds__(kPrepThreads) key_rows_kernel(const ValidAttentionArgs args) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kPrepThreads + threadIdx.x;
  if (i >= static_cast<std::int64_t>(args.batch) * args.padded_keys) return;
  const std::int64_t b = i / args.padded_keys;
  const int key = static_cast<int>(i % args.padded_keys);
  const std::int64_t at = b * args.n_keys + key;
  const bool real = key < args.n_keys && (args.attention_mask == nullptr || args.attention_mask[at] != 0);
  const bool in_u = real && args.unmasked != nullptr && args.unmasked[at] != 0;
  float* rows = args.key_rows + b * 2 * args.padded_keys;
  rows[key] = real ? 0.0f : -INFINITY;
  rows[args.padded_keys + key] = in_u ? 1.0f : 0.0f;
}

// influence's rows in base 2: lse * log2(e) where the row counts (real and in the query mask), else +inf.
__global__ void __launch_bounds__(kPrepThreads) lse2_kernel(const InfluenceArgs args) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kPrepThreads + threadIdx.x;
  if (i >= static_cast<std::int64_t>(args.batch) * args.heads * args.padded_keys) return;
  const std::int64_t bh = i / args.padded_keys;
  const int row = static_cast<int>(i % args.padded_keys);
  const std::int64_t at = bh / args.heads * args.n_keys + row;
  const bool counts = row < args.n_keys && (args.attention_mask == nullptr || args.attention_mask[at] != 0) &&
                      (args.query_mask == nullptr || args.query_mask[at] != 0);
  args.lse2[i] = counts ? args.lse[bh * args.n_keys + row] * 1.4426950408889634f : INFINITY;
}

// ---------------------------------------------------------------------------------------------------------
// Launchers

bool aligned_16(const void* pointer) { return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0; }

bool strides_ok(const std::int64_t (&stride)[3]) {
  return stride[0] % 8 == 0 && stride[1] % 8 == 0 && stride[2] % 8 == 0;
}

template <typename Args>
bool grid_size(const Args& args, int rows, unsigned int* blocks) {
  const long long count = static_cast<long long>(args.batch) * args.heads * ((rows + kTile - 1) / kTile);
  if (count > INT_MAX) return false;
  *blocks = static_cast<unsigned int>(count);
  return true;
}

template <typename Args>
cudaError_t launch_prep(void (*kernel)(Args), const Args& args, std::int64_t count, cudaStream_t stream) {
  const std::int64_t blocks = (count + kPrepThreads - 1) / kPrepThreads;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned int>(blocks), kPrepThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int D, bool OUTPUT>
cudaError_t launch_valid_attention_typed(const ValidAttentionArgs& args, unsigned int blocks, cudaStream_t stream) {
  constexpr int kLd = D + kRowPad;
  const int shared_bytes = (OUTPUT ? 3 : 2) * kTile * kLd * static_cast<int>(sizeof(T)) +
                           4 * kTile * static_cast<int>(sizeof(float));  // 2 buffers of key rows
  auto kernel = valid_attention_kernel<T, D, OUTPUT>;
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
  if (status != cudaSuccess) return status;
  kernel<<<blocks, kThreads, shared_bytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_influence_typed(const InfluenceArgs& args, unsigned int blocks, cudaStream_t stream) {
  constexpr int kLd = D + kRowPad;
  const int shared_bytes = 3 * kTile * kLd * static_cast<int>(sizeof(T)) + 2 * kTile * static_cast<int>(sizeof(float));
  auto kernel = influence_kernel<T, D>;
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
  if (status != cudaSuccess) return status;
  kernel<<<blocks, kThreads, shared_bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_valid_attention(const ValidAttentionArgs& args, cudaStream_t stream) {
  const bool output = args.out != nullptr;
  if (args.batch < 0 || args.heads < 1 || args.kv_heads < 1 || args.heads % args.kv_heads != 0 ||
      args.n_queries < 0 || args.n_keys < args.n_queries || args.padded_keys < args.n_keys ||
      args.padded_keys % kTile != 0 || (args.head_dim != 64 && args.head_dim != 128) ||
      (args.dtype != kAttnFloat16 && args.dtype != kAttnBFloat16) || args.s_part == nullptr ||
      args.key_rows == nullptr || (output && args.v == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.n_queries == 0) return cudaSuccess;
  if (!aligned_16(args.q) || !aligned_16(args.k) || !aligned_16(args.key_rows) || !strides_ok(args.q_stride) ||
      !strides_ok(args.k_stride) || (output && (!aligned_16(args.v) || !aligned_16(args.out) ||
                                                 !strides_ok(args.v_stride)))) {
    return cudaErrorInvalidValue;
  }
  unsigned int blocks = 0;
  if (!grid_size(args, args.n_queries, &blocks)) return cudaErrorInvalidConfiguration;
  const cudaError_t prepared =
      launch_prep(key_rows_kernel, args, static_cast<std::int64_t>(args.batch) * args.padded_keys, stream);
  if (prepared != cudaSuccess) return prepared;
#define AGDO_DISPATCH(T, D)                                                                           \
  return output ? launch_valid_attention_typed<T, D, true>(args, blocks, stream)                      \
                : launch_valid_attention_typed<T, D, false>(args, blocks, stream)
  if (args.dtype == kAttnFloat16) {
    if (args.head_dim == 64) AGDO_DISPATCH(__half, 64);
    AGDO_DISPATCH(__half, 128);
  }
  if (args.head_dim == 64) AGDO_DISPATCH(__nv_bfloat16, 64);
  AGDO_DISPATCH(__nv_bfloat16, 128);
#undef AGDO_DISPATCH
}

cudaError_t launch_influence(const InfluenceArgs& args, cudaStream_t stream) {
  if (args.batch < 0 || args.heads < 1 || args.kv_heads < 1 || args.heads % args.kv_heads != 0 ||
      args.n_keys < 0 || args.padded_keys < args.n_keys || args.padded_keys % kTile != 0 ||
      (args.head_dim != 64 && args.head_dim != 128) ||
      (args.dtype != kAttnFloat16 && args.dtype != kAttnBFloat16) || args.part == nullptr || args.lse == nullptr ||
      args.lse2 == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.n_keys == 0) return cudaSuccess;
  if (!aligned_16(args.q) || !aligned_16(args.k) || !aligned_16(args.lse2) || !strides_ok(args.q_stride) ||
      !strides_ok(args.k_stride)) {
    return cudaErrorInvalidValue;
  }
  unsigned int blocks = 0;
  if (!grid_size(args, args.n_keys, &blocks)) return cudaErrorInvalidConfiguration;
  const cudaError_t prepared = launch_prep(
      lse2_kernel, args, static_cast<std::int64_t>(args.batch) * args.heads * args.padded_keys, stream);
  if (prepared != cudaSuccess) return prepared;
  if (args.dtype == kAttnFloat16) {
    return args.head_dim == 64 ? launch_influence_typed<__half, 64>(args, blocks, stream)
                               : launch_influence_typed<__half, 128>(args, blocks, stream);
  }
  return args.head_dim == 64 ? launch_influence_typed<__nv_bfloat16, 64>(args, blocks, stream)
                             : launch_influence_typed<__nv_bfloat16, 128>(args, blocks, stream);
}

}  // namespace agdo
