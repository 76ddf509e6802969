// Dequantize-matmul for compress's packed INT4 / INT8 weights (compressed-tensors
// pack-quantized layout, see compress/quant/packing.py), FP16 or BF16 activations: the ATen
// side. The kernels and their launch plans are in dequant_matmul_kernels.cuh.
//
// Three ops, registered in the `compress_cuda` namespace and called by the CUDA kernel of
// `compress::dequant_matmul` (compress/kernels.py), which picks one by the number of rows M:
//
//   mma_gemm(x (..., K), weight_packed (N, K·bits/32) int32, scale (N, G), zero_point?, ...,
//            splits = 0, sum_in_kernel = None)
//       → (..., N), for M ≤ 64 rows (x's leading dimensions flattened) on tensor cores
//       (sm_80+), decode shapes included. Weight-read bound: every packed word is read once,
//       straight from the artifact's layout, and used for all M rows. K and the group size
//       must be multiples of 32 (INT4) or 16 (INT8). splits > 0 overrides the launch plan's
//       split of K, and sum_in_kernel its choice of who adds the splits (True: the last
//       block, False: a second kernel), for benchmarks/kernel.py --sweep-splits; the
//       defaults keep the plan's.
//   gemv(x (..., K), ...) → (..., N), on CUDA cores for M ≤ 16, where mma_gemm cannot run
//       (other K or group sizes, unaligned rows). Same single read.
//   dequantize(weight_packed, scale, zero_point?, ...) → (N, K) in the scale's dtype, for
//       larger M, where the caller hands the dense weight to cuBLAS.
//
// A fourth, mma_plan(rows, out_features, in_features, group_size, bits, bfloat16, splits = 0,
// sum_in_kernel = None) → int[], says what mma_gemm would launch on the current device
// (benchmarks/kernel.py shows it), a fifth, split_k_counter_sets() → int[], how the
// current device's split-K counter sets are held (split_k_counters.cuh; the GPU tests read it),
// and a sixth, kernel_architecture() → int, which kernel code the current device runs (0: none,
// and compress/cuda_ops.py keeps the pure-PyTorch path there).
//
// Only what the kernels need is included (the CUDA 13 toolkit here has no cuBLAS headers).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "device_environment.cuh"
#include "dequant_matmul_kernels.cuh"
#include "split_k_counters.cuh"

namespace {

using compress_kernels::kMaxGemvRows;
using compress_kernels::kMaxTileCounters;
using compress_kernels::kMmaMaxRows;

void check_packed(
    const at::Tensor& weight_packed, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, int64_t bits, int64_t group_size,
    int64_t in_features) {
  TORCH_CHECK(bits == 4 || bits == 8, "compress_cuda: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(weight_packed.is_cuda() && scale.is_cuda(),
              "compress_cuda: weight_packed and scale must be CUDA tensors, got ",
              weight_packed.device(), " and ", scale.device());
  TORCH_CHECK(weight_packed.scalar_type() == at::kInt && weight_packed.dim() == 2 &&
                  weight_packed.is_contiguous(),
              "compress_cuda: weight_packed must be contiguous 2-D int32, got ",
              weight_packed.scalar_type(), " ", weight_packed.sizes());
  const int64_t per_word = 32 / bits;
  const int64_t N = weight_packed.size(0);
  TORCH_CHECK(in_features > 0 && in_features % per_word == 0 &&
                  weight_packed.size(1) * per_word == in_features,
              "compress_cuda: weight_packed ", weight_packed.sizes(), " does not hold ",
              in_features, " ", bits, "-bit values per row");
  const int64_t group_len = group_size == -1 ? in_features : group_size;
  TORCH_CHECK(group_len > 0 && in_features % group_len == 0 && group_len % per_word == 0,
              "compress_cuda: group_size ", group_size, " must divide in_features ",
              in_features, " and be a multiple of ", per_word);
  const int64_t groups = in_features / group_len;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == groups &&
                  scale.is_contiguous(),
              "compress_cuda: scale must be contiguous (", N, ", ", groups, "), got ",
              scale.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kHalf || scale.scalar_type() == at::kBFloat16,
              "compress_cuda: scale must be float16 or bfloat16, got ", scale.scalar_type());
  if (zero_point.has_value()) {
    const at::Tensor& z = *zero_point;
    TORCH_CHECK(z.is_cuda() && z.scalar_type() == at::kInt && z.is_contiguous() &&
                    z.dim() == 2 && z.size(0) == (N + per_word - 1) / per_word &&
                    z.size(1) == groups,
                "compress_cuda: zero_point must be contiguous int32 (",
                (N + per_word - 1) / per_word, ", ", groups, ") on CUDA, got ", z.scalar_type(),
                " ", z.sizes(), " on ", z.device());
  }
}

