// cuda_ext's kernels and launch plans (cuda_ext/dequant_matmul_kernels.cuh), compiled for the
// CPU against cuda_emulator.h, behind a C ABI for ctypes (tests/kernels/cuda_emulator.py).
// Each entry point returns "" when the launch went well, else the emulator's first problem.

#include <algorithm>
#include <map>
#include <vector>

#include "cuda_emulator.h"
#include "dequant_matmul_kernels.cuh"
#include "split_k_counters.cuh"

namespace {

thread_local std::string g_error;

template <typename Fn>
const char* run(Fn&& fn) {
  g_error.clear();
  fn(cuda_emu::Stream{&g_error});
  return g_error.c_str();
}

}  // namespace

// dtype: 0 float16, 1 bfloat16. zero_packed may be null (symmetric).
extern "C" const char* emulated_gemv(int dtype, int bits, const void* x, const int32_t* packed,
                                     const void* scale, const int32_t* zero_packed, void* out,
                                     int M, int N, int K, int group_len) {
  return run([&](cuda_emu::Stream stream) {
    auto call = [&](auto tag) {
      using T = decltype(tag);
      const T* xp = static_cast<const T*>(x);
      const T* sp = static_cast<const T*>(scale);
      T* op = static_cast<T*>(out);
      if (bits == 4) compress_kernels::gemv<T, 4>(xp, packed, sp, zero_packed, op, M, N, K, group_len, stream);
      else compress_kernels::gemv<T, 8>(xp, packed, sp, zero_packed, op, M, N, K, group_len, stream);
    };
    if (dtype == 0) call(__half{});
    else call(__nv_bfloat16{});
  });
}

extern "C" const char* emulated_dequantize(int dtype, int bits, const int32_t* packed,
                                           const void* scale, const int32_t* zero_packed,
                                           void* out, int N, int K, int group_len) {
  return run([&](cuda_emu::Stream stream) {
    auto call = [&](auto tag) {
      using T = decltype(tag);
      const T* sp = static_cast<const T*>(scale);
      T* op = static_cast<T*>(out);
      if (bits == 4) compress_kernels::dequantize<T, 4>(packed, sp, zero_packed, op, N, K, group_len, stream);
      else compress_kernels::dequantize<T, 8>(packed, sp, zero_packed, op, N, K, group_len, stream);
    };
    if (dtype == 0) call(__half{});
    else call(__nv_bfloat16{});
  });
}

// The blocks' order in every launch that follows: 0 grid order, else a shuffle by this seed.
extern "C" void emulated_set_block_order(unsigned seed) { cuda_emu::g_block_order_seed = seed; }

// sm_count and blocks_per_sm stand in for the device's multiprocessor count and the chosen
// kernel's occupancy (0: unknown, no one-wave cap): small values make the plan split K. The
// plan's split count and ScaleMode (0 kWeights, 1 kChunk, 2 kEnd) come back through splits
// and scales; whether the last split's block added the partial sums (no second kernel)
// through summed_in_kernel. separate_sum passes no tile counters, as the CUDA op does where
// it has none for the stream. The counters persist across calls, as the CUDA op's do, and
// must be zeros again after each. forced_splits and forced_sum override the plan's choices as
// the CUDA op's `splits` and `sum_in_kernel` do (compress_kernels::MmaOverrides).
extern "C" const char* emulated_mma_gemm(int dtype, int bits, const void* x,
                                         const int32_t* packed, const void* scale,
                                         const int32_t* zero_packed, void* out, int M, int N,
                                         int K, int group_len, int sm_count, int blocks_per_sm,
                                         int forced_splits, int forced_sum, int separate_sum,
                                         int* splits, int* scales, int* summed_in_kernel) {
  static std::vector<int> tile_counters(compress_kernels::kMaxTileCounters, 0);
  return run([&](cuda_emu::Stream stream) {
    if (!compress_kernels::mma_takes_shape(K, group_len, bits)) {  // as the CUDA op refuses
      *stream.error = "mma_gemm: K and the group size must be multiples of " +
                      std::to_string(compress_kernels::mma_slice_k_of(bits));
      return;
    }
    const auto choice = compress_kernels::choose_mma_kernel(M, K, group_len, bits);
    const compress_kernels::MmaPlan plan = compress_kernels::plan_mma(
        choice, M, N, K, bits, sm_count, blocks_per_sm, {forced_splits, forced_sum});
    *splits = plan.splits;
    *scales = static_cast<int>(plan.kernel.scales);
    int* counters = separate_sum ? nullptr : tile_counters.data();
    *summed_in_kernel = plan.sum_in_kernel && counters != nullptr;
    // NaN: a partial sum the reduction reads but no block wrote shows in the output.
    std::vector<float> workspace(plan.workspace_floats, std::nanf(""));
    auto call = [&](auto tag) {
      using T = decltype(tag);
      const compress_kernels::MmaOperands<T> operands{
          static_cast<const T*>(x), packed, static_cast<const T*>(scale), zero_packed,
          static_cast<T*>(out), workspace.data(), counters, M, N, K, group_len};
      if (bits == 4) compress_kernels::mma_gemm<T, 4>(operands, plan, stream);
      else compress_kernels::mma_gemm<T, 8>(operands, plan, stream);
    };
    if (dtype == 0) call(__half{});
    else call(__nv_bfloat16{});
    const bool reset = std::all_of(tile_counters.begin(), tile_counters.end(), [](int c) { return c == 0; });
    if (!reset && stream.error->empty()) *stream.error = "mma_gemm left its tile counters nonzero";
  });
}

