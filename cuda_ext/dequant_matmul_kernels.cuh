// The device code of cuda_ext: the GEMV and dequantize kernels and the host-side plans that
// pick their template parameters and launch them. No ATen, no CUDA runtime calls: the file
// that includes this one provides the environment, so the same code is compiled by nvcc
// (dequant_matmul.cu) and run on the CPU by the test emulator (tests/kernels/cuda_emulator/).
//
// The includer provides, before including this file:
//   - __half, __nv_bfloat16 and their float conversions, the CUDA vector types, __ldg,
//     __shfl_xor_sync, __syncthreads, __uint_as_float, threadIdx / blockIdx / blockDim;
//   - COMPRESS_LAUNCH(kernel, grid, block, shared_bytes, stream, args...): launch a kernel
//     (a function pointer) with that many bytes of dynamic shared memory;
//   - compress_shared_memory<T>(): the block's dynamic shared memory as T*.
//
// Weights are in the artifact's pack-quantized layout (compress/quant/packing.py): row n of
// the (N, K·bits/32) int32 tensor holds the codes of output row n, 32/bits per word, the
// first value in the lowest bits. Zero points are packed the same way along N.

#pragma once

#include <cstdint>

namespace compress_kernels {

constexpr int kWarp = 32;
// GEMV blocks are four warps that split K between them for the same few output rows.
constexpr int kGemvWarps = 4;
constexpr int kMaxGemvRows = 16;
// 2^23: a code q < 2^23 in the low mantissa bits of this float's pattern reads as 2^23 + q.
constexpr uint32_t kCodeBiasBits = 0x4B000000u;
constexpr float kCodeBias = 8388608.f;

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

// The activations one packed word meets, as one vector load: 8 values (16 B) for INT4,
// 4 values (8 B) for INT8, two 16-bit values per 32-bit lane, the first in the low half.
template <int BITS>
struct WordSlice;
template <>
struct WordSlice<4> {
  using type = uint4;
};
template <>
struct WordSlice<8> {
  using type = uint2;
};

// Lane j of a vector, for a j known at compile time (after unrolling).
__device__ __forceinline__ uint32_t lane_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}
__device__ __forceinline__ uint32_t lane_of(const uint2& v, int j) { return j == 0 ? v.x : v.y; }
__device__ __forceinline__ void set_lane(uint4& v, int j, uint32_t bits) {
  if (j == 0) v.x = bits;
  else if (j == 1) v.y = bits;
  else if (j == 2) v.z = bits;
  else v.w = bits;
}
__device__ __forceinline__ void set_lane(uint2& v, int j, uint32_t bits) {
  if (j == 0) v.x = bits;
  else v.y = bits;
}

// 16-bit patterns to and from float. The vectors are taken apart with shifts, not by reading
// them through a T pointer: that aliasing is undefined behaviour which optimizers exploit
// (the emulator's -O2 build returned zeros).
__device__ __forceinline__ float bits_to_float(uint32_t bits, __half) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}
__device__ __forceinline__ float bits_to_float(uint32_t bits, __nv_bfloat16) {
  return __uint_as_float(bits << 16);  // bf16 is the top half of a float
}
__device__ __forceinline__ uint32_t float_to_bits(float v, __half) {
  return static_cast<__half_raw>(__float2half_rn(v)).x;
}
__device__ __forceinline__ uint32_t float_to_bits(float v, __nv_bfloat16) {
  return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(v)).x;
}

// The zero point of row n, group g (packed along N, 32/BITS rows per word); symmetric
// weights (no zero points) are stored offset by 2^(BITS-1).
template <int BITS>
__device__ __forceinline__ float zero_of(const int32_t* zero_packed, int n, int g, int groups) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  if (zero_packed == nullptr) return static_cast<float>(1 << (BITS - 1));
  const uint32_t word = static_cast<uint32_t>(__ldg(zero_packed + (n / kPerWord) * groups + g));
  return static_cast<float>((word >> ((n % kPerWord) * BITS)) & kMask);
}

