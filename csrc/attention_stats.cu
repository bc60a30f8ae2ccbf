// Attention statistics on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate), sm_80 and newer.
//
// valid_attention_kernel — FlashAttention-2 style forward. One CTA of 4 warps per (batch, query head, tile of
// 64 query rows); warp w owns rows 16w..16w+15 and keeps their Q fragments in registers for the whole pass.
// It visits the keys in each batch row's key order (key_order_kernel builds it first): the real keys of U
// ascending, then the other real keys ascending. Softmax, O and lse do not depend on the order keys are summed
// in, and in this order a 64-key tile is all in U (S adds the tile's row sum) or all out (S adds nothing) —
// but the one tile where U ends. Padded keys are never visited; only the last tile has keys past the real
// ones to mask. Key/value tiles stream through shared memory with cp.async, gathered row by row through the
// order (one K and one V buffer: the next K tile loads while the softmax and P@V of this one run, the next V
// tile while the next S = Q K^T runs; the order entries of the tile after are read a tile ahead). The online
// softmax lives in registers (each thread holds 2 rows x 16 keys of a tile). Beside the denominator
// l = sum_k p it keeps u = sum_{k in U} p, rescaled by the same exp2(m_old - m_new) factor, so S_h = u / l is
// exact at the end. P is converted in registers from the accumulator layout to the A-operand layout of the
// P@V mma (no shared-memory round trip).
//
// influence_kernel — FlashAttention-backward structure. One CTA per (batch, query head, tile of 64 keys); warp
// w keeps keys 16w..16w+15 as A fragments in registers and streams the query tiles that hold counted rows
// (double-buffered Q and its base-2 lse) computing the transposed logits K Q^T, so a key's sum over queries is a
// row sum: per-thread partial sums in fp32, reduced over the 4 threads of a quad at the end. A key tile without
// a real key makes no pass.
//
// Head averaging (both kernels): each CTA writes its head's fp32 row to a (B, H, rows) buffer and the caller
// sums over heads (agdo_kernels/_cuda.py). No atomics: every output element is written by exactly one thread
// in a fixed summation order, so results are bitwise reproducible run to run (SPEC §3, and what the Triton
// backend does). A loop over heads inside one CTA would also avoid the buffer, but leaves SMs idle for B = 1
// (B * ceil(N / 64) CTAs).
//
// Shared-memory rows are padded by 8 elements (16 bytes): the 8 row addresses of an ldmatrix phase then fall
// in 8 different 16-byte bank groups (no bank conflicts), and rows stay 16-byte aligned for cp.async.
// Bounds: tile rows past the end are zero-filled by cp.async (src-size 0) and their logits set to -inf
// (valid_attention) or their rows carry lse2 = +inf (influence): p = 0; only rows inside the tensors are written.

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

// A padded per-key row of kTile floats into shared memory, 16 bytes per thread.
__device__ __forceinline__ void load_row(float* dst, const float* src) {
  constexpr int kChunks = kTile * static_cast<int>(sizeof(float)) / 16;
  static_assert(kChunks <= kThreads, "one chunk per thread");
  if (threadIdx.x < kChunks) cp_async_16(smem_address(dst + threadIdx.x * 4), src + threadIdx.x * 4, true);
}

// The tile row of this thread's pair in a key tile gathered through the key order: row `key` of a (keys, D)
// matrix, zero-filled when `inside` is false (positions past the real keys). Two threads per row, each taking
// every other 16-byte chunk: a thread needs one row index, and a pair reads 32 contiguous bytes (one sector)
// per copy.
template <typename T, int D>
__device__ __forceinline__ void load_key_row(T* tile, const T* base, std::int64_t stride, int key, bool inside) {
  constexpr int kLd = D + kRowPad;
  static_assert(kThreads == 2 * kTile, "two threads per tile row");
  const int row = static_cast<int>(threadIdx.x) >> 1;
  const T* src = base + static_cast<std::int64_t>(key) * stride;
  const std::uint32_t dst = smem_address(tile + row * kLd);
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    const int column = (static_cast<int>(threadIdx.x & 1) + 2 * i) * 8;
    cp_async_16(dst + static_cast<std::uint32_t>(column * sizeof(T)), inside ? src + column : base, inside);
  }
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