// mma_gemm's launch plan alone, for shapes too large to emulate: the chosen kernel's m_rows and
// ScaleMode, blocks_n, splits, chunks_per_split and sum_in_kernel, in that order, into fields.
extern "C" void emulated_plan_mma(int M, int N, int K, int group_len, int bits, int sm_count,
                                  int blocks_per_sm, int forced_splits, int forced_sum,
                                  int* fields) {
  const auto choice = compress_kernels::choose_mma_kernel(M, K, group_len, bits);
  const compress_kernels::MmaPlan plan = compress_kernels::plan_mma(
      choice, M, N, K, bits, sm_count, blocks_per_sm, {forced_splits, forced_sum});
  const int values[] = {plan.kernel.m_rows, static_cast<int>(plan.kernel.scales), plan.blocks_n,
                        plan.splits, plan.chunks_per_split, plan.sum_in_kernel};
  std::copy(std::begin(values), std::end(values), fields);
}

// How many n in [0, n_end) SmallDivisor(d) divides wrongly, with its float inverse moved
// `ulps` units in the last place: the device's fast-math reciprocal is not correctly rounded.
extern "C" long emulated_small_divisor_errors(int d, int n_end, int ulps) {
  compress_kernels::SmallDivisor divisor(d);
  for (int i = 0; i < (ulps < 0 ? -ulps : ulps); ++i) {
    divisor.inverse = std::nextafter(divisor.inverse, ulps > 0 ? 2.f : 0.f);
  }
  long wrong = 0;
  for (int n = 0; n < n_end; ++n) wrong += divisor.divide(n) != n / d;
  return wrong;
}

// compress_kernels::SplitKCounterSets, as the CUDA op drives it, through `count` steps of four
// numbers each in `steps`: device, stream, capture id (-1: outside a capture) and release (1:
// the step hands its capture's set back, as a destroyed graph does; 0: a launch). Per step,
// `sets` gets the set the launch got, as an index into its device's pool (-1: none, -2: a
// release), and `new_leases` whether it was leased to the capture just then. The devices whose
// pool was made go into `pools_made` in order (their count is returned), and the usage of
// devices 0 … devices − 1 after the last step into `usage` (3 numbers each).
extern "C" int emulated_counter_sets(int sets_per_device, int counters_per_set, int count,
                                     const long long* steps, int* sets, int* new_leases,
                                     int* pools_made, int devices, long long* usage) {
  compress_kernels::SplitKCounterSets counter_sets(sets_per_device, counters_per_set);
  std::map<int, std::vector<int>> pools;
  int made = 0;
  auto make_pool = [&](int device) {
    pools_made[made++] = device;
    std::vector<int>& pool = pools[device];
    pool.assign(static_cast<size_t>(sets_per_device) * counters_per_set, 0);
    return pool.data();
  };
  for (int i = 0; i < count; ++i) {
    const long long* step = steps + 4 * i;
    const compress_kernels::CounterLaunch launch{static_cast<int>(step[0]),
                                                 reinterpret_cast<const void*>(step[1]),
                                                 step[2] >= 0, static_cast<unsigned long long>(step[2])};
    new_leases[i] = 0;
    if (step[3] == 1) {
      counter_sets.release(launch);
      sets[i] = -2;
      continue;
    }
    const compress_kernels::CounterLease lease = counter_sets.counters_for(launch, make_pool);
    new_leases[i] = lease.new_capture_lease;
    sets[i] = lease.counters == nullptr
                  ? -1
                  : static_cast<int>((lease.counters - pools.at(launch.device).data()) / counters_per_set);
  }
  for (int device = 0; device < devices; ++device) {
    const std::vector<int64_t> used = counter_sets.usage(device);
    std::copy(used.begin(), used.end(), usage + 3 * device);
  }
  return made;
}
