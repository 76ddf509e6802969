// The device code of cuda_ext: the GEMV, tensor-core GEMM and dequantize kernels and the
// host-side plans that pick their template parameters and launch them. No ATen, no CUDA runtime calls: the file
// that includes this one provides the environment, so the same code is compiled by nvcc
// (dequant_matmul.cu) and run on the CPU by the test emulator (tests/kernels/cuda_emulator/).
//
// The includer provides, before including this file:
//   - __half, __nv_bfloat16 and their float conversions, the CUDA vector types, __ldg,
//     __shfl_xor_sync, __syncthreads, __uint_as_float, threadIdx / blockIdx / blockDim;
//   - COMPRESS_LAUNCH(kernel, grid, block, shared_bytes, stream, args...): launch a kernel
//     (a function pointer) with that many bytes of dynamic shared memory;
//   - compress_shared_memory<T>(): the block's dynamic shared memory as T*;
//   - mma_m16n8k16(d, a, b, T{}): one warp-wide mma.sync.m16n8k16.row.col with float
//     accumulators and T (__half or __nv_bfloat16) operands, fragments laid out as the PTX
//     ISA's "Matrix Fragments for mma.m16n8k16 with floating point type".
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

// ------------------------------------------------------------------ tensor-core GEMM (mma)

constexpr int kMmaWarps = 4;
constexpr int kMmaRowsPerBlock = 16;  // output rows n per block: two mma n-tiles of 8
constexpr int kMmaMaxRows = 64;       // M: up to four mma m-tiles of 16

// Physical k covered by one thread's uint4 of codes: its "slice" (32 for INT4, 16 for INT8).
template <int BITS>
constexpr int mma_slice_k() {
  return 4 * (32 / BITS);
}

