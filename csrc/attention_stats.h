// Host launchers of the attention-statistics kernels (valid attention S with O/lse, influence I), CUDA part
// of agdo_kernels. Same contract as the Triton backend (agdo_kernels/triton/valid_attention.py, influence.py).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace agdo {

// Element types of q/k/v (and O).
constexpr int kAttnFloat16 = 0;
constexpr int kAttnBFloat16 = 1;

// Rows of every query/key tile. The per-key arrays (key order, base-2 lse) have rows padded to a multiple of
// this, so a tile's slice of them is read without bounds checks.
constexpr int kAttnTile = 64;

// Masks are (B, n_keys) bytes, nonzero = true (torch bool tensors as they are), or null: every key real (the
// attention mask), U empty, every row counted (the query mask).
//
// Key order, int32 (B, padded_keys), and key counts, int32 (B, 2): the order valid_attention visits each batch
// row's keys in — the real keys of U ascending, then the other real keys ascending, then 0s — and (n_u, n_real).
// In that order a key tile is all in U or all out but one, and padded keys are never visited (the statistic
// costs a row-sum add per tile, not a multiply per logit). launch_valid_attention builds both from the masks
// first, in workspaces the caller provides, so a call is two launches and needs no preparation on the host.

// valid_attention. q (B, H, Nq, D), k/v (B, Hkv, N, D), given by their (b, h, n) strides in elements and a
// unit stride along d; every (b, h, n) stride must be a multiple of 8 elements and the base pointers 16-byte
// aligned (16-byte cp.async). Query row i is key N - Nq + i. Writes, for every (b, h, i < Nq):
//   s_part[b, h, i] = sum_{k in U} P[h, i, k]   (0 for a padded query row or a row without real keys)
//   lse[b, h, i]    = natural-log logsumexp     (0 without real keys; only when lse != nullptr)
//   out[b, h, i, :] = softmax @ V in q's dtype  (contiguous (B, H, Nq, D); only when out != nullptr)
struct ValidAttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;  // may be null when out is null
  std::int64_t q_stride[3] = {0, 0, 0};
  std::int64_t k_stride[3] = {0, 0, 0};
  std::int64_t v_stride[3] = {0, 0, 0};
  const std::uint8_t* attention_mask = nullptr;  // (B, N) or null
  const std::uint8_t* unmasked = nullptr;        // (B, N): U, or null
  int* key_order = nullptr;                      // (B, padded_keys) workspace (written here)
  int* key_counts = nullptr;                     // (B, 2) workspace: n_u, n_real (written here)
  float* s_part = nullptr;                       // (B, H, Nq)
  void* out = nullptr;                           // (B, H, Nq, D) contiguous, or null
  float* lse = nullptr;                          // (B, H, Nq), or null
  int batch = 0;
  int heads = 0;
  int kv_heads = 0;
  int n_queries = 0;
  int n_keys = 0;
  int padded_keys = 0;  // multiple of kAttnTile, >= n_keys
  int head_dim = 0;     // 64 or 128
  int dtype = kAttnFloat16;
  float qk_scale = 0.0f;  // softmax scale * log2(e)
};

// influence_sum, per head. q (B, H, N, D), k (B, Hkv, N, D), strides as above. Writes, for every (b, h, key < N):
//   part[b, h, key] = sum_{counted rows i} exp2(q_i . k * qk_scale - lse[b, h, i] * log2(e))   (0 at padded keys)
// where a row counts when it is real (attention_mask) and in query_mask. lse2 (B, H, padded) and extent (B, 4)
// are workspaces the launcher fills first: the rows' lse in base 2 (+inf at rows that do not count and past N),
// and each batch row's [first counted row, last + 1, first real key, last + 1), so that the query tiles outside
// the counted rows and the key tiles without a real key are skipped.
struct InfluenceArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  std::int64_t q_stride[3] = {0, 0, 0};
  std::int64_t k_stride[3] = {0, 0, 0};
  const float* lse = nullptr;                    // (B, H, N) contiguous, natural log
  const std::uint8_t* attention_mask = nullptr;  // (B, N) or null
  const std::uint8_t* query_mask = nullptr;      // (B, N) or null
  float* lse2 = nullptr;                         // (B, H, padded_keys) workspace (written here)
  int* extent = nullptr;                         // (B, 4) workspace (written here)
  float* part = nullptr;                         // (B, H, N)
  int batch = 0;
  int heads = 0;
  int kv_heads = 0;
  int n_keys = 0;
  int padded_keys = 0;
  int head_dim = 0;
  int dtype = kAttnFloat16;
  float qk_scale = 0.0f;
};

// Launch on `stream` (asynchronous). cudaErrorInvalidValue for arguments outside the contract (dtype, head
// dim, heads, sizes, alignment); nothing is launched for empty inputs.
cudaError_t launch_valid_attention(const ValidAttentionArgs& args, cudaStream_t stream);
cudaError_t launch_influence(const InfluenceArgs& args, cudaStream_t stream);

}  // namespace agdo
