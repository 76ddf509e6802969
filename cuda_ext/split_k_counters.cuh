// Which split-K tile counters each mma_gemm launch gets (add_splits_if_last in
// dequant_matmul_kernels.cuh): the bookkeeping alone, plain C++ with no CUDA calls, so that
// dequant_matmul.cu gives it the CUDA runtime and the emulator tests
// (tests/kernels/cuda_emulator/) drive it with stand-ins.
//
// A set of counters must be zeros when a launch starts, and every launch leaves its set zeros
// again, so two launches may share a set only if they never run at the same time:
//   - launches outside a graph capture on one stream run one after another: one set per
//     (device, stream), held for good (a stream's handle outlives any use of its set);
//   - a captured graph is replayed on whichever stream its caller picks, whenever it likes,
//     beside other graphs and eager launches: each capture sequence gets sets of its own, one
//     per stream it captures on (a capture forked onto two streams has two branches that may
//     run at once). The caller ties such a lease to the graph being captured and hands it
//     back (`release`) when the graph is destroyed: CUDA runs that callback once the graph
//     and every executable made from it are gone and their launches done, so the set is
//     zeros again.
// Sets come from one pool per device, made (as zeros) at its first launch outside a capture:
// during a capture nothing may be allocated or zeroed outside the graph. A launch that gets
// no set (a capture before the pool exists, or every set leased) gets null, and a second
// kernel adds its splits: the same sums, one launch more.

#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace compress_kernels {

// Who launches: the device, the stream (its handle), and the capture sequence the stream is
// recording, if any (CUDA's capture ids are unique over the life of the process).
struct CounterLaunch {
  int device;
  const void* stream;
  bool capturing;
  unsigned long long capture_id;  // only read while capturing
};

// A launch's counters: null (no set), and whether the set was leased to this capture just now
// (the caller must then tie it to the graph, which hands it back through `release`).
struct CounterLease {
  int* counters;
  bool new_capture_lease;
};

class SplitKCounterSets {
 public:
  SplitKCounterSets(int sets_per_device, int counters_per_set)
      : sets_per_device_(sets_per_device), counters_per_set_(counters_per_set) {}

  // The set for `launch`. make_pool(device) returns the device's sets_per_device ×
  // counters_per_set zeros, which the caller keeps for good; it is called at most once per
  // device, outside a capture, under this object's lock.
  template <typename MakePool>
  CounterLease counters_for(const CounterLaunch& launch, MakePool&& make_pool) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const Key key = key_of(launch);
    const auto known = set_of_.find(key);
    if (known != set_of_.end()) return {known->second, false};
    auto pool = pools_.find(launch.device);
    if (pool == pools_.end()) {
      if (launch.capturing) return {nullptr, false};
      pool = pools_.emplace(launch.device, Pool{make_pool(launch.device), {}, 0}).first;
      for (int set = sets_per_device_ - 1; set >= 0; --set) pool->second.free.push_back(set);
    }
    Pool& sets = pool->second;
    if (sets.free.empty()) return {nullptr, false};
    int* counters = sets.base + static_cast<int64_t>(sets.free.back()) * counters_per_set_;
    sets.free.pop_back();
    set_of_.emplace(key, counters);
    if (launch.capturing) ++sets.captured;
    return {counters, launch.capturing};
  }

  // The graph that `launch` captured into is gone: its set goes back to the pool. Called
  // from CUDA's own thread; takes only this object's lock.
  void release(const CounterLaunch& launch) {
    if (!launch.capturing) return;  // a stream's set is held for good
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto held = set_of_.find(key_of(launch));
    if (held == set_of_.end()) return;
    Pool& sets = pools_.at(launch.device);
    sets.free.push_back(static_cast<int>((held->second - sets.base) / counters_per_set_));
    --sets.captured;
    set_of_.erase(held);
  }

  // A device's sets: {held by streams, held by captured graphs, free}.
  std::vector<int64_t> usage(int device) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto pool = pools_.find(device);
    if (pool == pools_.end()) return {0, 0, sets_per_device_};
    const Pool& sets = pool->second;
    const int64_t free = static_cast<int64_t>(sets.free.size());
    return {sets_per_device_ - free - sets.captured, sets.captured, free};
  }

 private:
  using Key = std::tuple<int, const void*, bool, unsigned long long>;
  struct Pool {
    int* base;
    std::vector<int> free;  // set indices, the lowest taken first
    int64_t captured;       // sets leased to captures and not yet released
  };

  static Key key_of(const CounterLaunch& launch) {
    return {launch.device, launch.stream, launch.capturing,
            launch.capturing ? launch.capture_id : 0ull};
  }

  const int sets_per_device_;
  const int counters_per_set_;
  std::mutex mutex_;
  std::map<int, Pool> pools_;
  std::map<Key, int*> set_of_;
};

}  // namespace compress_kernels
