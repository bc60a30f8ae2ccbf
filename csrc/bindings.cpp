// Python module agdo_kernels._agdo_cuda. It takes raw device pointers and the CUDA stream as integers,
// so it depends on no torch headers or C++ ABI; agdo_kernels/_cuda.py passes tensor.data_ptr() and
// torch.cuda.current_stream().cuda_stream. The CUDA runtime is linked statically (see setup.py).

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

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
  m.def("runtime_problem", &runtime_problem,
        "Empty string when the extension's CUDA runtime sees a device, else the reason it does not.");
}