// Code i of a word as the float 2^23 + q: one shift and one LOP3, where an integer-to-float
// conversion runs at a quarter of the FMA rate. Subtracting 2^23 + zero is then exact.
template <int BITS>
__device__ __forceinline__ float biased_code(uint32_t word, int i) {
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  return __uint_as_float(((word >> (i * BITS)) & kMask) | kCodeBiasBits);
}

// out[m, n] = Σ_k x[m, k] · (q[n, k] − z[n, g(k)]) · s[n, g(k)] for M ≤ MT rows.
//
// Block b computes output rows ROWS·b … ROWS·b + ROWS − 1. Its four warps split K: in each
// step lane l of warp w takes packed word w·32 + l (+ 128 per step) of every row, so a warp
// reads 128 consecutive bytes per row (coalesced), and the 32/BITS activations that word
// meets are one 16-byte (INT4) or 8-byte (INT8) vector load, consecutive across lanes. Each
// activation vector is converted once and used for all ROWS rows; each weight word is
// dequantized once and used for all M rows. Partial sums stay in float registers; a warp
// shuffle reduces each warp's, then the four warps' are added through shared memory.
template <typename T, int BITS, int MT, int ROWS>
__global__ void __launch_bounds__(kWarp* kGemvWarps)
    gemv_kernel(const T* __restrict__ x,                  // (M, K), 16-byte aligned
                const int32_t* __restrict__ packed,       // (N, K / per_word)
                const T* __restrict__ scale,              // (N, groups)
                const int32_t* __restrict__ zero_packed,  // (ceil(N / per_word), groups) or null
                T* __restrict__ out,                      // (M, N)
                int M, int N, int K, int group_len, int groups) {
  constexpr int kPerWord = 32 / BITS;
  using Slice = typename WordSlice<BITS>::type;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int words = K / kPerWord;
  const int first_row = blockIdx.x * ROWS;

  // Rows past N (last block only) read row N − 1 again instead of branching in the loop;
  // their sums are never written.
  int rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) rows[r] = first_row + r < N ? first_row + r : N - 1;

  float acc[ROWS][MT];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
  }

#pragma unroll 2
  for (int w = warp * kWarp + lane; w < words; w += kGemvWarps * kWarp) {
    const int k = w * kPerWord;
    const int g = k / group_len;
    float weight[ROWS][kPerWord];
    float row_scale[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const uint32_t word = static_cast<uint32_t>(__ldg(packed + static_cast<int64_t>(rows[r]) * words + w));
      const float biased_zero = kCodeBias + zero_of<BITS>(zero_packed, rows[r], g, groups);
      row_scale[r] = to_float(__ldg(scale + static_cast<int64_t>(rows[r]) * groups + g));
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) weight[r][i] = biased_code<BITS>(word, i) - biased_zero;
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        const Slice slice =
            __ldg(reinterpret_cast<const Slice*>(x + static_cast<int64_t>(m) * K + k));
        float xs[kPerWord];
#pragma unroll
        for (int i = 0; i < kPerWord; ++i) {
          xs[i] = bits_to_float((lane_of(slice, i / 2) >> (16 * (i % 2))) & 0xFFFFu, T{});
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < kPerWord; ++i) dot = fmaf(weight[r][i], xs[i], dot);
          acc[r][m] = fmaf(dot, row_scale[r], acc[r][m]);
        }
      }
    }
  }

  float* partial = compress_shared_memory<float>();  // (kGemvWarps, ROWS, MT)
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
      }
      if (lane == 0) partial[(warp * ROWS + r) * MT + m] = v;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < ROWS * MT; i += blockDim.x) {
    const int r = i / MT;
    const int m = i % MT;
    if (m < M && first_row + r < N) {
      float sum = 0.f;
#pragma unroll
      for (int v = 0; v < kGemvWarps; ++v) sum += partial[v * ROWS * MT + i];
      out[static_cast<int64_t>(m) * N + first_row + r] = from_float<T>(sum);
    }
  }
}

