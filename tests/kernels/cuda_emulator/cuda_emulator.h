// A CPU stand-in for the part of the CUDA execution model cuda_ext's kernels use, so that
// the kernels' own source (cuda_ext/dequant_matmul_kernels.cuh) runs, and is tested, on a
// machine without a GPU. It is test code: slow, single-threaded, and strict.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after
// another, in grid order or, when g_block_order_seed is set, in a shuffled order (a kernel
// must not depend on which block runs or finishes first; one block finishing before the next
// starts is one of the orders a GPU may produce). Fibers run until they reach a barrier:
//   - __syncthreads() waits for every thread of the block that has not exited;
//   - __shfl_xor_sync() is a warp barrier: each lane posts its value, and once the whole warp
//     has posted, each reads its partner's (double-buffered by barrier generation);
//   - mma_m16n8k16() is one too: the lanes post their fragments, and each lane rebuilds the
//     16×16 A and 16×8 B tiles from them by the PTX ISA's fragment layout and computes its
//     own accumulators (in float, k in order).
// What real hardware would leave undefined is reported instead of guessed: a full-mask
// shuffle in a warp with exited lanes, a barrier nobody can complete (deadlock), a
// misaligned vector load through __ldg, a write past the dynamic shared memory the launch
// asked for. Dynamic shared memory starts as 0xFF bytes (NaN as float) in every block, so a
// read before a write poisons the result. The first problem of a launch is kept and returned.
//
// Half-precision types and their conversions are the CUDA toolkit's own host implementations
// (cuda_fp16.h, cuda_bf16.h), so rounding matches the device.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#include <random>
#include <string>
#include <vector>

#define __launch_bounds__(...)
// Inlining is the device compiler's business (empty, so that a standard header's
// __attribute__((__noinline__)) included later still parses).
#define __noinline__

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr int kSlotWords = 8;  // 32-bit words a lane can post in one warp exchange
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kSharedCanaryBytes = 64;
constexpr unsigned char kPoison = 0xFF;

enum class State { kReady, kWaiting, kDone };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  uint3 index;
  State state = State::kReady;
};

struct Barrier {
  int arrived = 0;
  unsigned long generation = 0;
};

// One block's threads and barriers. One block runs at a time, so one global instance.
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  uint3 block_index;
  dim3 block_dim;
  dim3 grid_dim;
  int live = 0;
  std::vector<int> live_in_warp;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint32_t> slots;  // warp exchanges: (warps, 2 generations, 32 lanes, kSlotWords)
  std::vector<unsigned char> shared;    // dynamic shared memory + canary
  size_t shared_bytes = 0;
  std::function<void()> body;
  std::string error;
};

inline Block* g_block = nullptr;
// 0: blocks run in grid order (x fastest); otherwise the seed of a shuffled order.
inline unsigned g_block_order_seed = 0;

inline void report(const std::string& problem) {
  if (g_block->error.empty()) g_block->error = problem;
}

inline int linear_thread(const Fiber& f) {
  const dim3& d = g_block->block_dim;
  return static_cast<int>(f.index.x + d.x * (f.index.y + d.y * f.index.z));
}

inline void release(Barrier& barrier, int warp /* -1: the block barrier */) {
  barrier.arrived = 0;
  ++barrier.generation;
  for (Fiber& f : g_block->fibers) {
    if (f.state == State::kWaiting && (warp < 0 || linear_thread(f) / kWarpSize == warp)) {
      f.state = State::kReady;
    }
  }
}

// Arrive at a barrier that `expected` threads must reach; yield until they have.
inline void arrive(Barrier& barrier, int expected, int warp) {
  Fiber& self = g_block->fibers[g_block->current];
  if (++barrier.arrived >= expected) {
    release(barrier, warp);
    return;
  }
  self.state = State::kWaiting;
  swapcontext(&self.context, &g_block->scheduler);
}

inline void fiber_entry() {
  Block& b = *g_block;
  b.body();
  Fiber& self = b.fibers[b.current];
  self.state = State::kDone;
  const int warp = linear_thread(self) / kWarpSize;
  --b.live;
  --b.live_in_warp[warp];
  // An exited thread no longer holds back __syncthreads (as on sm_70+).
  if (b.block_barrier.arrived > 0 && b.block_barrier.arrived >= b.live) release(b.block_barrier, -1);
  if (b.warp_barriers[warp].arrived > 0) {
    report("lane " + std::to_string(linear_thread(self) % kWarpSize) + " of warp " +
           std::to_string(warp) + " exited while its warp waits in a shuffle");
    release(b.warp_barriers[warp], warp);
  }
}  // returns to uc_link: the scheduler

