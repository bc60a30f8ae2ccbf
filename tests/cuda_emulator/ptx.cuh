// Stand-in for csrc/ptx.cuh on the CPU emulator: the same wrappers, each running its instruction's emulation
// (emulator.cpp) instead of inline PTX. Same names and signatures, so csrc/attention_stats.cu compiles unchanged.
#pragma once

#include <cstdint>
#include <type_traits>

#include "emulator.h"

namespace agdo {

inline std::uint32_t smem_address(const void* pointer) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(pointer));
}

inline void cp_async_16(std::uint32_t dst, const void* src, bool valid) {
  ::cuda_emulator::cp_async(dst, src, 16, valid ? 16 : 0);
}

inline void cp_async_commit() { ::cuda_emulator::cp_async_commit(); }

template <int PENDING>
inline void cp_async_wait() {
  ::cuda_emulator::cp_async_wait(PENDING);
}

inline void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t address) {
  ::cuda_emulator::ldmatrix_x4(r, address, false);
}

inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t address) {
  ::cuda_emulator::ldmatrix_x4(r, address, true);
}

template <typename T>
inline void mma_16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "f16 or bf16 inputs");
  ::cuda_emulator::mma_m16n8k16(c, a, b0, b1,
                                std::is_same<T, __half>::value ? ::cuda_emulator::MmaType::kFloat16
                                                               : ::cuda_emulator::MmaType::kBFloat16);
}

inline float fast_exp2(float x) { return ::cuda_emulator::ex2_approx_ftz(x); }

}  // namespace agdo
