// The CPU emulator's runtime: blocks of fibers, barriers, warp-wide instructions, cp.async. See emulator.h.

#include "emulator.h"

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

namespace cuda_emulator {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr int kDefaultSharedLimit = 48 * 1024;
constexpr int kOptInSharedLimit = 227 * 1024;  // sm_90's most dynamic shared memory per block
constexpr std::size_t kStackBytes = 256 * 1024;
constexpr std::size_t kSharedGuard = 256;  // poisoned bytes past the dynamic shared memory, checked per block
constexpr unsigned char kPoison = 0xFF;    // NaN as a half, a bfloat16 and a float

struct Abort {};  // unwinds a fiber once its block has faulted

struct Copy {
  std::uint32_t dst;
  const void* src;
  int bytes;
  int src_bytes;  // the rest of `bytes` is zero-filled
};

struct Barrier {
  int arrived = 0;
  std::uint64_t generation = 0;
  int count = 0;   // sum of the predicates of the generation being gathered (__syncthreads_count)
  int result = 0;  // that sum for the last completed generation
};

struct Thread {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 index{0, 0, 0};
  bool finished = false;
  const Barrier* waiting_on = nullptr;  // blocked until its generation moves past waiting_generation
  std::uint64_t waiting_generation = 0;
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> groups;  // committed and not yet waited for, oldest first
};

struct Warp {
  Barrier barrier;
  int lanes = kWarpSize;
  // What each lane hands to a warp-wide instruction, by generation parity: a lane can only refill a parity
  // after every lane has passed the next barrier, i.e. after all of them read this one.
  std::uint64_t slots[2][kWarpSize][6];
};

struct State {
  std::mutex lock;  // one launch at a time
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier block_barrier;
  int current = -1;
  ucontext_t scheduler;
  std::vector<unsigned char> shared;
  std::size_t shared_size = 0;
  uint3 block{0, 0, 0};
  uint3 dims{0, 1, 1};
  bool faulted = false;
  std::string fault_message;
  bool copies_late = false;
  bool descending = false;  // run the highest-numbered runnable thread first
  const std::function<void()>* body = nullptr;
  std::map<const void*, int> max_dynamic_shared;
  cudaError_t last_error = cudaSuccess;
  std::string last_fault;
};

State& state() {
  static State instance;
  return instance;
}

Thread& self() { return state().threads[state().current]; }

std::string where() {
  State& s = state();
  std::string text = " (block " + std::to_string(s.block.x);
  if (s.current >= 0) text += ", thread " + std::to_string(s.current);
  return text + ")";
}

void fault(const std::string& message) {
  State& s = state();
  if (!s.faulted) {
    s.faulted = true;
    s.fault_message = message + where();
  }
}

void yield() {
  State& s = state();
  swapcontext(&self().context, &s.scheduler);
  if (s.faulted) throw Abort{};
}

void complete(Barrier& barrier) {
  barrier.arrived = 0;
  barrier.result = barrier.count;
  barrier.count = 0;
  ++barrier.generation;
}

int live_threads() {
  int live = 0;
  for (const Thread& thread : state().threads) live += thread.finished ? 0 : 1;
  return live;
}

void wait(Barrier& barrier, int participants) {
  const std::uint64_t generation = barrier.generation;
  if (++barrier.arrived == participants) {
    complete(barrier);
    return;
  }
  Thread& thread = self();
  thread.waiting_on = &barrier;
  thread.waiting_generation = generation;
  while (barrier.generation == generation) yield();
  thread.waiting_on = nullptr;
}

Warp& my_warp() { return state().warps[state().current / kWarpSize]; }
int my_lane() { return state().current % kWarpSize; }

// A warp-wide instruction: every lane deposits `words`, waits for the whole warp, then reads any lane's.
template <int N>
std::uint64_t (*exchange(const std::uint64_t (&words)[N], const char* name))[6] {
  static_assert(N <= 6, "six words per lane");
  Warp& warp = my_warp();
  if (warp.lanes != kWarpSize) fault(std::string(name) + " in a partial warp (every lane must take part)");
  const int parity = static_cast<int>(warp.barrier.generation & 1);
  for (int i = 0; i < N; ++i) warp.slots[parity][my_lane()][i] = words[i];
  wait(warp.barrier, warp.lanes);
  return warp.slots[parity];
}

bool shared_ok(std::uint32_t address, int bytes, int alignment, const char* what) {
  State& s = state();
  if (address % alignment != 0) {
    fault(std::string(what) + ": shared address " + std::to_string(address) + " is not " +
          std::to_string(alignment) + "-byte aligned");
    return false;
  }
  if (static_cast<std::size_t>(address) + bytes > s.shared_size) {
    fault(std::string(what) + ": shared bytes [" + std::to_string(address) + ", " + std::to_string(address + bytes) +
          ") outside the " + std::to_string(s.shared_size) + " bytes of dynamic shared memory");
    return false;
  }
  return true;
}

void perform(const Copy& copy) {
  unsigned char* dst = state().shared.data() + copy.dst;
  if (copy.src_bytes > 0) std::memcpy(dst, copy.src, copy.src_bytes);
  std::memset(dst + copy.src_bytes, 0, copy.bytes - copy.src_bytes);
}

std::uint16_t shared_b16(std::uint32_t address) {
  std::uint16_t value;
  std::memcpy(&value, state().shared.data() + address, sizeof(value));
  return value;
}

void thread_main() {
  State& s = state();
  Thread& thread = self();
  try {
    (*s.body)();
  } catch (const Abort&) {
  }
  thread.finished = true;
  // __syncthreads waits for the threads that have not exited: this exit may complete it.
  const int live = live_threads();
  if (s.block_barrier.arrived > 0 && s.block_barrier.arrived == live) complete(s.block_barrier);
}

bool runnable(const Thread& thread) {
  return !thread.finished &&
         (thread.waiting_on == nullptr || thread.waiting_on->generation != thread.waiting_generation);
}

void resume(int index) {
  State& s = state();
  s.current = index;
  swapcontext(&s.scheduler, &s.threads[index].context);
  s.current = -1;
}

// Always the lowest-numbered runnable thread (highest with `descending`): a warp runs as far ahead of the
// others as the barriers allow, so a write that lands before a slower warp has read (a missing barrier)
// changes what that warp reads.
void run_block() {
  State& s = state();
  const int n = static_cast<int>(s.threads.size());
  for (;;) {
    int next = -1;
    for (int k = 0; k < n && next < 0; ++k) {
      const int i = s.descending ? n - 1 - k : k;
      if (runnable(s.threads[i])) next = i;
    }
    if (next >= 0) {
      resume(next);
      continue;
    }
    int at_block = 0, at_warp = 0, finished = 0;
    for (const Thread& thread : s.threads) {
      if (thread.finished) {
        ++finished;
      } else if (thread.waiting_on == &s.block_barrier) {
        ++at_block;
      } else {
        ++at_warp;
      }
    }
    if (finished == n) return;
    fault("deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads, " + std::to_string(at_warp) +
          " at a warp-wide instruction that not every lane of their warp reached, " + std::to_string(finished) +
          " finished");
    for (int i = 0; i < n; ++i) {  // each unwinds (Abort) and finishes
      if (!s.threads[i].finished) resume(i);
    }
    return;
  }
}

// An environment switch with two values: false for the first (the default), true for the second.
bool setting(const char* name, const std::string& first, const std::string& second) {
  const char* value = std::getenv(name);
  if (value == nullptr || value == first) return false;
  if (value == second) return true;
  throw std::invalid_argument(std::string(name) + " must be '" + first + "' or '" + second + "', not '" + value + "'");
}

}  // namespace