// out (M, N) = x (M, K) · dequantize(W)ᵀ on tensor cores, for M ≤ 64, K and the group size
// multiples of the slice.
//
// A block computes 16 output rows n (two n-tiles of 8) for all M (MTILES m-tiles of 16). Its
// four warps, and the grid's blockIdx.y splits, share K out in chunks of four slices: thread
// (g = lane / 4, t = lane % 4) of the warp on chunk c takes slice 4c + t, i.e. one uint4 of
// codes from each of its two rows n (g and 8 + g). No repack is needed because an mma sums
// over its 16 k in any order: step s of a slice feeds the mma's logical k {2t, 2t+1, 2t+8,
// 2t+9} with physical k slice_start + 4s + {0, 1, 2, 3}, for the weights (B, dequantized in
// registers) and the activations (A, one 8-byte load per row) alike.
//
// Partial sums stay in the mma accumulators; the four warps' are added through shared
// memory. With one split the block writes T; with several, each split writes float partial
// sums and sum_splits_kernel adds them in a fixed order (deterministic, no atomics).
template <typename T, int BITS, int MTILES>
__global__ void __launch_bounds__(kWarp* kMmaWarps)
    mma_kernel(const T* __restrict__ x,                  // (M, K), 16-byte aligned
               const int32_t* __restrict__ packed,       // (N, K / per_word), rows 16-byte aligned
               const T* __restrict__ scale,              // (N, groups)
               const int32_t* __restrict__ zero_packed,  // (ceil(N / per_word), groups) or null
               T* __restrict__ out,                      // (M, N), when one split
               float* __restrict__ partials,             // (splits, M, N), when several
               int M, int N, int K, int group_len, int groups, int chunks_per_split) {
  constexpr int kPerWord = 32 / BITS;
  constexpr int kSliceK = mma_slice_k<BITS>();
  constexpr int kSteps = kSliceK / 4;
  constexpr int kTileM = MTILES * 16;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int g = lane / 4;
  const int t = lane % 4;
  const int first_row = blockIdx.x * kMmaRowsPerBlock;
  const int words = K / kPerWord;
  const int slices = K / kSliceK;
  const int chunks = (slices + 3) / 4;
  const int chunk_begin = blockIdx.y * chunks_per_split;
  const int chunk_end = chunk_begin + chunks_per_split < chunks ? chunk_begin + chunks_per_split : chunks;

  // Rows past N read row N − 1 again; their sums are never written.
  int rows[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    rows[j] = first_row + 8 * j + g < N ? first_row + 8 * j + g : N - 1;
  }
  float acc[MTILES][2][4];
#pragma unroll
  for (int mt = 0; mt < MTILES; ++mt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0.f;
    }
  }

  for (int c = chunk_begin + warp; c < chunk_end; c += kMmaWarps) {
    const int slice = 4 * c + t;
    // The last chunk may hold fewer than four slices: a thread without one feeds zeros to
    // the warp's mma (all 32 lanes must take part).
    const bool live = slice < slices;
    const int k0 = slice * kSliceK;
    const int group = live ? k0 / group_len : 0;
    uint4 codes[2];
    float row_scale[2];
    float biased_zero[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      codes[j] = make_uint4(0u, 0u, 0u, 0u);
      row_scale[j] = 0.f;
      biased_zero[j] = kCodeBias;
      if (live) {
        codes[j] = __ldg(reinterpret_cast<const uint4*>(
            packed + static_cast<int64_t>(rows[j]) * words + k0 / kPerWord));
        row_scale[j] = to_float(__ldg(scale + static_cast<int64_t>(rows[j]) * groups + group));
        biased_zero[j] = kCodeBias + zero_of<BITS>(zero_packed, rows[j], group, groups);
      }
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      // B fragment (k × n, "col"): b[0] holds logical k 2t, 2t+1 and b[1] 2t+8, 2t+9 of
      // column n = g, here the codes at physical k0 + 4s + {0, 1} and {2, 3}.
      uint32_t b[2][2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint32_t word = lane_of(codes[j], (4 * s) / kPerWord);
        const int first = (4 * s) % kPerWord;
        float v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          v[q] = (biased_code<BITS>(word, first + q) - biased_zero[j]) * row_scale[j];
        }
        b[j][0] = float_to_bits(v[0], T{}) | (float_to_bits(v[1], T{}) << 16);
        b[j][1] = float_to_bits(v[2], T{}) | (float_to_bits(v[3], T{}) << 16);
      }
#pragma unroll
      for (int mt = 0; mt < MTILES; ++mt) {
        // A fragment (m × k, "row"): a[0] = row g, logical k 2t, 2t+1; a[1] = row g + 8,
        // same k; a[2], a[3] = the same rows at 2t+8, 2t+9. One 8-byte load per row.
        uint32_t a[4];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int m = 16 * mt + 8 * half + g;
          uint2 pair = make_uint2(0u, 0u);
          if (live && m < M) {
            pair = __ldg(reinterpret_cast<const uint2*>(x + static_cast<int64_t>(m) * K + k0 + 4 * s));
          }
          a[half] = pair.x;
          a[2 + half] = pair.y;
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) mma_m16n8k16(acc[mt][j], a, b[j], T{});
      }
    }
  }

  // Accumulator i of n-tile j: row m = 16·mt + g (+8 for i ≥ 2), column 8j + 2t + (i & 1).
  float* partial = compress_shared_memory<float>();  // (kMmaWarps, kTileM, 16)
#pragma unroll
  for (int mt = 0; mt < MTILES; ++mt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = 16 * mt + g + 8 * (i / 2);
        const int n = 8 * j + 2 * t + (i % 2);
        partial[(warp * kTileM + m) * kMmaRowsPerBlock + n] = acc[mt][j][i];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTileM * kMmaRowsPerBlock; i += blockDim.x) {
    const int m = i / kMmaRowsPerBlock;
    const int n = first_row + i % kMmaRowsPerBlock;
    if (m < M && n < N) {
      float sum = 0.f;
#pragma unroll
      for (int v = 0; v < kMmaWarps; ++v) sum += partial[v * kTileM * kMmaRowsPerBlock + i];
      if (partials == nullptr) {
        out[static_cast<int64_t>(m) * N + n] = from_float<T>(sum);
      } else {
        partials[(static_cast<int64_t>(blockIdx.y) * M + m) * N + n] = sum;
      }
    }
  }
}

