// Dequantize-matmul for compress's packed INT4 / INT8 weights (compressed-tensors
// pack-quantized layout, see compress/quant/packing.py), FP16 or BF16 activations.
//
// Two ops, registered in the `compress_cuda` namespace and called by the CUDA kernel of
// `compress::dequant_matmul` (compress/kernels.py), which picks one by the number of rows M:
//
//   gemv(x (M, K), weight_packed (N, K·bits/32) int32, scale (N, G), zero_point?, ...)
//       → (M, N), for decode shapes (M ≤ 16). Weight-read bound: every packed word is read
//       once, straight from the artifact's layout, and used for all M rows.
//   dequantize(weight_packed, scale, zero_point?, ...) → (N, K) in the scale's dtype, for
//       larger M, where the caller hands the dense weight to cuBLAS.
//
// gemv design: one warp per output row n. Lanes walk the row's packed words in order, so a
// warp reads 32 consecutive words (128 B) per step (coalesced); with K % 32 == 0 each lane
// instead reads 4 words (16 B) at once. Each word holds 32/bits values of one group (groups
// are ≥ 32 wide), so its scale and zero point are looked up once per word. The values are
// dequantized to float, multiplied with the matching 32/bits activations of each of the M
// rows (read through the read-only cache: every warp reuses them), and accumulated in float;
// a warp shuffle reduction ends the row. Zero points are packed along N (32/bits rows per
// word), as the format stores them.
//
// Only what the kernels need is included (the CUDA 13 toolkit here has no cuBLAS headers).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxGemvRows = 16;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The zero point of row n, group g: packed along N, 32/BITS rows per int32 word.
template <int BITS>
__device__ __forceinline__ float zero_of(const int32_t* zero_packed, int n, int g, int groups) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  if (zero_packed == nullptr) return static_cast<float>(1 << (BITS - 1));  // symmetric
  const uint32_t word = static_cast<uint32_t>(zero_packed[(n / kPerWord) * groups + g]);
  return static_cast<float>((word >> ((n % kPerWord) * BITS)) & kMask);
}

// Accumulates one packed word (32/BITS weights starting at column k) into acc[0..M).
template <typename T, int BITS, int MT>
__device__ __forceinline__ void accumulate_word(
    uint32_t word, float scale, float zero, const T* __restrict__ x, int k, int K, int M,
    float (&acc)[MT]) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  float w[kPerWord];
#pragma unroll
  for (int i = 0; i < kPerWord; ++i) {
    w[i] = (static_cast<float>((word >> (i * BITS)) & kMask) - zero) * scale;
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < M) {
      const T* xr = x + static_cast<int64_t>(m) * K + k;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) sum += to_float(__ldg(xr + i)) * w[i];
      acc[m] += sum;
    }
  }
}

template <typename T, int BITS, int MT, bool VEC4>
__global__ void gemv_kernel(
    const T* __restrict__ x,                  // (M, K)
    const int32_t* __restrict__ packed,       // (N, K / per_word)
    const T* __restrict__ scale,              // (N, G)
    const int32_t* __restrict__ zero_packed,  // (ceil(N / per_word), G) or null
    T* __restrict__ out,                      // (M, N)
    int M, int N, int K, int group_len, int groups) {
  constexpr int kPerWord = 32 / BITS;
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;
  const int words = K / kPerWord;
  const int32_t* row = packed + static_cast<int64_t>(n) * words;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  auto do_word = [&](uint32_t word, int w) {
    const int k = w * kPerWord;
    const int g = k / group_len;
    const float s = to_float(scale[static_cast<int64_t>(n) * groups + g]);
    const float z = zero_of<BITS>(zero_packed, n, g, groups);
    accumulate_word<T, BITS, MT>(word, s, z, x, k, K, M, acc);
  };

  if constexpr (VEC4) {
    const int4* row4 = reinterpret_cast<const int4*>(row);
    for (int v = lane; v < words / 4; v += kWarp) {
      const int4 q = __ldg(row4 + v);
      do_word(static_cast<uint32_t>(q.x), 4 * v + 0);
      do_word(static_cast<uint32_t>(q.y), 4 * v + 1);
      do_word(static_cast<uint32_t>(q.z), 4 * v + 2);
      do_word(static_cast<uint32_t>(q.w), 4 * v + 3);
    }
  } else {
    for (int w = lane; w < words; w += kWarp) do_word(static_cast<uint32_t>(__ldg(row + w)), w);
  }

#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0 && m < M) out[static_cast<int64_t>(m) * N + n] = from_float<T>(v);
  }
}

template <typename T, int BITS>
__global__ void dequantize_kernel(
    const int32_t* __restrict__ packed, const T* __restrict__ scale,
    const int32_t* __restrict__ zero_packed, T* __restrict__ out, int N, int K, int group_len,
    int groups) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int words = K / kPerWord;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(N) * words) return;
  const int n = static_cast<int>(idx / words);
  const int w = static_cast<int>(idx % words);
  const int k = w * kPerWord;
  const int g = k / group_len;
  const float s = to_float(scale[static_cast<int64_t>(n) * groups + g]);
  const float z = zero_of<BITS>(zero_packed, n, g, groups);
  const uint32_t word = static_cast<uint32_t>(packed[idx]);
  T* dst = out + static_cast<int64_t>(n) * K + k;
#pragma unroll
  for (int i = 0; i < kPerWord; ++i) {
    dst[i] = from_float<T>((static_cast<float>((word >> (i * BITS)) & kMask) - z) * s);
  }
}

// ------------------------------------------------------------------------------- host side

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