// Run every fiber of the block until all have exited or none can move.
inline void run_block(std::vector<std::vector<char>>& stacks) {
  Block& b = *g_block;
  for (size_t i = 0; i < b.fibers.size(); ++i) {
    Fiber& f = b.fibers[i];
    f.state = State::kReady;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks[i].data();
    f.context.uc_stack.ss_size = stacks[i].size();
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  for (;;) {
    bool moved = false;
    bool all_done = true;
    for (size_t i = 0; i < b.fibers.size(); ++i) {
      if (b.fibers[i].state == State::kReady) {
        b.current = static_cast<int>(i);
        swapcontext(&b.scheduler, &b.fibers[i].context);
        moved = true;
      }
      all_done = all_done && b.fibers[i].state == State::kDone;
    }
    if (all_done) return;
    if (!moved) {
      report("deadlock in block " + std::to_string(b.block_index.x) +
             ": threads wait at a barrier the others never reach");
      return;
    }
  }
}

// Where a launch reports its first problem: the emulator's stand-in for a CUDA stream.
struct Stream {
  std::string* error;
};

// kernel<<<grid, block, shared_bytes>>>(args...), one block at a time; "" when all went well.
template <typename Kernel, typename... Args>
std::string launch(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  Block b;
  g_block = &b;
  b.grid_dim = grid;
  b.block_dim = block;
  b.shared_bytes = shared_bytes;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  const int warps = (threads + kWarpSize - 1) / kWarpSize;
  b.fibers.resize(threads);
  std::vector<std::vector<char>> stacks(threads, std::vector<char>(kStackBytes));
  b.body = [&] { kernel(args...); };
  std::vector<uint3> order;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) order.push_back(uint3{bx, by, bz});
    }
  }
  if (g_block_order_seed != 0) std::shuffle(order.begin(), order.end(), std::mt19937(g_block_order_seed));
  for (const uint3& index : order) {
    if (!b.error.empty()) break;
    b.block_index = index;
    for (int t = 0; t < threads; ++t) {
      const unsigned x = t % block.x, y = (t / block.x) % block.y, z = t / (block.x * block.y);
      b.fibers[t].index = uint3{x, y, z};
    }
    b.live = threads;
    b.live_in_warp.assign(warps, kWarpSize);
    if (threads % kWarpSize != 0) b.live_in_warp.back() = threads % kWarpSize;
    b.block_barrier = Barrier{};
    b.warp_barriers.assign(warps, Barrier{});
    b.slots.assign(static_cast<size_t>(warps) * 2 * kWarpSize * kSlotWords, 0);
    b.shared.assign(shared_bytes + kSharedCanaryBytes, kPoison);
    run_block(stacks);
    for (size_t i = shared_bytes; i < b.shared.size(); ++i) {
      if (b.shared[i] != kPoison) {
        report("block " + std::to_string(index.x) + " wrote past its " +
               std::to_string(shared_bytes) + " bytes of dynamic shared memory");
        break;
      }
    }
  }
  g_block = nullptr;
  return b.error;
}

// Post `count` words for this lane; once the whole warp has, return the warp's posts
// (lane L's at [L · kSlotWords]). Valid until this lane's next exchange but one.
inline const uint32_t* warp_exchange(const uint32_t* words, int count) {
  Block& b = *g_block;
  const int thread = linear_thread(b.fibers[b.current]);
  const int warp = thread / kWarpSize;
  const int lane = thread % kWarpSize;
  if (b.live_in_warp[warp] != kWarpSize) {
    report("warp-wide operation in warp " + std::to_string(warp) + " with " +
           std::to_string(b.live_in_warp[warp]) + " live lanes");
  }
  Barrier& barrier = b.warp_barriers[warp];
  uint32_t* posts =
      b.slots.data() + ((static_cast<size_t>(warp) * 2 + (barrier.generation & 1)) * kWarpSize) * kSlotWords;
  std::memcpy(posts + lane * kSlotWords, words, sizeof(uint32_t) * count);
  arrive(barrier, b.live_in_warp[warp], warp);
  return posts;
}

inline float bits_to_float(uint32_t bits, __half) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}
inline float bits_to_float(uint32_t bits, __nv_bfloat16) {
  uint32_t wide = bits << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

}  // namespace cuda_emu

// ---------------------------------------------------------- the CUDA names the kernels use

#define threadIdx (::cuda_emu::g_block->fibers[::cuda_emu::g_block->current].index)
#define blockIdx (::cuda_emu::g_block->block_index)
#define blockDim (::cuda_emu::g_block->block_dim)
#define gridDim (::cuda_emu::g_block->grid_dim)

inline void __syncthreads() {
  cuda_emu::arrive(cuda_emu::g_block->block_barrier, cuda_emu::g_block->live, -1);
}