// out (N, K) = (q − z)·s, one packed word per thread, written as one vector store.
template <typename T, int BITS>
__global__ void dequantize_kernel(const int32_t* __restrict__ packed, const T* __restrict__ scale,
                                  const int32_t* __restrict__ zero_packed, T* __restrict__ out,
                                  int N, int K, int group_len, int groups) {
  constexpr int kPerWord = 32 / BITS;
  using Slice = typename WordSlice<BITS>::type;
  const int words = K / kPerWord;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(N) * words) return;
  const int n = static_cast<int>(idx / words);
  const int k = static_cast<int>(idx % words) * kPerWord;
  const int g = k / group_len;
  const float s = to_float(__ldg(scale + static_cast<int64_t>(n) * groups + g));
  const float biased_zero = kCodeBias + zero_of<BITS>(zero_packed, n, g, groups);
  const uint32_t word = static_cast<uint32_t>(__ldg(packed + idx));
  Slice slice{};
#pragma unroll
  for (int j = 0; j < kPerWord / 2; ++j) {
    const float lo = (biased_code<BITS>(word, 2 * j) - biased_zero) * s;
    const float hi = (biased_code<BITS>(word, 2 * j + 1) - biased_zero) * s;
    set_lane(slice, j, float_to_bits(lo, T{}) | (float_to_bits(hi, T{}) << 16));
  }
  *reinterpret_cast<Slice*>(out + static_cast<int64_t>(n) * K + k) = slice;
}

// ------------------------------------------------------------------- host-side launch plans

// Output rows per GEMV block: four share each activation load while M is small; above that
// the M·ROWS accumulators would crowd the registers.
constexpr int gemv_rows_per_block(int mt) { return mt <= 4 ? 4 : 2; }

template <typename T, int BITS, int MT, typename Stream>
void launch_gemv(const T* x, const int32_t* packed, const T* scale, const int32_t* zero_packed,
                 T* out, int M, int N, int K, int group_len, Stream stream) {
  constexpr int kRows = gemv_rows_per_block(MT);
  auto* kernel = &gemv_kernel<T, BITS, MT, kRows>;
  const dim3 grid((N + kRows - 1) / kRows);
  const dim3 block(kWarp * kGemvWarps);
  const unsigned shared_bytes = sizeof(float) * kGemvWarps * kRows * MT;
  COMPRESS_LAUNCH(kernel, grid, block, shared_bytes, stream, x, packed, scale, zero_packed, out,
                  M, N, K, group_len, K / group_len);
}

// GEMV for 1 ≤ M ≤ kMaxGemvRows; M rounds up to 1, 2, 4, 8 or 16 accumulator rows. The
// caller has checked the shapes and that x is 16-byte aligned.
template <typename T, int BITS, typename Stream>
void gemv(const T* x, const int32_t* packed, const T* scale, const int32_t* zero_packed, T* out,
          int M, int N, int K, int group_len, Stream stream) {
  if (N == 0) return;  // an empty grid is a launch error
  if (M <= 1) return launch_gemv<T, BITS, 1>(x, packed, scale, zero_packed, out, M, N, K, group_len, stream);
  if (M <= 2) return launch_gemv<T, BITS, 2>(x, packed, scale, zero_packed, out, M, N, K, group_len, stream);
  if (M <= 4) return launch_gemv<T, BITS, 4>(x, packed, scale, zero_packed, out, M, N, K, group_len, stream);
  if (M <= 8) return launch_gemv<T, BITS, 8>(x, packed, scale, zero_packed, out, M, N, K, group_len, stream);
  return launch_gemv<T, BITS, 16>(x, packed, scale, zero_packed, out, M, N, K, group_len, stream);
}

template <typename T, int BITS, typename Stream>
void dequantize(const int32_t* packed, const T* scale, const int32_t* zero_packed, T* out, int N,
                int K, int group_len, Stream stream) {
  constexpr int kThreads = 256;
  const int64_t words = static_cast<int64_t>(N) * (K / (32 / BITS));
  if (words == 0) return;
  auto* kernel = &dequantize_kernel<T, BITS>;
  const dim3 grid(static_cast<unsigned>((words + kThreads - 1) / kThreads));
  const dim3 block(kThreads);
  COMPRESS_LAUNCH(kernel, grid, block, 0u, stream, packed, scale, zero_packed, out, N, K,
                  group_len, K / group_len);
}

}  // namespace compress_kernels
