// Python module agdo_kernels._agdo_cuda. It takes raw device pointers and the CUDA stream as integers,
// so it depends on no torch headers or C++ ABI; agdo_kernels/_cuda.py passes tensor.data_ptr() and
// torch.cuda.current_stream().cuda_stream. The CUDA runtime is linked statically (see setup.py).

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention_stats.h"
#include "greedy_order.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) +
                             ")");
  }
}

void greedy_rank(std::uintptr_t columns, std::uintptr_t s0, std::uintptr_t valid, std::uintptr_t rank, int batch,
                 int length, int step_size, int window, int device, std::uintptr_t stream) {
  // This module has its own (static) CUDA runtime: select the tensors' device in it explicitly.
  check(cudaSetDevice(device), "agdo greedy_order: cudaSetDevice");
  check(agdo::launch_greedy_rank(as_pointer<const float>(columns), as_pointer<const float>(s0),
                                 as_pointer<const std::uint8_t>(valid), as_pointer<std::int32_t>(rank), batch, length,
                                 step_size, window, as_pointer<CUstream_st>(stream)),
        "agdo greedy_order kernel launch");
}

using Strides = std::array<std::int64_t, 3>;  // (b, h, n) in elements; d has unit stride

void copy_strides(const Strides& from, std::int64_t (&to)[3]) {
  for (int i = 0; i < 3; ++i) to[i] = from[i];
}

// Null pointers (0) for `v`/`out`/`lse` mean "not asked for", for a mask "none"; see csrc/attention_stats.h.
void valid_attention(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, const Strides& q_stride,
                     const Strides& k_stride, const Strides& v_stride, std::uintptr_t attention_mask,
                     std::uintptr_t unmasked, std::uintptr_t key_order, std::uintptr_t key_counts,
                     std::uintptr_t s_part, std::uintptr_t out, std::uintptr_t lse, int batch, int heads,
                     int kv_heads, int n_queries, int n_keys, int padded_keys, int head_dim, int dtype,
                     float qk_scale, int device, std::uintptr_t stream) {
  check(cudaSetDevice(device), "agdo valid_attention: cudaSetDevice");
  agdo::ValidAttentionArgs args;
  args.q = as_pointer<const void>(q);
  args.k = as_pointer<const void>(k);
  args.v = as_pointer<const void>(v);
  copy_strides(q_stride, args.q_stride);
  copy_strides(k_stride, args.k_stride);
  copy_strides(v_stride, args.v_stride);
  args.attention_mask = as_pointer<const std::uint8_t>(attention_mask);
  args.unmasked = as_pointer<const std::uint8_t>(unmasked);
  args.key_order = as_pointer<int>(key_order);
  args.key_counts = as_pointer<int>(key_counts);
  args.s_part = as_pointer<float>(s_part);
  args.out = as_pointer<void>(out);
  args.lse = as_pointer<float>(lse);
  args.batch = batch;
  args.heads = heads;
  args.kv_heads = kv_heads;
  args.n_queries = n_queries;
  args.n_keys = n_keys;
  args.padded_keys = padded_keys;
  args.head_dim = head_dim;
  args.dtype = dtype;
  args.qk_scale = qk_scale;
  check(agdo::launch_valid_attention(args, as_pointer<CUstream_st>(stream)), "agdo valid_attention kernel launch");
}

void influence_sum(std::uintptr_t q, std::uintptr_t k, const Strides& q_stride, const Strides& k_stride,
                   std::uintptr_t lse, std::uintptr_t attention_mask, std::uintptr_t query_mask,
                   std::uintptr_t lse2, std::uintptr_t extent, std::uintptr_t part, int batch, int heads,
                   int kv_heads, int n_keys, int padded_keys, int head_dim, int dtype, float qk_scale, int device,
                   std::uintptr_t stream) {
  check(cudaSetDevice(device), "agdo influence: cudaSetDevice");
  agdo::InfluenceArgs args;
  args.q = as_pointer<const void>(q);
  args.k = as_pointer<const void>(k);
  copy_strides(q_stride, args.q_stride);
  copy_strides(k_stride, args.k_stride);
  args.lse = as_pointer<const float>(lse);
  args.attention_mask = as_pointer<const std::uint8_t>(attention_mask);
  args.query_mask = as_pointer<const std::uint8_t>(query_mask);
  args.lse2 = as_pointer<float>(lse2);
  args.extent = as_pointer<int>(extent);
  args.part = as_pointer<float>(part);
  args.batch = batch;
  args.heads = heads;
  args.kv_heads = kv_heads;
  args.n_keys = n_keys;
  args.padded_keys = padded_keys;
  args.head_dim = head_dim;
  args.dtype = dtype;
  args.qk_scale = qk_scale;
  check(agdo::launch_influence(args, as_pointer<CUstream_st>(stream)), "agdo influence kernel launch");
}

// "" when this module's CUDA runtime sees a usable device, else why not (no driver, driver too old, ...).
std::string runtime_problem() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
  if (count == 0) return "no CUDA device";
  return "";
}

}  // namespace

PYBIND11_MODULE(_agdo_cuda, m) {
  m.doc() = "CUDA kernels of agdo_kernels (raw device pointers in, launched on the given stream)";
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.attr("GREEDY_MAX_LENGTH") = agdo::kGreedyMaxLength;
  m.def("greedy_rank", &greedy_rank, py::arg("columns"), py::arg("s0"), py::arg("valid"), py::arg("rank"),
        py::arg("batch"), py::arg("length"), py::arg("step_size"), py::arg("window"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Greedy round of every token (-1 where not valid) into `rank`; see csrc/greedy_order.h.");
  m.attr("ATTENTION_TILE") = agdo::kAttnTile;
  m.attr("ATTENTION_FLOAT16") = agdo::kAttnFloat16;
  m.attr("ATTENTION_BFLOAT16") = agdo::kAttnBFloat16;
  m.def("valid_attention", &valid_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_stride"),
        py::arg("k_stride"), py::arg("v_stride"), py::arg("attention_mask"), py::arg("unmasked"),
        py::arg("key_order"), py::arg("key_counts"), py::arg("s_part"), py::arg("out"), py::arg("lse"),
        py::arg("batch"), py::arg("heads"), py::arg("kv_heads"), py::arg("n_queries"), py::arg("n_keys"),
        py::arg("padded_keys"), py::arg("head_dim"), py::arg("dtype"), py::arg("qk_scale"), py::arg("device"),
        py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Per-head S (and O, lse) of one FlashAttention pass; see csrc/attention_stats.h.");
  m.def("influence_sum", &influence_sum, py::arg("q"), py::arg("k"), py::arg("q_stride"), py::arg("k_stride"),
        py::arg("lse"), py::arg("attention_mask"), py::arg("query_mask"), py::arg("lse2"), py::arg("extent"),
        py::arg("part"),
        py::arg("batch"), py::arg("heads"), py::arg("kv_heads"), py::arg("n_keys"), py::arg("padded_keys"),
        py::arg("head_dim"), py::arg("dtype"), py::arg("qk_scale"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Per-head influence column sums over the counted rows, from their lse; see csrc/attention_stats.h.");
  m.def("runtime_problem", &runtime_problem,
        "Empty string when the extension's CUDA runtime sees a device, else the reason it does not.");
}