// out = Σ_split partials[split], in split order.
template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ partials, T* __restrict__ out,
                                  int M, int N, int splits) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t size = static_cast<int64_t>(M) * N;
  if (idx >= size) return;
  float sum = 0.f;
  for (int split = 0; split < splits; ++split) sum += partials[split * size + idx];
  out[idx] = from_float<T>(sum);
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

// How mma_gemm covers the output: enough blocks for two per SM, K split across blocks only
// when the N tiles alone are too few, each split at least one chunk per warp.
struct MmaPlan {
  int m_tiles;
  int blocks_n;
  int splits;
  int chunks_per_split;
  int64_t workspace_floats;  // the float partial sums when splits > 1
};

inline MmaPlan plan_mma(int M, int N, int K, int bits, int sm_count) {
  MmaPlan plan{};
  plan.m_tiles = M <= 16 ? 1 : M <= 32 ? 2 : 4;
  plan.blocks_n = (N + kMmaRowsPerBlock - 1) / kMmaRowsPerBlock;
  const int slice_k = bits == 4 ? mma_slice_k<4>() : mma_slice_k<8>();
  const int chunks = (K / slice_k + 3) / 4;
  const int wanted = (2 * sm_count + plan.blocks_n - 1) / plan.blocks_n;
  const int most = chunks / kMmaWarps > 1 ? chunks / kMmaWarps : 1;
  const int splits = wanted < 1 ? 1 : wanted > most ? most : wanted;
  plan.chunks_per_split = (chunks + splits - 1) / splits;
  plan.splits = (chunks + plan.chunks_per_split - 1) / plan.chunks_per_split;  // none empty
  plan.workspace_floats = plan.splits > 1 ? static_cast<int64_t>(plan.splits) * M * N : 0;
  return plan;
}

template <typename T, int BITS, int MTILES, typename Stream>
void launch_mma(const T* x, const int32_t* packed, const T* scale, const int32_t* zero_packed,
                T* out, float* workspace, const MmaPlan& plan, int M, int N, int K,
                int group_len, Stream stream) {
  auto* kernel = &mma_kernel<T, BITS, MTILES>;
  const dim3 grid(plan.blocks_n, plan.splits);
  const dim3 block(kWarp * kMmaWarps);
  const unsigned shared_bytes = sizeof(float) * kMmaWarps * MTILES * 16 * kMmaRowsPerBlock;
  float* partials = plan.splits > 1 ? workspace : nullptr;
  COMPRESS_LAUNCH(kernel, grid, block, shared_bytes, stream, x, packed, scale, zero_packed, out,
                  partials, M, N, K, group_len, K / group_len, plan.chunks_per_split);
  if (plan.splits > 1) {
    constexpr int kThreads = 256;
    const int64_t size = static_cast<int64_t>(M) * N;
    auto* sum = &sum_splits_kernel<T>;
    COMPRESS_LAUNCH(sum, dim3(static_cast<unsigned>((size + kThreads - 1) / kThreads)),
                    dim3(kThreads), 0u, stream, workspace, out, M, N, plan.splits);
  }
}

// Tensor-core GEMM for 1 ≤ M ≤ kMmaMaxRows. The caller has checked the shapes (K and the
// group size multiples of mma_slice_k<BITS>()), that x and the packed rows are 16-byte
// aligned, and allocated plan.workspace_floats floats of workspace.
template <typename T, int BITS, typename Stream>
void mma_gemm(const T* x, const int32_t* packed, const T* scale, const int32_t* zero_packed,
              T* out, float* workspace, const MmaPlan& plan, int M, int N, int K, int group_len,
              Stream stream) {
  if (N == 0) return;
  if (plan.m_tiles == 1) return launch_mma<T, BITS, 1>(x, packed, scale, zero_packed, out, workspace, plan, M, N, K, group_len, stream);
  if (plan.m_tiles == 2) return launch_mma<T, BITS, 2>(x, packed, scale, zero_packed, out, workspace, plan, M, N, K, group_len, stream);
  return launch_mma<T, BITS, 4>(x, packed, scale, zero_packed, out, workspace, plan, M, N, K, group_len, stream);
}

}  // namespace compress_kernels