template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask) {
  static_assert(sizeof(V) <= 2 * sizeof(uint32_t), "shuffled values are at most 8 bytes");
  if (mask != 0xffffffffu) cuda_emu::report("the emulator supports full-mask shuffles only");
  uint32_t words[2] = {0, 0};
  std::memcpy(words, &value, sizeof(V));
  const int lane = cuda_emu::linear_thread(cuda_emu::g_block->fibers[cuda_emu::g_block->current]) %
                   cuda_emu::kWarpSize;
  const uint32_t* posts = cuda_emu::warp_exchange(words, 2);
  std::memcpy(&value, posts + (lane ^ lane_mask) * cuda_emu::kSlotWords, sizeof(V));
  return value;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += A·B over the warp's fragments.
// The layout, from the PTX ISA (groupID g = lane / 4, threadID_in_group t = lane % 4; each
// register holds two elements, the lower-numbered in the low 16 bits):
//   A: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..2t+1), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B: b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8..2t+9, n g)
//   C/D: d[i] = (row g + 8·(i / 2), column 2t + i % 2)
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], T tag) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const uint32_t* posts = cuda_emu::warp_exchange(mine, 6);
  float A[16][16];
  float B[16][8];
  for (int lane = 0; lane < cuda_emu::kWarpSize; ++lane) {
    const uint32_t* r = posts + lane * cuda_emu::kSlotWords;
    const int g = lane / 4;
    const int t = lane % 4;
    auto lo = [&](uint32_t reg) { return cuda_emu::bits_to_float(reg & 0xFFFFu, tag); };
    auto hi = [&](uint32_t reg) { return cuda_emu::bits_to_float(reg >> 16, tag); };
    A[g][2 * t] = lo(r[0]);
    A[g][2 * t + 1] = hi(r[0]);
    A[g + 8][2 * t] = lo(r[1]);
    A[g + 8][2 * t + 1] = hi(r[1]);
    A[g][2 * t + 8] = lo(r[2]);
    A[g][2 * t + 9] = hi(r[2]);
    A[g + 8][2 * t + 8] = lo(r[3]);
    A[g + 8][2 * t + 9] = hi(r[3]);
    B[2 * t][g] = lo(r[4]);
    B[2 * t + 1][g] = hi(r[4]);
    B[2 * t + 8][g] = lo(r[5]);
    B[2 * t + 9][g] = hi(r[5]);
  }
  const int lane = cuda_emu::linear_thread(cuda_emu::g_block->fibers[cuda_emu::g_block->current]) %
                   cuda_emu::kWarpSize;
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i / 2);
    const int col = 2 * (lane % 4) + i % 2;
    float sum = d[i];
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    d[i] = sum;
  }
}

// A read-only cache load; vector types must be aligned to their size, as on the device.
template <typename V>
V __ldg(const V* address) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(V) != 0) {
    cuda_emu::report("misaligned __ldg of a " + std::to_string(sizeof(V)) + "-byte value");
  }
  return *address;
}

// One block runs at a time, so every write is visible to the next block without a fence,
// and an atomic is a plain read-modify-write.
inline void __threadfence() {}

inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}

// A load that bypasses L1 (another block's writes are not in this one's L1 on the device).
inline float __ldcg(const float* address) { return *address; }

inline float __uint_as_float(unsigned int bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// prmt.b32 in its default mode: byte n of the result is byte s[4n + 2 : 4n] of y:x (x the
// low four). The kernels' selectors leave bit 3 of each nibble (sign replication) clear.
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  unsigned int result = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned int nibble = (s >> (4 * n)) & 0xFu;
    if (nibble & 0x8u) cuda_emu::report("__byte_perm: sign-replicating selectors are not emulated");
    result |= static_cast<unsigned int>((bytes >> (8 * (nibble & 0x7u))) & 0xFFu) << (8 * n);
  }
  return result;
}

// The toolkit's headers have no host __hfma2: a·b + c per half, rounded once (the sum of the
// exact product and c, in double: exact for the kernels' operands).
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  const auto lane = [](float x, float y, float z) {
    return __double2half(static_cast<double>(x) * y + z);
  };
  return __halves2half2(lane(__low2float(a), __low2float(b), __low2float(c)),
                        lane(__high2float(a), __high2float(b), __high2float(c)));
}

template <typename T>
T* compress_shared_memory() {
  return reinterpret_cast<T*>(cuda_emu::g_block->shared.data());
}

#define COMPRESS_LAUNCH(kernel, grid, block, shared_bytes, stream, ...)                \
  do {                                                                                  \
    std::string problem = ::cuda_emu::launch(kernel, grid, block, shared_bytes, __VA_ARGS__); \
    if ((stream).error->empty()) *(stream).error = problem;                             \
  } while (0)