// The CUDA type of an ATen half-precision dtype.
template <typename Fn>
void with_cuda_type(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kHalf) fn(__half{});
  else fn(__nv_bfloat16{});
}

// x of a GEMV-like op: (..., in_features), on the weight's device, in the scale's dtype, with
// 1 to max_rows rows once its leading dimensions are flattened.
void check_activations(const char* op, const at::Tensor& x, const at::Tensor& weight_packed,
                       const at::Tensor& scale, int64_t in_features, int64_t max_rows) {
  TORCH_CHECK(x.is_cuda() && x.device() == weight_packed.device(), "compress_cuda.", op,
              ": x must be on ", weight_packed.device(), ", got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "compress_cuda.", op,
              ": x must be (..., ", in_features, "), got ", x.sizes());
  const int64_t rows = x.numel() / in_features;
  TORCH_CHECK(rows >= 1 && rows <= max_rows, "compress_cuda.", op, ": M must be in [1, ",
              max_rows, "], got ", rows, " rows in x ", x.sizes());
  TORCH_CHECK(x.scalar_type() == scale.scalar_type(), "compress_cuda.", op, ": x is ",
              x.scalar_type(), " but scale is ", scale.scalar_type());
}

// x as the kernels read it: (M, K) rows, contiguous, 16-byte aligned (they load 16-byte
// vectors; a fresh copy of an unaligned view is). The leading dimensions are flattened here
// rather than by the Python caller, where each reshape costs about a microsecond per call.
at::Tensor kernel_rows(const at::Tensor& x, int64_t in_features) {
  at::Tensor rows = x.reshape({-1, in_features}).contiguous();
  return reinterpret_cast<uintptr_t>(rows.data_ptr()) % 16 == 0 ? rows : rows.clone();
}

// The output (..., N) for x (..., K): the kernels write it as contiguous (M, N) rows.
at::Tensor empty_output(const at::Tensor& x, const at::Tensor& weight_packed) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = weight_packed.size(0);
  return at::empty(sizes, x.options());
}

// A tensor's data as T* (T: the CUDA type with_cuda_type names, const for inputs).
template <typename T>
T* data_as(const at::Tensor& tensor) {
  return reinterpret_cast<T*>(tensor.data_ptr());
}

// The packed weight as the kernels take it (arguments already checked by check_packed).
struct PackedOperands {
  const int32_t* packed;
  const int32_t* zero;  // null: symmetric
  int N;
  int K;
  int group_len;
};

PackedOperands packed_operands(const at::Tensor& weight_packed,
                               const std::optional<at::Tensor>& zero_point, int64_t group_size,
                               int64_t in_features) {
  return {weight_packed.data_ptr<int32_t>(),
          zero_point.has_value() ? zero_point->data_ptr<int32_t>() : nullptr,
          static_cast<int>(weight_packed.size(0)), static_cast<int>(in_features),
          static_cast<int>(group_size == -1 ? in_features : group_size)};
}