// --- 16-bit floats --------------------------------------------------------------------------------------------

std::uint16_t float_to_half_bits(float value) {
  const _Float16 half = static_cast<_Float16>(value);  // round to nearest even (libgcc)
  std::uint16_t bits;
  std::memcpy(&bits, &half, sizeof(bits));
  return bits;
}

float half_bits_to_float(std::uint16_t bits) {
  _Float16 half;
  std::memcpy(&half, &bits, sizeof(bits));
  return static_cast<float>(half);
}

std::uint16_t float_to_bfloat16_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<std::uint16_t>(bits >> 16);
}

float bfloat16_bits_to_float(std::uint16_t bits) {
  const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// --- the block being run --------------------------------------------------------------------------------------

const uint3& thread_index() { return self().index; }
const uint3& block_index() { return state().block; }
const uint3& block_dim() { return state().dims; }
unsigned char* dynamic_shared() { return state().shared.data(); }

std::size_t shared_offset(const void* pointer) {
  State& s = state();
  const auto* byte = static_cast<const unsigned char*>(pointer);
  if (byte < s.shared.data() || byte > s.shared.data() + s.shared_size) {
    fault("__cvta_generic_to_shared: a pointer outside the " + std::to_string(s.shared_size) +
          " bytes of dynamic shared memory");
    return 0;
  }
  return static_cast<std::size_t>(byte - s.shared.data());
}

void sync_block() { wait(state().block_barrier, live_threads()); }

int sync_block_count(int predicate) {
  Barrier& barrier = state().block_barrier;
  barrier.count += predicate != 0 ? 1 : 0;
  wait(barrier, live_threads());
  return barrier.result;
}

std::uint64_t shuffle_xor(unsigned int mask, std::uint64_t value, int lane_mask, int width) {
  if (mask != 0xFFFFFFFFu || width != kWarpSize) fault("__shfl_xor_sync: only full-warp shuffles are emulated");
  const std::uint64_t words[1] = {value};
  const auto slots = exchange(words, "__shfl_xor_sync");
  const int source = my_lane() ^ lane_mask;
  return source < kWarpSize ? slots[source][0] : value;
}

// --- PTX instructions -------------------------------------------------------------------------------------------

void cp_async(std::uint32_t dst, const void* src, int bytes, int src_bytes) {
  if (!shared_ok(dst, bytes, bytes, "cp.async")) return;
  if (src_bytes > 0 && reinterpret_cast<std::uintptr_t>(src) % bytes != 0) {
    fault("cp.async: a global source not aligned to the copy size");
    return;
  }
  const Copy copy{dst, src, bytes, src_bytes};
  if (state().copies_late) {
    self().open_group.push_back(copy);
  } else {
    perform(copy);
  }
}

void cp_async_commit() {
  Thread& thread = self();
  thread.groups.push_back(std::move(thread.open_group));
  thread.open_group.clear();
}

void cp_async_wait(int pending) {
  Thread& thread = self();
  while (static_cast<int>(thread.groups.size()) > pending) {
    for (const Copy& copy : thread.groups.front()) perform(copy);
    thread.groups.erase(thread.groups.begin());
  }
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8i..8i+7 hold the addresses of rows 0-7 of matrix i
// (16 bytes each). Without .trans, register i of lane l holds row l/4, elements 2(l%4) and 2(l%4)+1 of matrix
// i; with .trans it holds column l/4, elements of rows 2(l%4) and 2(l%4)+1. The lower element in the low half.
void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t address, bool transpose) {
  const std::uint64_t words[1] = {address};
  const auto slots = exchange(words, "ldmatrix");
  const int lane = my_lane();
  for (int i = 0; i < 4; ++i) {
    std::uint32_t first, second;
    if (!transpose) {
      const auto row = static_cast<std::uint32_t>(slots[8 * i + lane / 4][0]);
      first = row + 2 * (2 * (lane % 4));
      second = first + 2;
      if (!shared_ok(row, 16, 16, "ldmatrix")) return;
    } else {
      const auto row0 = static_cast<std::uint32_t>(slots[8 * i + 2 * (lane % 4)][0]);
      const auto row1 = static_cast<std::uint32_t>(slots[8 * i + 2 * (lane % 4) + 1][0]);
      if (!shared_ok(row0, 16, 16, "ldmatrix") || !shared_ok(row1, 16, 16, "ldmatrix")) return;
      first = row0 + 2 * (lane / 4);
      second = row1 + 2 * (lane / 4);
    }
    r[i] = static_cast<std::uint32_t>(shared_b16(first)) | static_cast<std::uint32_t>(shared_b16(second)) << 16;
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A (16x16) B (16x8) + C with, for lane l, g = l/4 and
// t = l%4 (PTX ISA fragment tables): A register j holds row g + 8 (j & 1), columns 2t + 8 (j >> 1) and the
// next; B register j holds rows 2t + 8j and the next, column g; C element e is row g + 8 (e >> 1), column
// 2t + (e & 1). Products are exact in float32; the sum is taken in double and rounded once.
void mma_m16n8k16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1, MmaType type) {
  const std::uint64_t words[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const auto slots = exchange(words, "mma.sync");
  const auto element = [&](int lane, int word, int half) {
    const auto bits = static_cast<std::uint16_t>(slots[lane][word] >> (16 * half));
    return type == MmaType::kFloat16 ? half_bits_to_float(bits) : bfloat16_bits_to_float(bits);
  };
  const int lane = my_lane();
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1);
    const int column = 2 * t + (e & 1);
    double sum = c[e];
    for (int k = 0; k < 16; ++k) {
      const double a_value = element(4 * (row % 8) + (k % 8) / 2, (row / 8) + 2 * (k / 8), k % 2);
      const double b_value = element(4 * column + (k % 8) / 2, 4 + k / 8, k % 2);
      sum += a_value * b_value;
    }
    c[e] = static_cast<float>(sum);
  }
}

// ex2.approx.ftz.f32: subnormal inputs and results flush to zero (exp2f's result rounds correctly, which is
// within the instruction's documented error).
float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

// --- launches -------------------------------------------------------------------------------------------------

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > kOptInSharedLimit) return cudaErrorInvalidValue;
  State& s = state();
  std::lock_guard<std::mutex> guard(s.lock);
  s.max_dynamic_shared[kernel] = bytes;
  return cudaSuccess;
}