template <typename T, int BITS, int MT>
void launch_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                 const int32_t* zero, at::Tensor& out, int group_len, cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0));
  const int K = static_cast<int>(x.size(1));
  const int N = static_cast<int>(packed.size(0));
  const int groups = static_cast<int>(scale.size(1));
  const dim3 block(kWarp * kWarpsPerBlock);
  const dim3 grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* sp = reinterpret_cast<const T*>(scale.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const int32_t* pp = packed.data_ptr<int32_t>();
  const bool aligned = reinterpret_cast<uintptr_t>(pp) % 16 == 0;
  if (K % 32 == 0 && aligned) {  // rows of whole 16-byte vectors: K / per_word words, 4·j
    gemv_kernel<T, BITS, MT, true><<<grid, block, 0, stream>>>(xp, pp, sp, zero, op, M, N, K,
                                                               group_len, groups);
  } else {
    gemv_kernel<T, BITS, MT, false><<<grid, block, 0, stream>>>(xp, pp, sp, zero, op, M, N, K,
                                                                group_len, groups);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BITS>
void dispatch_rows(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                   const int32_t* zero, at::Tensor& out, int group_len, cudaStream_t stream) {
  const int64_t M = x.size(0);
  if (M <= 1) return launch_gemv<T, BITS, 1>(x, packed, scale, zero, out, group_len, stream);
  if (M <= 2) return launch_gemv<T, BITS, 2>(x, packed, scale, zero, out, group_len, stream);
  if (M <= 4) return launch_gemv<T, BITS, 4>(x, packed, scale, zero, out, group_len, stream);
  if (M <= 8) return launch_gemv<T, BITS, 8>(x, packed, scale, zero, out, group_len, stream);
  return launch_gemv<T, BITS, 16>(x, packed, scale, zero, out, group_len, stream);
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight_packed, const at::Tensor& scale,
                const std::optional<at::Tensor>& zero_point, int64_t bits, int64_t group_size,
                int64_t in_features) {
  check_packed(weight_packed, scale, zero_point, bits, group_size, in_features);
  TORCH_CHECK(x.is_cuda() && x.device() == weight_packed.device(),
              "compress_cuda.gemv: x must be on ", weight_packed.device(), ", got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features && x.is_contiguous(),
              "compress_cuda.gemv: x must be contiguous (M, ", in_features, "), got ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxGemvRows, "compress_cuda.gemv: M must be in [1, ",
              kMaxGemvRows, "], got ", x.size(0));
  TORCH_CHECK(x.scalar_type() == scale.scalar_type(), "compress_cuda.gemv: x is ",
              x.scalar_type(), " but scale is ", scale.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), weight_packed.size(0)}, x.options());
  const int group_len = static_cast<int>(group_size == -1 ? in_features : group_size);
  const int32_t* zero = zero_point.has_value() ? zero_point->data_ptr<int32_t>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kHalf) {
    if (bits == 4) dispatch_rows<__half, 4>(x, weight_packed, scale, zero, out, group_len, stream);
    else dispatch_rows<__half, 8>(x, weight_packed, scale, zero, out, group_len, stream);
  } else {
    if (bits == 4) dispatch_rows<__nv_bfloat16, 4>(x, weight_packed, scale, zero, out, group_len, stream);
    else dispatch_rows<__nv_bfloat16, 8>(x, weight_packed, scale, zero, out, group_len, stream);
  }
  return out;
}

template <typename T, int BITS>
void launch_dequantize(const at::Tensor& packed, const at::Tensor& scale, const int32_t* zero,
                       at::Tensor& out, int group_len, cudaStream_t stream) {
  const int N = static_cast<int>(packed.size(0));
  const int K = static_cast<int>(out.size(1));
  const int64_t total = packed.numel();
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  dequantize_kernel<T, BITS><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      packed.data_ptr<int32_t>(), reinterpret_cast<const T*>(scale.data_ptr()), zero,
      reinterpret_cast<T*>(out.data_ptr()), N, K, group_len, static_cast<int>(scale.size(1)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dequantize(const at::Tensor& weight_packed, const at::Tensor& scale,
                      const std::optional<at::Tensor>& zero_point, int64_t bits,
                      int64_t group_size, int64_t in_features) {
  check_packed(weight_packed, scale, zero_point, bits, group_size, in_features);
  const c10::cuda::CUDAGuard guard(weight_packed.device());
  auto out = at::empty({weight_packed.size(0), in_features}, scale.options());
  if (out.numel() == 0) return out;
  const int group_len = static_cast<int>(group_size == -1 ? in_features : group_size);
  const int32_t* zero = zero_point.has_value() ? zero_point->data_ptr<int32_t>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (scale.scalar_type() == at::kHalf) {
    if (bits == 4) launch_dequantize<__half, 4>(weight_packed, scale, zero, out, group_len, stream);
    else launch_dequantize<__half, 8>(weight_packed, scale, zero, out, group_len, stream);
  } else {
    if (bits == 4) launch_dequantize<__nv_bfloat16, 4>(weight_packed, scale, zero, out, group_len, stream);
    else launch_dequantize<__nv_bfloat16, 8>(weight_packed, scale, zero, out, group_len, stream);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(compress_cuda, m) {
  m.def(
      "gemv(Tensor x, Tensor weight_packed, Tensor scale, Tensor? zero_point, int bits, "
      "int group_size, int in_features) -> Tensor");
  m.def(
      "dequantize(Tensor weight_packed, Tensor scale, Tensor? zero_point, int bits, "
      "int group_size, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(compress_cuda, CUDA, m) {
  m.impl("gemv", &gemv);
  m.impl("dequantize", &dequantize);
}