// The part of a tile's row sums (rows g and g + 8, over this thread's columns; s holds p) that falls on keys of
// U: the tile's first `in_u` keys, U coming first in the key order. Every tile but one has in_u <= 0 or >= kTile.
__device__ __forceinline__ void tile_u_sum(float (&block_u)[2], const float (&s)[kTile / 8][4],
                                           const float (&block_sum)[2], int in_u, int quad_col) {
  if (in_u >= kTile) {
    block_u[0] = block_sum[0];
    block_u[1] = block_sum[1];
    return;
  }
  block_u[0] = block_u[1] = 0.0f;
  if (in_u <= 0) return;
#pragma unroll
  for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      if (8 * j + 2 * quad_col + c < in_u) {
        block_u[0] += s[j][c];
        block_u[1] += s[j][2 + c];
      }
    }
  }
}

template <typename T, int D, bool OUTPUT>
__global__ void __launch_bounds__(kThreads) valid_attention_kernel(const ValidAttentionArgs args) {
  constexpr int kLd = D + kRowPad;
  constexpr int kDTiles = D / 8;  // n-tiles of the output
  extern __shared__ __align__(16) unsigned char shared[];
  T* q_tile = reinterpret_cast<T*>(shared);
  T* k_tile = q_tile + kTile * kLd;
  T* v_tile = k_tile + kTile * kLd;  // only with OUTPUT

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
  const int* order = args.key_order + static_cast<std::int64_t>(b) * args.padded_keys;
  const int n_u = args.key_counts[2 * b];         // the first n_u keys of the order are U's
  const int n_real = args.key_counts[2 * b + 1];  // the first n_real are real
  const int n_blocks = max(1, (n_real + kTile - 1) / kTile);  // without real keys: one tile, all masked
  const int tile_row = static_cast<int>(threadIdx.x) >> 1;   // the key-tile row this thread loads
  int key = order[tile_row];  // its K/V row in the next tile to load (read a tile ahead)

  // Groups in flight: Q, then K0, then V0.
  load_tile<T, D>(q_tile, q, args.q_stride[2], m0, n_queries);
  cp_async_commit();
  load_key_row<T, D>(k_tile, k, args.k_stride[2], key, tile_row < n_real);
  cp_async_commit();
  if constexpr (OUTPUT) {
    load_key_row<T, D>(v_tile, v, args.v_stride[2], key, tile_row < n_real);
    cp_async_commit();
    cp_async_wait<2>();
  } else {
    cp_async_wait<1>();
  }
  if (n_blocks > 1) key = order[kTile + tile_row];
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
  for (int block = 0; block < n_blocks; ++block) {
    const bool more = block + 1 < n_blocks;
    const bool next_inside = (block + 1) * kTile + tile_row < n_real;
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
      load_key_row<T, D>(k_tile, k, args.k_stride[2], key, next_inside);
      cp_async_commit();
    }

    // Keys: column 8j + 2t + c of n-tile j (order position block * kTile + 8j + 2t + c), elements c (row g) and
    // 2 + c (row g + 8). Only the last tile has positions past the real keys: logit -inf there. The logits stay
    // unscaled: the scale is folded into the exp2 argument below.
    const int real_in_tile = n_real - block * kTile;
    if (real_in_tile < kTile) {
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (8 * j + 2 * quad_col + c >= real_in_tile) s[j][c] = s[j][2 + c] = -INFINITY;
        }
      }
    }

    // Online softmax of rows g (r = 0: elements 0, 1) and g + 8 (r = 1: elements 2, 3).
    float reference[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float block_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j) block_max = fmaxf(block_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      const float new_max = fmaxf(row_max[r], quad_max(block_max) * qk_scale);  // qk_scale > 0
      // A row that has only seen masked keys keeps max -inf: subtract 0 instead, so exp2 gives 0, not NaN.
      reference[r] = new_max == -INFINITY ? 0.0f : new_max;
      alpha[r] = fast_exp2(row_max[r] - reference[r]);
      row_max[r] = new_max;
    }
    float block_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = fast_exp2(fmaf(s[j][e], qk_scale, -reference[e >> 1]));
        s[j][e] = p;
        block_sum[e >> 1] += p;
      }
    }
    float block_u[2];
    tile_u_sum(block_u, s, block_sum, n_u - block * kTile, quad_col);  // S
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
        load_key_row<T, D>(v_tile, v, args.v_stride[2], key, next_inside);
        cp_async_commit();
      }
    }
    if (block + 2 < n_blocks) key = order[(block + 2) * kTile + tile_row];
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
      const bool real_row = args.attention_mask == nullptr ||
                            args.attention_mask[static_cast<std::int64_t>(b) * n_keys + n_keys - n_queries + row] != 0;
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

  // The counted rows lie in query tiles [first_block, end_block) (counted_rows_kernel's extent): the others are
  // skipped. A key tile without a real key gets 0 without a pass (as a row without counted rows does).
  const int* extent = args.extent + 4 * b;
  const int first_block = extent[0] / kTile;
  int end_block = (extent[1] + kTile - 1) / kTile;
  if (n0 >= extent[3] || n0 + kTile <= extent[2]) end_block = first_block;
  std::uint32_t k_fragment[D / 16][4];
  if (first_block < end_block) {  // groups in flight: K, then the first query tile
    load_tile<T, D>(k_tile, k, args.k_stride[2], n0, n);
    cp_async_commit();
    load_tile<T, D>(q_tiles, q, args.q_stride[2], first_block * kTile, n);
    load_row(lse_tiles, lse2 + first_block * kTile);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    load_row_fragments<T, D>(k_fragment, k_tile, warp, lane);
  }

  float col_sum[2] = {0.0f, 0.0f};  // keys g and g + 8 of the warp's 16 (this thread's queries only)
  const float qk_scale = args.qk_scale;
  for (int block = first_block, buffer = 0; block < end_block; ++block, buffer ^= 1) {
    if (block + 1 < end_block) {  // its buffer was last read in block - 1, before that block's final barrier
      load_tile<T, D>(q_tiles + (buffer ^ 1) * kTile * kLd, q, args.q_stride[2], (block + 1) * kTile, n);
      load_row(lse_tiles + (buffer ^ 1) * kTile, lse2 + (block + 1) * kTile);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

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
// Preparation: what the attention kernels read besides q/k/v, built on the device from the masks

constexpr int kPrepThreads = 256;

// 0: a padded key, 1: a real key outside U, 2: a real key of U (null masks: every key real, U empty).
__device__ __forceinline__ int key_kind(const std::uint8_t* real, const std::uint8_t* in_u, int key) {
  if (real != nullptr && real[key] == 0) return 0;
  return in_u != nullptr && in_u[key] != 0 ? 2 : 1;
}

// valid_attention's key order, one block per batch row: the real keys of U ascending, then the other real keys
// ascending, then 0 up to padded_keys; key_counts = (n_u, n_real). Each thread takes a contiguous segment of
// the row; the segments' counts are scanned in shared memory (Hillis-Steele), then each thread writes its keys
// at their offsets.
__global__ void __launch_bounds__(kPrepThreads) key_order_kernel(const ValidAttentionArgs args) {
  __shared__ int scanned[2][kPrepThreads];  // inclusive prefix counts of U keys / other real keys
  const int t = static_cast<int>(threadIdx.x);
  const std::int64_t b = blockIdx.x;
  const int n = args.n_keys;
  const int segment = (n + kPrepThreads - 1) / kPrepThreads;
  const int begin = min(n, t * segment);
  const int end = min(n, begin + segment);
  const std::uint8_t* real = args.attention_mask == nullptr ? nullptr : args.attention_mask + b * n;
  const std::uint8_t* in_u = args.unmasked == nullptr ? nullptr : args.unmasked + b * n;

  int count[2] = {0, 0};  // U keys, other real keys
  for (int key = begin; key < end; ++key) {
    const int kind_of_key = key_kind(real, in_u, key);
    if (kind_of_key != 0) ++count[2 - kind_of_key];
  }
  scanned[0][t] = count[0];
  scanned[1][t] = count[1];
  for (int offset = 1; offset < kPrepThreads; offset <<= 1) {
    __syncthreads();
    const int add_u = t >= offset ? scanned[0][t - offset] : 0;
    const int add_other = t >= offset ? scanned[1][t - offset] : 0;
    __syncthreads();
    scanned[0][t] += add_u;
    scanned[1][t] += add_other;
  }
  __syncthreads();
  const int n_u = scanned[0][kPrepThreads - 1];
  const int n_real = n_u + scanned[1][kPrepThreads - 1];
  int* order = args.key_order + b * args.padded_keys;
  int at[2] = {scanned[0][t] - count[0], n_u + scanned[1][t] - count[1]};
  for (int key = begin; key < end; ++key) {
    const int kind_of_key = key_kind(real, in_u, key);
    if (kind_of_key != 0) order[at[2 - kind_of_key]++] = key;
  }
  for (int position = n_real + t; position < args.padded_keys; position += kPrepThreads) order[position] = 0;
  if (t == 0) {
    args.key_counts[2 * b] = n_u;
    args.key_counts[2 * b + 1] = n_real;
  }
}

// influence's rows in base 2, one block per (batch, head) row: lse * log2(e) where the row counts (real and in
// the query mask), else +inf. The block of head 0 also writes the batch row's extent: [first counted row, last
// + 1, first real key, last + 1) ([N, 0, N, 0] when there are none), reduced in shared memory.
__global__ void __launch_bounds__(kPrepThreads) counted_rows_kernel(const InfluenceArgs args) {
  __shared__ int reduced[4][kPrepThreads];
  const int t = static_cast<int>(threadIdx.x);
  const std::int64_t bh = blockIdx.x;
  const std::int64_t b = bh / args.heads;
  const int n = args.n_keys;
  int extent[4] = {n, 0, n, 0};
  for (int row = t; row < args.padded_keys; row += kPrepThreads) {  // ascending: the last one seen is the max
    const std::int64_t at = b * n + row;
    const bool real = row < n && (args.attention_mask == nullptr || args.attention_mask[at] != 0);
    const bool counts = real && (args.query_mask == nullptr || args.query_mask[at] != 0);
    args.lse2[bh * args.padded_keys + row] = counts ? args.lse[bh * n + row] * 1.4426950408889634f : INFINITY;
    if (counts) {
      extent[0] = min(extent[0], row);
      extent[1] = row + 1;
    }
    if (real) {
      extent[2] = min(extent[2], row);
      extent[3] = row + 1;
    }
  }
  if (bh % args.heads != 0) return;  // the whole block: the extent is the same for every head
  for (int i = 0; i < 4; ++i) reduced[i][t] = extent[i];
  for (int stride = kPrepThreads / 2; stride > 0; stride >>= 1) {
    __syncthreads();
    if (t < stride) {
      for (int i = 0; i < 4; ++i) {
        const int other = reduced[i][t + stride];
        reduced[i][t] = i % 2 == 0 ? min(reduced[i][t], other) : max(reduced[i][t], other);
      }
    }
  }
  if (t < 4) args.extent[4 * b + t] = reduced[t][0];
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

// A preparation kernel: one block of kPrepThreads per (batch) or (batch, head) row.
template <typename Args>
cudaError_t launch_per_row(void (*kernel)(Args), const Args& args, long long rows, cudaStream_t stream) {
  if (rows > INT_MAX) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned int>(rows), kPrepThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int D, bool OUTPUT>
cudaError_t launch_valid_attention_typed(const ValidAttentionArgs& args, unsigned int blocks, cudaStream_t stream) {
  constexpr int kLd = D + kRowPad;
  const int shared_bytes = (OUTPUT ? 3 : 2) * kTile * kLd * static_cast<int>(sizeof(T));  // Q, K (and V) tiles
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
      args.key_order == nullptr || args.key_counts == nullptr || (output && args.v == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.n_queries == 0) return cudaSuccess;
  if (!aligned_16(args.q) || !aligned_16(args.k) || !strides_ok(args.q_stride) ||
      !strides_ok(args.k_stride) || (output && (!aligned_16(args.v) || !aligned_16(args.out) ||
                                                 !strides_ok(args.v_stride)))) {
    return cudaErrorInvalidValue;
  }
  unsigned int blocks = 0;
  if (!grid_size(args, args.n_queries, &blocks)) return cudaErrorInvalidConfiguration;
  const cudaError_t prepared = launch_per_row(key_order_kernel, args, args.batch, stream);
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
      args.lse2 == nullptr || args.extent == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.n_keys == 0) return cudaSuccess;
  if (!aligned_16(args.q) || !aligned_16(args.k) || !aligned_16(args.lse2) || !strides_ok(args.q_stride) ||
      !strides_ok(args.k_stride)) {
    return cudaErrorInvalidValue;
  }
  unsigned int blocks = 0;
  if (!grid_size(args, args.n_keys, &blocks)) return cudaErrorInvalidConfiguration;
  const cudaError_t prepared =
      launch_per_row(counted_rows_kernel, args, static_cast<long long>(args.batch) * args.heads, stream);
  if (prepared != cudaSuccess) return prepared;
  if (args.dtype == kAttnFloat16) {
    return args.head_dim == 64 ? launch_influence_typed<__half, 64>(args, blocks, stream)
                               : launch_influence_typed<__half, 128>(args, blocks, stream);
  }
  return args.head_dim == 64 ? launch_influence_typed<__nv_bfloat16, 64>(args, blocks, stream)
                             : launch_influence_typed<__nv_bfloat16, 128>(args, blocks, stream);
}

}  // namespace agdo