at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& weight_packed, const at::Tensor& scale,
                const std::optional<at::Tensor>& zero_point, int64_t bits, int64_t group_size,
                int64_t in_features) {
  check_packed(weight_packed, scale, zero_point, bits, group_size, in_features);
  check_activations("gemv", x_in, weight_packed, scale, in_features, kMaxGemvRows);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = kernel_rows(x_in, in_features);
  at::Tensor out = empty_output(x_in, weight_packed);
  const int M = static_cast<int>(x.size(0));
  const PackedOperands w = packed_operands(weight_packed, zero_point, group_size, in_features);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_cuda_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = data_as<const T>(x);
    const T* sp = data_as<const T>(scale);
    if (bits == 4) compress_kernels::gemv<T, 4>(xp, w.packed, sp, w.zero, data_as<T>(out), M, w.N, w.K, w.group_len, stream);
    else compress_kernels::gemv<T, 8>(xp, w.packed, sp, w.zero, data_as<T>(out), M, w.N, w.K, w.group_len, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// mma_gemm's overrides of its launch plan. splits: 0 (the plan's) or a count of K's splits
// that fits the grid's y dimension (plan_mma takes at most one per chunk of K).
compress_kernels::MmaOverrides plan_overrides(const char* op, int64_t splits,
                                              std::optional<bool> sum_in_kernel) {
  TORCH_CHECK(splits >= 0 && splits <= 65535, "compress_cuda.", op,
              ": splits must be 0 (the launch plan's) or in [1, 65535], got ", splits);
  compress_kernels::MmaOverrides overrides;
  overrides.splits = static_cast<int>(splits);
  if (sum_in_kernel.has_value()) overrides.sum_in_kernel = *sum_in_kernel ? 1 : 0;
  return overrides;
}

// A device attribute through the runtime API (ATen's CUDAContext.h needs cuSPARSE headers).
int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// mma_gemm's split-K tile counters: kCounterSets sets of kMaxTileCounters per device (1 MB),
// leased per stream and per captured graph (split_k_counters.cuh says who may share one).
constexpr int kCounterSets = 256;

compress_kernels::SplitKCounterSets& counter_sets() {
  // Never destroyed: CUDA may hand a graph's lease back after static destructors have run
  // (a graph freed while the process exits).
  static auto* sets = new compress_kernels::SplitKCounterSets(kCounterSets, kMaxTileCounters);
  return *sets;
}

// What a captured graph owns (as a CUDA user object) to hand its set back when it is destroyed.
struct GraphLease {
  compress_kernels::CounterLaunch launch;
};

void CUDART_CB release_graph_lease(void* lease) {
  const auto* held = static_cast<const GraphLease*>(lease);
  counter_sets().release(held->launch);
  delete held;
}

// Makes the graph being captured the owner of `launch`'s new lease. CUDA permits every
// operation but destroy and node removal on a graph while it is being captured.
void tie_lease_to_graph(const compress_kernels::CounterLaunch& launch, cudaGraph_t graph) {
  auto* lease = new GraphLease{launch};
  cudaUserObject_t owner = nullptr;
  const cudaError_t made = cudaUserObjectCreate(&owner, lease, release_graph_lease, 1,
                                                cudaUserObjectNoDestructorSync);
  if (made != cudaSuccess) release_graph_lease(lease);
  C10_CUDA_CHECK(made);
  const cudaError_t retained = cudaGraphRetainUserObject(graph, owner, 1, cudaGraphUserObjectMove);
  if (retained != cudaSuccess) cudaUserObjectRelease(owner, 1);  // runs release_graph_lease
  C10_CUDA_CHECK(retained);
}

// The counters for a launch on `stream`, or null (a second kernel then adds the splits).
int* tile_counters(int device, cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  cudaGraph_t graph = nullptr;
#if CUDART_VERSION >= 12000
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &capture_id, &graph));
#else
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo_v2(stream, &status, &capture_id, &graph));
#endif
  if (status == cudaStreamCaptureStatusInvalidated) return nullptr;  // the launch fails anyway
  const compress_kernels::CounterLaunch launch{device, stream,
                                               status == cudaStreamCaptureStatusActive, capture_id};
  const compress_kernels::CounterLease lease = counter_sets().counters_for(launch, [&](int) {
    static std::vector<at::Tensor> pools;  // for good: graphs keep their sets' addresses
    at::Tensor zeros = at::zeros({kCounterSets, kMaxTileCounters},
                                 at::TensorOptions().device(at::kCUDA, device).dtype(at::kInt));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));  // zeros before another stream takes a set
    pools.push_back(zeros);
    return zeros.data_ptr<int>();
  });
  if (lease.new_capture_lease) tie_lease_to_graph(launch, graph);
  return lease.counters;
}

// The current device's counter sets, {held by streams, held by captured graphs, free}: the
// GPU tests check that graphs hand theirs back.
std::vector<int64_t> split_k_counter_sets() {
  return counter_sets().usage(c10::cuda::current_device());
}

