// A CPU emulator for the CUDA kernels of csrc/, so that CI (which has no GPU) runs them, not only compiles them.
//
// tests/test_cuda_emulated.py compiles csrc/*.cu and csrc/bindings.cpp with the host C++ compiler against this
// folder's stand-ins for <cuda_runtime_api.h>, <cuda_fp16.h>, <cuda_bf16.h> and csrc/ptx.cuh, after three
// textual rewrites of the .cu files (kernel<<<...>>>(...) launches, `extern __shared__` and `__shared__`
// declarations; see the test). The result is an `_agdo_cuda` module with the real bindings that takes host
// pointers.
//
// Execution model: a launch runs its blocks one after another; the threads of a block are fibers (ucontext)
// on one OS thread, switched only at barriers: __syncthreads, and the warp-wide instructions (shuffles,
// ldmatrix, mma.sync) that exchange registers between the 32 lanes of a warp. The lowest-numbered runnable
// thread always runs next (the highest with CUDA_EMULATOR_ORDER=descending), so one warp runs as far ahead of
// the others as the barriers let it: any interleaving the barriers allow is one a GPU may produce.
// Instruction semantics follow the PTX ISA: the fragment layouts of ldmatrix and mma.m16n8k16 are written
// from its tables (tests/cuda_emulator/emulator.cpp), independently of how the kernels use them.
//
// What it checks beyond the results: shared-memory accesses made through addresses (cp.async, ldmatrix) stay
// inside the launch's dynamic shared memory and are 16-byte aligned; shared memory starts poisoned (0xFF
// bytes: NaN halves and floats); every thread of a warp reaches each warp-wide instruction (else a deadlock
// is reported); the dynamic shared memory a launch asks for past 48 KiB was opted into with
// cudaFuncSetAttribute; cp.async copies land either when issued or only at the cp.async.wait_group that
// covers them (CUDA_EMULATOR_COPIES=eager|late). A missing barrier or wait then shows in at least one mode:
// a warp that runs ahead overwrites a tile the others still read, or a tile is read before its copies land
// (stale data or poison). A fault turns the launch into cudaErrorIllegalAddress with a message
// (cudaGetErrorString).
// Not emulated: timing, occupancy, register limits, global-memory bounds (the tests poison around tensors).
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <utility>

// --- CUDA C++ keywords ----------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// --- runtime API types ----------------------------------------------------------------------------------------
#define CUDART_VERSION 0  // the emulator's "runtime": no real CUDA version

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t {  // the values of the real runtime
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct uint3 {
  unsigned int x, y, z;
};

struct alignas(8) float2 {
  float x, y;
};

// --- 16-bit floats: bit containers with round-to-nearest-even conversions ------------------------------------
struct __half {
  std::uint16_t bits;
};
struct __half2 {
  __half x, y;  // x in the low 16 bits
};
struct __nv_bfloat16 {
  std::uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace cuda_emulator {

std::uint16_t float_to_half_bits(float value);
std::uint16_t float_to_bfloat16_bits(float value);
float half_bits_to_float(std::uint16_t bits);
float bfloat16_bits_to_float(std::uint16_t bits);

// --- the block being run --------------------------------------------------------------------------------------
const uint3& thread_index();
const uint3& block_index();
const uint3& block_dim();
unsigned char* dynamic_shared();
std::size_t shared_offset(const void* pointer);  // faults outside the dynamic shared memory

void sync_block();
int sync_block_count(int predicate);
std::uint64_t shuffle_xor(unsigned int mask, std::uint64_t value, int lane_mask, int width);

// --- PTX instructions (tests/cuda_emulator/ptx.cuh) -----------------------------------------------------------
void cp_async(std::uint32_t dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t address, bool transpose);
enum class MmaType { kFloat16, kBFloat16 };
void mma_m16n8k16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1, MmaType type);
float ex2_approx_ftz(float x);

// --- launches -------------------------------------------------------------------------------------------------
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);
void run_grid(const void* kernel, unsigned int grid, unsigned int threads, int shared_bytes,
              const std::function<void()>& body);

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int grid, unsigned int threads, int shared_bytes, cudaStream_t,
            Args&&... args) {
  // Arguments are converted to the kernel's parameter types once, as a real launch copies them.
  auto bound = [kernel, params = std::tuple<Params...>(std::forward<Args>(args)...)]() {
    std::apply(kernel, params);
  };
  run_grid(reinterpret_cast<const void*>(kernel), grid, threads, shared_bytes, bound);
}

}  // namespace cuda_emulator

#define threadIdx (::cuda_emulator::thread_index())
#define blockIdx (::cuda_emulator::block_index())
#define blockDim (::cuda_emulator::block_dim())

// --- device functions -------------------------------------------------------------------------------------------
// The integer min/max of CUDA's device math library (float math is the host's <math.h>).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline void __syncthreads() { ::cuda_emulator::sync_block(); }
inline int __syncthreads_count(int predicate) { return ::cuda_emulator::sync_block_count(predicate); }

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffles move up to 64 bits");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = ::cuda_emulator::shuffle_xor(mask, bits, lane_mask, width);
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}

inline unsigned int __float_as_uint(float value) {
  unsigned int bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline std::size_t __cvta_generic_to_shared(const void* pointer) { return ::cuda_emulator::shared_offset(pointer); }

inline __half2 __floats2half2_rn(float low, float high) {
  return {{::cuda_emulator::float_to_half_bits(low)}, {::cuda_emulator::float_to_half_bits(high)}};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float low, float high) {
  return {{::cuda_emulator::float_to_bfloat16_bits(low)}, {::cuda_emulator::float_to_bfloat16_bits(high)}};
}

// --- host runtime API -----------------------------------------------------------------------------------------
cudaError_t cudaGetLastError();
const char* cudaGetErrorName(cudaError_t status);
const char* cudaGetErrorString(cudaError_t status);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceCount(int* count);

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::cuda_emulator::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}