void run_grid(const void* kernel, unsigned int grid, unsigned int threads, int shared_bytes,
              const std::function<void()>& body) {
  State& s = state();
  std::lock_guard<std::mutex> guard(s.lock);
  if (grid == 0 || threads == 0 || threads > kMaxThreads) {
    s.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const auto opted = s.max_dynamic_shared.find(kernel);
  const int opted_bytes = opted == s.max_dynamic_shared.end() ? 0 : opted->second;
  const int limit = std::max(kDefaultSharedLimit, opted_bytes);
  if (shared_bytes < 0 || shared_bytes > limit) {
    s.last_error = cudaErrorInvalidValue;  // what the runtime answers past the opted-in size
    return;
  }
  s.copies_late = setting("CUDA_EMULATOR_COPIES", "eager", "late");
  s.descending = setting("CUDA_EMULATOR_ORDER", "ascending", "descending");
  s.body = &body;
  s.faulted = false;
  s.fault_message.clear();
  s.shared_size = static_cast<std::size_t>(shared_bytes);
  s.shared.assign(s.shared_size + kSharedGuard, kPoison);
  s.dims = {threads, 1, 1};
  s.threads = std::vector<Thread>(threads);
  s.warps = std::vector<Warp>((threads + kWarpSize - 1) / kWarpSize);
  for (std::size_t w = 0; w < s.warps.size(); ++w) {
    s.warps[w].lanes = static_cast<int>(std::min<unsigned int>(kWarpSize, threads - w * kWarpSize));
  }
  for (Thread& thread : s.threads) thread.stack.reset(new char[kStackBytes]);

  for (unsigned int block = 0; block < grid && !s.faulted; ++block) {
    s.block = {block, 0, 0};
    std::fill(s.shared.begin(), s.shared.end(), kPoison);
    s.block_barrier = Barrier{};
    for (Warp& warp : s.warps) warp.barrier = Barrier{};
    for (unsigned int i = 0; i < threads; ++i) {
      Thread& thread = s.threads[i];
      thread.index = {i, 0, 0};
      thread.finished = false;
      thread.waiting_on = nullptr;
      thread.open_group.clear();
      thread.groups.clear();
      getcontext(&thread.context);
      thread.context.uc_stack.ss_sp = thread.stack.get();
      thread.context.uc_stack.ss_size = kStackBytes;
      thread.context.uc_link = &s.scheduler;
      makecontext(&thread.context, thread_main, 0);
    }
    run_block();
    for (std::size_t i = s.shared_size; i < s.shared.size(); ++i) {
      if (s.shared[i] != kPoison) {
        fault("a write past the " + std::to_string(s.shared_size) + " bytes of dynamic shared memory");
        break;
      }
    }
  }
  if (s.faulted) {
    s.last_error = cudaErrorIllegalAddress;
    s.last_fault = s.fault_message;
  }
  s.threads.clear();
  s.body = nullptr;
}

}  // namespace cuda_emulator

// --- host runtime API -----------------------------------------------------------------------------------------

cudaError_t cudaGetLastError() {
  auto& s = cuda_emulator::state();
  const cudaError_t status = s.last_error;
  s.last_error = cudaSuccess;
  return status;
}

const char* cudaGetErrorName(cudaError_t status) {
  switch (status) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t status) {
  const auto& fault = cuda_emulator::state().last_fault;
  if (status == cudaErrorIllegalAddress && !fault.empty()) return fault.c_str();
  return cudaGetErrorName(status);
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