// The architecture of the kernel code the current device runs (cudaFuncAttributes'
// binaryVersion: 80 on an A100 or any other 8.x GPU of a prebuilt library, 90 on an H100, or
// what the driver compiled the embedded PTX for on a newer GPU), or 0 where the library holds
// nothing the device can run (before sm_80, or a build for other GPUs). Every kernel is built
// for the same targets, so one kernel answers for all. compress/cuda_ops.py asks once per
// device and keeps the pure-PyTorch path where it is 0, rather than failing at the first launch.
int64_t kernel_architecture() {
  cudaFuncAttributes attributes{};
  const cudaError_t found =
      cudaFuncGetAttributes(&attributes, compress_kernels::dequantize_kernel<__half, 4>);
  if (found == cudaErrorNoKernelImageForDevice || found == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // the answer, not an error for the next launch to report
    return 0;
  }
  C10_CUDA_CHECK(found);
  return attributes.binaryVersion;
}

// Blocks of an mma_kernel instantiation that one SM of `device` holds at once (its registers
// decide): plan_mma launches no more than one wave of them. Cached per kernel and device, since
// the query reads the kernel's attributes on every call.
int resident_blocks(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find({kernel, device});
  if (found != known.end()) return found->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, kernel, compress_kernels::kMmaThreads, compress_kernels::kMmaSharedBytes));
  known.emplace(std::make_pair(kernel, device), blocks);
  return blocks;
}

// mma_gemm's launch plan for M rows on `device` (the current one): the kernel for M and its
// occupancy there, which caps the grid at one wave.
template <typename T, int BITS>
compress_kernels::MmaPlan plan_on_device(int M, int N, int K, int group_len, int device,
                                         const compress_kernels::MmaOverrides& overrides) {
  const auto choice = compress_kernels::choose_mma_kernel(M, K, group_len, BITS);
  int blocks_per_sm = 0;
  compress_kernels::with_mma_kernel<T, BITS>(choice, [&](auto kernel) {
    blocks_per_sm = resident_blocks(reinterpret_cast<const void*>(kernel), device);
  });
  return compress_kernels::plan_mma(choice, M, N, K, BITS,
                                    device_attribute(cudaDevAttrMultiProcessorCount, device),
                                    blocks_per_sm, overrides);
}

// mma_gemm's launch for x's (M, K) rows: the plan, the split-K workspace and counters.
template <typename T, int BITS>
void launch_mma_gemm(const at::Tensor& x, const PackedOperands& w, const at::Tensor& scale,
                     const at::Tensor& out, int device,
                     const compress_kernels::MmaOverrides& overrides, cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0));
  const compress_kernels::MmaPlan plan =
      plan_on_device<T, BITS>(M, w.N, w.K, w.group_len, device, overrides);
  at::Tensor workspace;
  if (plan.workspace_floats > 0) workspace = at::empty({plan.workspace_floats}, x.options().dtype(at::kFloat));
  const compress_kernels::MmaOperands<T> operands{
      data_as<const T>(x), w.packed, data_as<const T>(scale), w.zero, data_as<T>(out),
      plan.workspace_floats > 0 ? workspace.data_ptr<float>() : nullptr,
      plan.sum_in_kernel ? tile_counters(device, stream) : nullptr,
      M, w.N, w.K, w.group_len};
  compress_kernels::mma_gemm<T, BITS>(operands, plan, stream);
}

// What mma_gemm would launch for these shapes (and its overrides) on the current device,
// for benchmarks/kernel.py's tables: [m_rows, ScaleMode, blocks_n, splits, blocks_per_sm,
// sum_in_kernel].
std::vector<int64_t> mma_plan(int64_t rows, int64_t out_features, int64_t in_features,
                              int64_t group_size, int64_t bits, bool bfloat16, int64_t splits,
                              std::optional<bool> sum_in_kernel) {
  TORCH_CHECK(bits == 4 || bits == 8, "compress_cuda.mma_plan: bits must be 4 or 8, got ", bits);
  const auto overrides = plan_overrides("mma_plan", splits, sum_in_kernel);
  TORCH_CHECK(rows >= 1 && rows <= kMmaMaxRows && out_features >= 1 && in_features >= 1,
              "compress_cuda.mma_plan: rows must be in [1, ", kMmaMaxRows,
              "] and the features positive, got ", rows, ", ", out_features, ", ", in_features);
  const int device = c10::cuda::current_device();
  const int group_len = static_cast<int>(group_size == -1 ? in_features : group_size);
  compress_kernels::MmaPlan plan{};
  with_cuda_type(bfloat16 ? at::kBFloat16 : at::kHalf, [&](auto tag) {
    using T = decltype(tag);
    const int M = static_cast<int>(rows), N = static_cast<int>(out_features);
    const int K = static_cast<int>(in_features);
    plan = bits == 4 ? plan_on_device<T, 4>(M, N, K, group_len, device, overrides)
                     : plan_on_device<T, 8>(M, N, K, group_len, device, overrides);
  });
  return {plan.kernel.m_rows, static_cast<int64_t>(plan.kernel.scales), plan.blocks_n, plan.splits,
          plan.blocks_per_sm, plan.sum_in_kernel};
}

at::Tensor mma_gemm(const at::Tensor& x_in, const at::Tensor& weight_packed,
                    const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                    int64_t bits, int64_t group_size, int64_t in_features, int64_t splits,
                    std::optional<bool> sum_in_kernel) {
  check_packed(weight_packed, scale, zero_point, bits, group_size, in_features);
  check_activations("mma_gemm", x_in, weight_packed, scale, in_features, kMmaMaxRows);
  const auto overrides = plan_overrides("mma_gemm", splits, sum_in_kernel);
  const int64_t slice = compress_kernels::mma_slice_k_of(bits);
  const int64_t group_len = group_size == -1 ? in_features : group_size;
  TORCH_CHECK(compress_kernels::mma_takes_shape(in_features, group_len, bits),
              "compress_cuda.mma_gemm: in_features ", in_features, " and group size ", group_len,
              " must be multiples of ", slice, " for INT", bits);
  TORCH_CHECK(in_features / slice < (1 << 20), "compress_cuda.mma_gemm: in_features ",
              in_features, " is over the kernel's 2^20 slices of ", slice);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int device = x_in.device().index();
  TORCH_CHECK(device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 8,
              "compress_cuda.mma_gemm: needs sm_80 or newer (mma.sync m16n8k16)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(weight_packed.data_ptr()) % 16 == 0,
              "compress_cuda.mma_gemm: weight_packed must be 16-byte aligned");
  const at::Tensor x = kernel_rows(x_in, in_features);
  at::Tensor out = empty_output(x_in, weight_packed);
  const PackedOperands w = packed_operands(weight_packed, zero_point, group_size, in_features);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_cuda_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (bits == 4) launch_mma_gemm<T, 4>(x, w, scale, out, device, overrides, stream);
    else launch_mma_gemm<T, 8>(x, w, scale, out, device, overrides, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize(const at::Tensor& weight_packed, const at::Tensor& scale,
                      const std::optional<at::Tensor>& zero_point, int64_t bits,
                      int64_t group_size, int64_t in_features) {
  check_packed(weight_packed, scale, zero_point, bits, group_size, in_features);
  const c10::cuda::CUDAGuard guard(weight_packed.device());
  auto out = at::empty({weight_packed.size(0), in_features}, scale.options());
  if (out.numel() == 0) return out;
  const PackedOperands w = packed_operands(weight_packed, zero_point, group_size, in_features);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_cuda_type(scale.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* sp = data_as<const T>(scale);
    if (bits == 4) compress_kernels::dequantize<T, 4>(w.packed, sp, w.zero, data_as<T>(out), w.N, w.K, w.group_len, stream);
    else compress_kernels::dequantize<T, 8>(w.packed, sp, w.zero, data_as<T>(out), w.N, w.K, w.group_len, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY(compress_cuda, m) {
  m.def(
      "gemv(Tensor x, Tensor weight_packed, Tensor scale, Tensor? zero_point, int bits, "
      "int group_size, int in_features) -> Tensor");
  m.def(
      "mma_gemm(Tensor x, Tensor weight_packed, Tensor scale, Tensor? zero_point, int bits, "
      "int group_size, int in_features, int splits=0, bool? sum_in_kernel=None) -> Tensor");
  m.def(
      "dequantize(Tensor weight_packed, Tensor scale, Tensor? zero_point, int bits, "
      "int group_size, int in_features) -> Tensor");
  m.def(
      "mma_plan(int rows, int out_features, int in_features, int group_size, int bits, "
      "bool bfloat16, int splits=0, bool? sum_in_kernel=None) -> int[]",
      &mma_plan);
  m.def("split_k_counter_sets() -> int[]", &split_k_counter_sets);
  m.def("kernel_architecture() -> int", &kernel_architecture);
}

TORCH_LIBRARY_IMPL(compress_cuda, CUDA, m) {
  m.impl("gemv", &gemv);
  m.impl("mma_gemm", &mma_gemm);
  m.impl("dequantize", &dequantize);
}
