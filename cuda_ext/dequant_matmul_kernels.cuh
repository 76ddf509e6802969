// The device code of cuda_ext: the GEMV, tensor-core GEMM and dequantize kernels and the
// host-side plans that pick their template parameters and launch them. No ATen, no CUDA runtime calls: the file
// that includes this one provides the environment, so the same code is compiled by nvcc
// (dequant_matmul.cu) and run on the CPU by the test emulator (tests/kernels/cuda_emulator/).
//
// The includer provides, before including this file (device_environment.cuh for nvcc):
//   - __half, __nv_bfloat16, their pairs and the paired __hsub2 / __hmul2_rn, their float
//     conversions, the CUDA vector types, __ldg, __byte_perm, __shfl_xor_sync,
//     __syncthreads, __uint_as_float, threadIdx / blockIdx / blockDim / gridDim; for the
//     split-K sums, __threadfence, atomicAdd on int and __ldcg on float;
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
#include <cstring>

namespace compress_kernels {

constexpr int kWarp = 32;
// GEMV blocks are four warps that split K between them for the same few output rows.
constexpr int kGemvWarps = 4;
constexpr int kMaxGemvRows = 16;
// 2^23: a code q < 2^23 in the low mantissa bits of this float's pattern reads as 2^23 + q.
constexpr uint32_t kCodeBiasBits = 0x4B000000u;

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
__device__ __forceinline__ uint32_t bits_of(__half v) { return static_cast<__half_raw>(v).x; }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) {
  return static_cast<__nv_bfloat16_raw>(v).x;
}

// The zero points of one row n (packed along N, 32/BITS rows per word), group by group, with
// the row's word and shift found once: load() reads group g's packed word, code() takes the
// row's zero point out of it. Symmetric weights (no zero points) are stored offset by
// 2^(BITS-1).
template <int BITS>
struct ZeroPoints {
  const int32_t* words;  // null: symmetric
  int shift;
  ZeroPoints() = default;
  __device__ __forceinline__ ZeroPoints(const int32_t* zero_packed, int n, int groups)
      : words(zero_packed == nullptr ? nullptr : zero_packed + (n / (32 / BITS)) * groups),
        shift((n % (32 / BITS)) * BITS) {}
  __device__ __forceinline__ uint32_t load(int g) const {
    return words == nullptr ? 0u : static_cast<uint32_t>(__ldg(words + g));
  }
  __device__ __forceinline__ uint32_t code(uint32_t word) const {
    if (words == nullptr) return 1u << (BITS - 1);
    return (word >> shift) & ((1u << BITS) - 1u);
  }
};

// The zero point of row n, group g, read once. Not through ZeroPoints: its two null checks
// cost the GEMV's per-word loop 15 instructions in 529 (sm_90, benchmarks/kernel_sass.py).
template <int BITS>
__device__ __forceinline__ uint32_t zero_code(const int32_t* zero_packed, int n, int g, int groups) {
  constexpr int kPerWord = 32 / BITS;
  if (zero_packed == nullptr) return 1u << (BITS - 1);
  const uint32_t word = static_cast<uint32_t>(__ldg(zero_packed + (n / kPerWord) * groups + g));
  return (word >> ((n % kPerWord) * BITS)) & ((1u << BITS) - 1u);
}

// 2^23 + zero as a float, by the same bit trick as biased_code (no integer conversion).
template <int BITS>
__device__ __forceinline__ float biased_zero_of(const int32_t* zero_packed, int n, int g, int groups) {
  return __uint_as_float(zero_code<BITS>(zero_packed, n, g, groups) | kCodeBiasBits);
}

// Code i of a word as the float 2^23 + q: one shift and one LOP3, where an integer-to-float
// conversion runs at a quarter of the FMA rate. Subtracting 2^23 + zero is then exact.
template <int BITS>
__device__ __forceinline__ float biased_code(uint32_t word, int i) {
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  return __uint_as_float(((word >> (i * BITS)) & kMask) | kCodeBiasBits);
}

// ------------------------------------------ two values at once, in T's paired arithmetic
//
// The tensor-core A fragments and dequantize need the weights in T, two per register. Made
// through float, each value costs a shift, a LOP3, a subtraction, a multiply and a float → T
// conversion (the conversion at a fraction of the FMA rate). In T's own paired arithmetic
// two values cost four instructions: a byte permute puts their codes in the low mantissa
// bits of the two halves, a LOP3 sets a magic exponent (the halves then read as kMagic + q
// exactly), one paired subtraction of kMagic + z (exact: small integers), one paired
// multiply by the scale. The product is rounded once, as the float path rounds (q − z)·s
// once (the float product is exact), so the results are bit-identical to it.
//
// kMagic + q must be exact in T: fp16 1024 + q (10 mantissa bits) holds INT4 and INT8 codes;
// bf16 128 + q (7 mantissa bits) holds INT4 codes only, so bf16 × INT8 keeps the float path.

template <typename T>
struct Paired;
template <>
struct Paired<__half> {
  using type = __half2;
  static constexpr uint32_t kMagicBits = 0x6400u;  // 1024
  static constexpr int kMantissaBits = 10;
};
template <>
struct Paired<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr uint32_t kMagicBits = 0x4300u;  // 128
  static constexpr int kMantissaBits = 7;
};

template <typename T, int BITS>
constexpr bool paired_dequantize_is_exact() {
  return BITS <= Paired<T>::kMantissaBits;
}

// A register's bits as a pair and back. memcpy, not a pointer cast (undefined behaviour that
// optimizers exploit) and not the two 16-bit halves of the raw types (which nvcc takes apart
// and rebuilds: two instructions per pair).
template <typename T>
__device__ __forceinline__ typename Paired<T>::type paired_from_bits(uint32_t bits) {
  typename Paired<T>::type v;
  memcpy(&v, &bits, sizeof bits);
  return v;
}
template <typename T>
__device__ __forceinline__ uint32_t paired_to_bits(typename Paired<T>::type v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  return bits;
}

// (a & mask) | bits in one LOP3; ptxas does not fuse an AND and an OR of two immediates.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
#if defined(__CUDA_ARCH__)
  uint32_t result;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(result) : "r"(a), "r"(mask), "r"(bits));
  return result;
#else
  return (a & mask) | bits;
#endif
}

// What a row's group contributes to every pair: kMagic + z and the scale, in both halves;
// for fp16 also −(kMagic / 16 + z) = −(64 + z), for codes read 16 times too large (below).
template <typename T>
struct PairedGroup {
  typename Paired<T>::type biased_zero;
  typename Paired<T>::type scale;
  typename Paired<T>::type sixteenth_offset;
};

template <typename T>
__device__ __forceinline__ PairedGroup<T> paired_group(uint32_t zero, T scale) {
  const uint32_t zero_bits = Paired<T>::kMagicBits | zero;  // kMagic + z, exactly
  const uint32_t scale_bits = bits_of(scale);
  // fp16 −(64 + z) for z < 64: sign, the exponent of 64, z in mantissa units of 1/16 (unused
  // for bf16).
  const uint32_t offset_bits = 0xD400u | (zero << 4);
  return {paired_from_bits<T>(zero_bits | (zero_bits << 16)),
          paired_from_bits<T>(scale_bits | (scale_bits << 16)),
          paired_from_bits<T>(offset_bits | (offset_bits << 16))};
}

// Values 2p and 2p + 1 of a packed word, (q − z)·s (kScaled) or q − z, as two T in one
// register (the first in the low half).
template <typename T, int BITS, bool kScaled>
__device__ __forceinline__ uint32_t dequantize_pair(uint32_t word, int p, const PairedGroup<T>& group) {
  static_assert(paired_dequantize_is_exact<T, BITS>(), "kMagic + q is not exact in T");
  constexpr uint32_t kMagic2 = Paired<T>::kMagicBits * 0x10001u;
  uint32_t codes;
  if constexpr (BITS == 4) {
    // Byte p of the word holds both codes (low and high nibble); byte p of word >> 4 holds
    // the second in its low nibble. Put one in each half, keep the low nibbles.
    const uint32_t both = __byte_perm(word, word >> 4, static_cast<uint32_t>(p | ((4 + p) << 8)));
    codes = and_or(both, 0x000F000Fu, kMagic2);
  } else {
    // Bytes 2p and 2p + 1 to the two halves; selector 4 is a zero byte of the second operand.
    codes = __byte_perm(word, 0u, static_cast<uint32_t>((2 * p) | (4 << 4) | ((2 * p + 1) << 8) | (4 << 12))) | kMagic2;
  }
  const typename Paired<T>::type centered = __hsub2(paired_from_bits<T>(codes), group.biased_zero);
  return paired_to_bits<T>(kScaled ? __hmul2_rn(centered, group.scale) : centered);
}

// Values `first` and `first` + 1 of a packed word in one row's group, dequantized into one
// register of two T (the first in the low half): in T's paired arithmetic where that is
// exact, else through float. Both give the same bits. `first` is even.
//
// kScaled = false leaves out the scale: the pair is q − z, a small integer and exact in T
// (|q − z| ≤ 255 < 2^8 fits bf16's 8 significant bits), for a caller that applies the scale
// to sums instead (the tensor-core kernel's ScaleMode). Its scale argument is unused.
template <typename T, int BITS, bool kScaled = true,
          bool kPairedExact = paired_dequantize_is_exact<T, BITS>()>
struct PairDequantizer {
  PairedGroup<T> group;
  PairDequantizer() = default;
  __device__ __forceinline__ PairDequantizer(uint32_t zero, T scale) : group(paired_group<T>(zero, scale)) {}
  __device__ __forceinline__ uint32_t pair(uint32_t word, int first) const {
    return dequantize_pair<T, BITS, kScaled>(word, first / 2, group);
  }

  // INT4: the word's eight values as the four pairs (i, i + 4), i = 0…3, one register each.
  // Nibble i of both halves is values i and i + 4, so no byte permute is needed: one LOP3
  // keeps a nibble where it is and sets the magic exponent. A code at bits 4–7 of a half
  // reads as kMagic + 16·q, which fp16 (10 mantissa bits) holds exactly: one HFMA2 scales it
  // by 1/16 and subtracts 64 + z at once, exactly, so fp16 shifts the word once (by 8) for
  // four pairs. bf16 (7 mantissa bits) cannot hold 16·q and shifts each nibble down.
  __device__ __forceinline__ void spread_pairs(uint32_t word, uint32_t (&out)[4]) const {
    static_assert(BITS == 4, "pairs (i, i + 4) are of INT4 words");
    constexpr uint32_t kMagic2 = Paired<T>::kMagicBits * 0x10001u;
    using Pair = typename Paired<T>::type;
    const auto scaled = [&](Pair centered) {
      return paired_to_bits<T>(kScaled ? __hmul2_rn(centered, group.scale) : centered);
    };
    const auto low = [&](uint32_t bits) {  // a code at bits 0–3 of each half
      const Pair biased = paired_from_bits<T>(and_or(bits, 0x000F000Fu, kMagic2));
      return scaled(__hsub2(biased, group.biased_zero));
    };
    if constexpr (Paired<T>::kMantissaBits >= 8) {
      const Pair sixteenth = paired_from_bits<T>(0x2C002C00u);  // 1/16 in both halves
      const auto high = [&](uint32_t bits) {  // a code at bits 4–7 of each half: 16·q
        const Pair biased = paired_from_bits<T>(and_or(bits, 0x00F000F0u, kMagic2));
        return scaled(__hfma2(biased, sixteenth, group.sixteenth_offset));
      };
      const uint32_t upper = word >> 8;
      out[0] = low(word);
      out[1] = high(word);
      out[2] = low(upper);
      out[3] = high(upper);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) out[i] = low(word >> (4 * i));
    }
  }
};
template <typename T, int BITS, bool kScaled>
struct PairDequantizer<T, BITS, kScaled, false> {
  float biased_zero;
  float scale;
  PairDequantizer() = default;
  __device__ __forceinline__ PairDequantizer(uint32_t zero, T scale_value)
      : biased_zero(biased_code<BITS>(zero, 0)), scale(kScaled ? to_float(scale_value) : 1.f) {}
  __device__ __forceinline__ uint32_t pair(uint32_t word, int first) const {
    float lo = biased_code<BITS>(word, first) - biased_zero;
    float hi = biased_code<BITS>(word, first + 1) - biased_zero;
    if constexpr (kScaled) {
      lo *= scale;
      hi *= scale;
    }
    return float_to_bits(lo, T{}) | (float_to_bits(hi, T{}) << 16);
  }
};

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
      const float biased_zero = biased_zero_of<BITS>(zero_packed, rows[r], g, groups);
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
  const PairDequantizer<T, BITS> dequantizer(zero_code<BITS>(zero_packed, n, g, groups),
                                             __ldg(scale + static_cast<int64_t>(n) * groups + g));
  const uint32_t word = static_cast<uint32_t>(__ldg(packed + idx));
  Slice slice{};
#pragma unroll
  for (int j = 0; j < kPerWord / 2; ++j) set_lane(slice, j, dequantizer.pair(word, 2 * j));
  *reinterpret_cast<Slice*>(out + static_cast<int64_t>(n) * K + k) = slice;
}

// ------------------------------------------------------------------ tensor-core GEMM (mma)

// n / d for 0 ≤ n < 2^20 and a divisor d ≥ 1 fixed for the kernel, without the ~20
// instructions of an integer division: a float estimate, off by at most one at these sizes,
// then one correction each way makes it exact.
struct SmallDivisor {
  int d;
  float inverse;
  __device__ __forceinline__ explicit SmallDivisor(int divisor) : d(divisor), inverse(1.f / divisor) {}
  __device__ __forceinline__ int divide(int n) const {
    int q = static_cast<int>(static_cast<float>(n) * inverse);
    if (q * d > n) --q;
    if ((q + 1) * d <= n) ++q;
    return q;
  }
};

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kWarp * kMmaWarps;
constexpr int kMmaRowsPerWarp = 32;                            // output rows n: two A tiles of 16
constexpr int kMmaRowsPerBlock = kMmaWarps * kMmaRowsPerWarp;  // 128
constexpr int kMmaMaxRows = 64;                                // M: up to eight B tiles of 8
// The split-K sum gives each thread of a block one row n (mma_kernel's end).
static_assert(kMmaRowsPerBlock == kMmaThreads, "one thread per row n of a block");

// Physical k covered by one thread's uint4 of codes: its "slice" (32 for INT4, 16 for INT8).
template <int BITS>
constexpr int mma_slice_k() {
  return 4 * (32 / BITS);
}

// The same for bits known only at run time (4 or 8).
inline int mma_slice_k_of(int bits) { return bits == 4 ? mma_slice_k<4>() : mma_slice_k<8>(); }

// Whether mma_gemm can take a weight: K and the group size whole slices. Its callers (the
// CUDA op, the emulator) refuse other shapes before launching, where the kernel would read
// past its operands.
inline bool mma_takes_shape(int64_t K, int64_t group_len, int bits) {
  const int slice_k = mma_slice_k_of(bits);
  return K % slice_k == 0 && group_len % slice_k == 0;
}

// Where the tensor-core kernel applies the scales; plan_mma picks one per launch.
//   kWeights: to every dequantized pair (a paired multiply per two weights), any group size.
//   kChunk: a chunk's four slices lie in one group (the group a multiple of the chunk's k):
//     the mma sums the chunk's q − z into fresh accumulators, and one FFMA per accumulator
//     adds them scaled. Per thread and chunk that is 8 FFMA per B tile (MROWS / 8 tiles)
//     instead of 64 HMUL2 (INT4) or 32 (INT8): a gain up to chunk_scale_max_rows rows, in
//     the sm_90 machine code (benchmarks/kernel_sass.py; INT8 at 32 rows loses).
//   kEnd: one group (per channel): the sums of q − z run through all of K and are scaled
//     once, before they are written; the loop loads no scales or zero points.
// The last two are also more accurate: q − z is exact in T and the products are exact in the
// float accumulators, where kWeights rounds each (q − z)·s to T first.
enum class ScaleMode { kWeights, kChunk, kEnd };
constexpr int chunk_scale_max_rows(int bits) { return bits == 4 ? 32 : 16; }

// Split-K without a second kernel: each block, once its float partial sums are written, counts
// itself in its column's counter (one per blockIdx.x); the block that brings the count to
// gridDim.y is the last, sees every other split's partial sums, and adds them, one row n per
// thread, in split order: the same result whichever block it is, and the same as
// sum_splits_kernel's. It resets the counter to 0, so the counters the caller keeps are zeros
// again for its next launch (launches on one stream run one after another). Every thread of
// the block that has not exited calls this; thread 0 has not, and thread r's warp holds row
// n = 128·blockIdx.x + r. Not inlined: its registers stay out of the main loop's allocation
// (inlined, the compiler spilled in two variants and moved others by ±0.7 instructions per
// weight, benchmarks/kernel_sass.py).
template <typename T>
__device__ __noinline__ void add_splits_if_last(const float* partials, T* out, int* tile_counters,
                                                int M, int N) {
  int* last = compress_shared_memory<int>();
  __threadfence();  // this thread's partial sums are visible device-wide before it is counted
  __syncthreads();  // every thread of the block has written and fenced
  if (threadIdx.x == 0) {
    const int finished = atomicAdd(tile_counters + blockIdx.x, 1) + 1;
    *last = finished == static_cast<int>(gridDim.y);
    if (*last) tile_counters[blockIdx.x] = 0;  // the other splits have all counted
    __threadfence();  // the other blocks' partial sums are read after their count is seen
  }
  __syncthreads();
  const int n = blockIdx.x * kMmaRowsPerBlock + static_cast<int>(threadIdx.x);
  if (*last == 0 || n >= N) return;
  // The M · splits partial sums of this thread's row n (any count; the plan keeps it within
  // kMaxSumsInKernel), (m, split) in order, kSumLoads at a time: every load of a batch is
  // issued before the first add waits on one, so the thread waits on L2 ⌈M · splits /
  // kSumLoads⌉ times, where an outer loop over m with the few splits inside waited once per
  // row m. Each row's sum still runs 0 + split 0 + split 1 + …, the same bits as
  // sum_splits_kernel.
  constexpr int kSumLoads = 16;
  const int splits = static_cast<int>(gridDim.y);
  const int pairs = M * splits;
  const int64_t split_stride = static_cast<int64_t>(M) * N;
  const int64_t next_row = N - (splits - 1) * split_stride;  // split S − 1 of m → split 0 of m + 1
  const float* load = partials + n;  // the next pair to load, then to add: (m, split)
  int load_split = 0, add_split = 0;
  T* row_out = out + n;
  float sum = 0.f;
  for (int first = 0; first < pairs; first += kSumLoads) {
    float value[kSumLoads];
#pragma unroll
    for (int i = 0; i < kSumLoads; ++i) {
      value[i] = first + i < pairs ? __ldcg(load) : 0.f;
      const bool row_done = ++load_split == splits;
      load += row_done ? next_row : split_stride;
      load_split = row_done ? 0 : load_split;
    }
#pragma unroll
    for (int i = 0; i < kSumLoads; ++i) {
      if (first + i >= pairs) break;
      sum += value[i];
      if (++add_split == splits) {
        *row_out = from_float<T>(sum);
        row_out += N, sum = 0.f, add_split = 0;
      }
    }
  }
}

// out (M, N) = x (M, K) · dequantize(W)ᵀ on tensor cores, for M ≤ MROWS (8, 16, 32 or 64),
// K and the group size multiples of the slice.
//
// The mma computes outᵀ = W · xᵀ: the dequantized weights are the A operand (16 rows n ×
// 16 k) and the activations the B operand (16 k × 8 rows m). So a decode step (M ≤ 8) fills
// the mma's n = 8 side instead of padding M to 16; each B tile is 8 rows of x.
//
// Each warp owns 32 output rows n (two A tiles) and walks its block's share of K (grid.y
// splits K) in chunks of four slices: thread (g = lane / 4, t = lane % 4) takes slice 4c + t
// of chunk c, i.e. one uint4 of codes from each of its four rows n (g + 8j). The block's four
// warps own different rows and read the same activations at the same time, so three of
// every four activation loads hit L1: the activations cross L2 once per 128 output rows.
//
// No repack is needed because an mma sums over its 16 k in any order: each step feeds the
// mma's logical k {2t, 2t+1, 2t+8, 2t+9} with four physical k of the thread's slice, the
// same for the weights (A, dequantized in registers by PairDequantizer) and the activations
// (B). Consecutive k (slice_start + 4s + {0, 1, 2, 3}) let one 8-byte load of x land as the
// B fragment's two registers; spread k (8w + {2h, 2h+4, 2h+1, 2h+5}, INT4 at small M) take
// the weights' pairs as they lie in a word (see kSpread). Each A fragment serves MROWS / 8
// mma, each B fragment two.
//
// The scales reach the sums as SCALES says (ScaleMode). Partial sums stay in the mma
// accumulators, and each warp writes its own outputs: T with one split; with several, float
// partial sums. Those are added in split order (deterministic), by the block of the split that
// finishes last (add_splits_if_last, counted in tile_counters), or by sum_splits_kernel where
// the caller has no counters.
template <typename T, int BITS, int MROWS, ScaleMode SCALES>
__global__ void __launch_bounds__(kMmaThreads)
    mma_kernel(const T* __restrict__ x,                  // (M, K), 16-byte aligned
               const int32_t* __restrict__ packed,       // (N, K / per_word), rows 16-byte aligned
               const T* __restrict__ scale,              // (N, groups)
               const int32_t* __restrict__ zero_packed,  // (ceil(N / per_word), groups) or null
               T* __restrict__ out,                      // (M, N), when one split
               float* __restrict__ partials,             // (splits, M, N), when several
               int* __restrict__ tile_counters,          // (blocks_n) zeros, or null
               int M, int N, int K, int group_len, int groups, int chunks_per_split) {
  constexpr int kPerWord = 32 / BITS;
  constexpr int kSliceK = mma_slice_k<BITS>();
  constexpr int kSteps = kSliceK / 4;
  constexpr int kRows = 4;                // rows n per thread: g + 8j
  constexpr int kTilesB = MROWS / 8;      // B tiles of 8 rows of x
  // A second chunk of weight operands in registers, while the accumulators leave room: at
  // MROWS = 64 they alone take 64 registers and the second stage would spill.
  constexpr bool kPrefetch = MROWS <= 32;
  // INT4 at small M pairs the weights as they lie in a word, (i, i + 4), which saves the
  // dequantization a byte permute per pair (fp16 also three shifts per word) and costs the
  // activations two per B tile and step. Counted in the machine code
  // (benchmarks/kernel_sass.py), that gains up to two B tiles for fp16, up to one for bf16.
  constexpr bool kSpread = BITS == 4 && MROWS <= (Paired<T>::kMantissaBits >= 8 ? 16 : 8);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int g = lane / 4;
  const int t = lane % 4;
  // A warp wholly past N (last block only) exits. The barriers of add_splits_if_last do not
  // wait for it: bar.sync waits for the non-exited threads (PTX ISA, `exit` and `barrier`).
  // Running it on row N − 1 instead would cost registers the compiler takes from the loop
  // (counted: INT4 fp16 at M ≤ 32, 4.8 → 5.8 instructions per weight).
  const int first_row = blockIdx.x * kMmaRowsPerBlock + warp * kMmaRowsPerWarp;
  if (first_row >= N) return;
  const int words = K / kPerWord;
  const int slices = K / kSliceK;
  const int chunks = (slices + 3) / 4;
  const int chunk_begin = blockIdx.y * chunks_per_split;
  const int chunk_end = chunk_begin + chunks_per_split < chunks ? chunk_begin + chunks_per_split : chunks;

  // This thread's rows n (g + 8j): their codes as uint4 slices, scales and zero points. Rows
  // past N read row N − 1 again; their sums are never written.
  const uint4* code_rows[kRows];
  const T* scale_rows[kRows];
  ZeroPoints<BITS> zeros[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    const int row = first_row + 8 * j + g < N ? first_row + 8 * j + g : N - 1;
    code_rows[j] = reinterpret_cast<const uint4*>(packed + static_cast<int64_t>(row) * words);
    scale_rows[j] = scale + static_cast<int64_t>(row) * groups;
    zeros[j] = ZeroPoints<BITS>(zero_packed, row, groups);
  }
  // This thread's row of x in each B tile (m = 8·tile + g), null past M: its B fragments are
  // zeros.
  const T* x_rows[kTilesB];
#pragma unroll
  for (int tile = 0; tile < kTilesB; ++tile) {
    const int m = 8 * tile + g;
    x_rows[tile] = m < M ? x + static_cast<int64_t>(m) * K : nullptr;
  }
  const SmallDivisor slices_per_group(group_len / kSliceK);
  using Dequantizer = PairDequantizer<T, BITS, SCALES == ScaleMode::kWeights>;
  // kEnd: each row's one zero point, read once.
  Dequantizer row_dequantizer[kRows];
  if constexpr (SCALES == ScaleMode::kEnd) {
#pragma unroll
    for (int j = 0; j < kRows; ++j) row_dequantizer[j] = Dequantizer(zeros[j].code(zeros[j].load(0)), T{});
  }
  // Accumulators: [A tile][B tile][mma accumulator register].
  using Sums = float[2][kTilesB][4];
  const auto set_zero = [](Sums& sums) {
#pragma unroll
    for (int a = 0; a < 2; ++a) {
#pragma unroll
      for (int tile = 0; tile < kTilesB; ++tile) {
#pragma unroll
        for (int i = 0; i < 4; ++i) sums[a][tile][i] = 0.f;
      }
    }
  };
  Sums acc;
  set_zero(acc);

  // The weight operands of chunk c: each row's slice of codes, scale and zero-point word.
  // The last chunk may hold fewer than four slices: a thread without one feeds zeros to the
  // warp's mma (all 32 lanes must take part). It reads the last slice again, without a
  // branch, and scale 0 makes those weights zeros; its activations are zeros, not loads.
  struct ChunkOperands {
    uint4 codes[kRows];
    T scales[kRows];
    uint32_t zero_words[kRows];
    int slice;
  };
  auto load_chunk = [&](int c, ChunkOperands& chunk) {
    chunk.slice = 4 * c + t;
    const int read_slice = chunk.slice < slices ? chunk.slice : slices - 1;
    if constexpr (SCALES != ScaleMode::kEnd) {
      const int group = slices_per_group.divide(read_slice);
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        chunk.scales[j] = __ldg(scale_rows[j] + group);
        chunk.zero_words[j] = zeros[j].load(group);
      }
    }
#pragma unroll
    for (int j = 0; j < kRows; ++j) chunk.codes[j] = __ldg(code_rows[j] + read_slice);
  };

  auto compute_chunk = [&](const ChunkOperands& chunk) {
    const bool live = chunk.slice < slices;
    const int k0 = chunk.slice * kSliceK;
    Dequantizer dequantizer[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      if constexpr (SCALES == ScaleMode::kEnd) {
        dequantizer[j] = row_dequantizer[j];
      } else {
        dequantizer[j] = Dequantizer(zeros[j].code(chunk.zero_words[j]),
                                     live ? chunk.scales[j] : from_float<T>(0.f));
      }
    }
    // kChunk: the chunk's sums of q − z, scaled into acc below. A thread without a slice
    // (last chunk) feeds finite q − z against zero activations, so its terms are zeros.
    Sums chunk_sums;
    if constexpr (SCALES == ScaleMode::kChunk) set_zero(chunk_sums);
    Sums& sums = SCALES == ScaleMode::kChunk ? chunk_sums : acc;
    // One k-step of the warp: both A tiles times every B tile.
    const auto mma_step = [&](const uint32_t (&a)[2][4], const uint32_t (&b)[kTilesB][2]) {
#pragma unroll
      for (int a_tile = 0; a_tile < 2; ++a_tile) {
#pragma unroll
        for (int tile = 0; tile < kTilesB; ++tile) mma_m16n8k16(sums[a_tile][tile], a[a_tile], b[tile], T{});
      }
    };
    // A fragment (m × k, "row"), m = row n: a[0] = row g, logical k 2t, 2t+1; a[1] = row
    // g + 8, same k; a[2], a[3] = the same rows at 2t+8, 2t+9. Rows g and g + 8 of A tile
    // a_tile are this thread's rows j = 2·a_tile and 2·a_tile + 1. B fragment (k × n,
    // "col"), n = row of x: b[0] holds logical k 2t, 2t+1 of column g, b[1] 2t+8, 2t+9.
    if constexpr (kSpread) {
      // Step (word w, half h) maps logical k {2t, 2t+1, 2t+8, 2t+9} to physical k
      // k0 + 8w + {2h, 2h+4, 2h+1, 2h+5}: the weights' pairs (i, i + 4), as they lie in a
      // word (spread_pairs), and the activations from one 16-byte load per word and row of
      // x, two byte permutes per register.
#pragma unroll
      for (int w = 0; w < kSliceK / kPerWord; ++w) {
        uint4 xs[kTilesB];
#pragma unroll
        for (int tile = 0; tile < kTilesB; ++tile) {
          xs[tile] = make_uint4(0u, 0u, 0u, 0u);
          if (live && x_rows[tile] != nullptr) {
            xs[tile] = __ldg(reinterpret_cast<const uint4*>(x_rows[tile] + k0 + 8 * w));
          }
        }
        uint32_t pairs[kRows][4];
#pragma unroll
        for (int j = 0; j < kRows; ++j) dequantizer[j].spread_pairs(lane_of(chunk.codes[j], w), pairs[j]);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t b[kTilesB][2];
#pragma unroll
          for (int tile = 0; tile < kTilesB; ++tile) {
            // (x[2h], x[2h+1]) and (x[2h+4], x[2h+5]) → (x[2h], x[2h+4]), (x[2h+1], x[2h+5]).
            const uint32_t first = lane_of(xs[tile], h);
            const uint32_t second = lane_of(xs[tile], h + 2);
            b[tile][0] = __byte_perm(first, second, 0x5410u);
            b[tile][1] = __byte_perm(first, second, 0x7632u);
          }
          uint32_t a[2][4];
#pragma unroll
          for (int a_tile = 0; a_tile < 2; ++a_tile) {
            const int upper = 2 * a_tile;
            const int lower = 2 * a_tile + 1;
            a[a_tile][0] = pairs[upper][2 * h];
            a[a_tile][1] = pairs[lower][2 * h];
            a[a_tile][2] = pairs[upper][2 * h + 1];
            a[a_tile][3] = pairs[lower][2 * h + 1];
          }
          mma_step(a, b);
        }
      }
    } else {
      // Step s maps logical k {2t, 2t+1, 2t+8, 2t+9} to physical k k0 + 4s + {0, 1, 2, 3}:
      // consecutive pairs of the weights (PairDequantizer::pair) and one 8-byte load per row
      // of x, which lands as the B fragment's two registers.
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        uint32_t b[kTilesB][2];
#pragma unroll
        for (int tile = 0; tile < kTilesB; ++tile) {
          uint2 pair = make_uint2(0u, 0u);
          if (live && x_rows[tile] != nullptr) {
            pair = __ldg(reinterpret_cast<const uint2*>(x_rows[tile] + k0 + 4 * s));
          }
          b[tile][0] = pair.x;
          b[tile][1] = pair.y;
        }
        const int word = (4 * s) / kPerWord;
        const int first = (4 * s) % kPerWord;
        uint32_t a[2][4];
#pragma unroll
        for (int a_tile = 0; a_tile < 2; ++a_tile) {
          const int upper = 2 * a_tile;
          const int lower = 2 * a_tile + 1;
          const uint32_t upper_word = lane_of(chunk.codes[upper], word);
          const uint32_t lower_word = lane_of(chunk.codes[lower], word);
          a[a_tile][0] = dequantizer[upper].pair(upper_word, first);
          a[a_tile][1] = dequantizer[lower].pair(lower_word, first);
          a[a_tile][2] = dequantizer[upper].pair(upper_word, first + 2);
          a[a_tile][3] = dequantizer[lower].pair(lower_word, first + 2);
        }
        mma_step(a, b);
      }
    }
    if constexpr (SCALES == ScaleMode::kChunk) {
      // Accumulator i of an A tile is row g (i < 2) or g + 8: this thread's row 2·a_tile + i / 2.
#pragma unroll
      for (int a_tile = 0; a_tile < 2; ++a_tile) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float row_scale = to_float(chunk.scales[2 * a_tile + half]);
#pragma unroll
          for (int tile = 0; tile < kTilesB; ++tile) {
#pragma unroll
            for (int i = 2 * half; i < 2 * half + 2; ++i) {
              acc[a_tile][tile][i] = fmaf(row_scale, chunk_sums[a_tile][tile][i], acc[a_tile][tile][i]);
            }
          }
        }
      }
    }
  };

  if constexpr (kPrefetch) {
    // Two stages in registers, alternating: chunk c + 1's loads are issued before chunk c's
    // mma, so a warp keeps twice the bytes in flight while it computes.
    ChunkOperands even, odd;
    if (chunk_begin < chunk_end) load_chunk(chunk_begin, even);
    for (int c = chunk_begin; c < chunk_end; c += 2) {
      if (c + 1 < chunk_end) load_chunk(c + 1, odd);
      compute_chunk(even);
      if (c + 1 >= chunk_end) break;
      if (c + 2 < chunk_end) load_chunk(c + 2, even);
      compute_chunk(odd);
    }
  } else {
    ChunkOperands chunk;
    for (int c = chunk_begin; c < chunk_end; ++c) {
      load_chunk(c, chunk);
      compute_chunk(chunk);
    }
  }

  // Accumulator i of (A tile, B tile): row n = 16·a_tile + g (+8 for i ≥ 2) of the warp's,
  // this thread's row 2·a_tile + i / 2; row m = 8·tile + 2t + (i & 1) of x.
  if constexpr (SCALES == ScaleMode::kEnd) {
#pragma unroll
    for (int a_tile = 0; a_tile < 2; ++a_tile) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float row_scale = to_float(__ldg(scale_rows[2 * a_tile + half]));
#pragma unroll
        for (int tile = 0; tile < kTilesB; ++tile) {
          acc[a_tile][tile][2 * half] *= row_scale;
          acc[a_tile][tile][2 * half + 1] *= row_scale;
        }
      }
    }
  }
#pragma unroll
  for (int a_tile = 0; a_tile < 2; ++a_tile) {
#pragma unroll
    for (int tile = 0; tile < kTilesB; ++tile) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int n = first_row + 16 * a_tile + g + 8 * (i / 2);
        const int m = 8 * tile + 2 * t + (i % 2);
        if (m < M && n < N) {
          if (partials == nullptr) {
            out[static_cast<int64_t>(m) * N + n] = from_float<T>(acc[a_tile][tile][i]);
          } else {
            partials[(static_cast<int64_t>(blockIdx.y) * M + m) * N + n] = acc[a_tile][tile][i];
          }
        }
      }
    }
  }
  if (partials != nullptr && tile_counters != nullptr) add_splits_if_last(partials, out, tile_counters, M, N);
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

// Which mma_kernel instantiation serves M rows: its accumulator rows (8, 16, 32 or 64) and
// where it applies the scales (ScaleMode).
struct MmaKernelChoice {
  int m_rows;
  ScaleMode scales;
};

inline MmaKernelChoice choose_mma_kernel(int M, int K, int group_len, int bits) {
  MmaKernelChoice choice{};
  choice.m_rows = M <= 8 ? 8 : M <= 16 ? 16 : M <= 32 ? 32 : 64;
  const int slice_k = mma_slice_k_of(bits);
  const bool chunk_in_one_group = group_len % (4 * slice_k) == 0;
  if (group_len == K) choice.scales = ScaleMode::kEnd;
  else if (chunk_in_one_group && choice.m_rows <= chunk_scale_max_rows(bits)) choice.scales = ScaleMode::kChunk;
  else choice.scales = ScaleMode::kWeights;
  return choice;
}

// fn(kernel) with the mma_kernel instantiation a choice names (kChunk is instantiated only up to
// chunk_scale_max_rows, where choose_mma_kernel can pick it). The one place that maps a choice
// to a kernel: the launch and the occupancy query both go through it.
template <typename T, int BITS, int MROWS, typename Fn>
void with_mma_kernel_rows(ScaleMode scales, Fn&& fn) {
  if (scales == ScaleMode::kEnd) return fn(&mma_kernel<T, BITS, MROWS, ScaleMode::kEnd>);
  if constexpr (MROWS <= chunk_scale_max_rows(BITS)) {
    if (scales == ScaleMode::kChunk) return fn(&mma_kernel<T, BITS, MROWS, ScaleMode::kChunk>);
  }
  return fn(&mma_kernel<T, BITS, MROWS, ScaleMode::kWeights>);
}

template <typename T, int BITS, typename Fn>
void with_mma_kernel(const MmaKernelChoice& choice, Fn&& fn) {
  switch (choice.m_rows) {
    case 8: return with_mma_kernel_rows<T, BITS, 8>(choice.scales, fn);
    case 16: return with_mma_kernel_rows<T, BITS, 16>(choice.scales, fn);
    case 32: return with_mma_kernel_rows<T, BITS, 32>(choice.scales, fn);
    default: return with_mma_kernel_rows<T, BITS, 64>(choice.scales, fn);
  }
}

// How mma_gemm covers the output: the kernel, enough blocks for two per SM, K split across
// blocks only when the blocks of 128 rows n alone are too few. Each split writes M·N float
// partial sums that are read back once (8 bytes per output and split): at most as many splits
// as keep that below the weight's bytes, unless the grid would not reach one block per SM
// (see plan_mma). And no more blocks than the SMs hold at once: past
// that, the blocks that wait for a free slot run as a second wave of a few blocks, with a
// fraction of the bytes in flight, and take about as long as the first (without this cap,
// M 17–64 on 4096×14336 launched 336 blocks for the 264 an H100 holds of those kernels).
struct MmaPlan {
  MmaKernelChoice kernel;
  int blocks_n;
  int splits;
  int chunks_per_split;
  int64_t workspace_floats;  // the float partial sums when splits > 1
  // Whether the last split of each column of blocks adds the partial sums (the caller passes
  // kMaxTileCounters zeroed counters) instead of a second kernel.
  bool sum_in_kernel;
  int blocks_per_sm;  // the occupancy the grid was capped for (0: unknown, uncapped)
};

// The tile counters a caller keeps for mma_gemm: one per column of blocks, enough for N up to
// 2^17 rows. The plan splits K only while the columns alone give fewer than two blocks per SM,
// so every device up to 512 SMs has counters for all its split-K launches.
constexpr int kMaxTileCounters = 1024;
// The most partial sums (M · splits) one thread of the last block adds in the kernel. It
// takes them 16 loads at a time, about an L2 round trip and 250 issue cycles each (~0.4 µs);
// past 4 such batches a second kernel, one thread per output, is cheaper (about 1–2 µs in a
// CUDA graph, most of it the launch). M = 1 stays under it up to 64 splits; on Llama-3-8B's
// shapes M = 64 always goes over (benchmarks/kernel_sass.py's grids). A modelled limit, not
// yet measured: benchmarks/kernel.py --sweep-splits times both sums at every split.
constexpr int kMaxSumsInKernel = 64;
// mma_kernel's dynamic shared memory: add_splits_if_last's verdict.
constexpr unsigned kMmaSharedBytes = sizeof(int);

// How many splits of K plan_mma gives blocks_n blocks of 128 rows, for `chunks` chunks of K.
inline int planned_splits(int blocks_n, int chunks, int M, int K, int bits, int sm_count,
                          int blocks_per_sm) {
  int wanted = (2 * sm_count + blocks_n - 1) / blocks_n;
  const int64_t one_wave = static_cast<int64_t>(blocks_per_sm) * sm_count / blocks_n;
  if (one_wave >= 1 && wanted > one_wave) wanted = static_cast<int>(one_wave);
  const int64_t by_traffic = static_cast<int64_t>(K) * bits / (64 * static_cast<int64_t>(M));
  int most = chunks;
  if (by_traffic < most) most = by_traffic < 1 ? 1 : static_cast<int>(by_traffic);
  // Below one block per SM the kernel waits on latency, not bandwidth, so up to that many
  // blocks the traffic bound gives way: the extra partial sums are read back at once (mostly
  // from L2), and fewer splits would read longer shares of K in series (4096×1024 at M = 64
  // went from 8 × 4 blocks to 8 × 16).
  const int one_per_sm = sm_count / blocks_n;
  if (most < one_per_sm) most = one_per_sm < chunks ? one_per_sm : chunks;
  return wanted < 1 ? 1 : wanted > most ? most : wanted;
}

// What a caller may impose on plan_mma in place of its own choices, so that
// benchmarks/kernel.py --sweep-splits can time the alternatives on a GPU. The defaults
// impose nothing.
struct MmaOverrides {
  // > 0: this many splits of K, at most one per chunk, rounded down to a count that leaves
  // no split empty.
  int splits = 0;
  // 1: the last block adds the splits, past kMaxSumsInKernel too; 0: the second kernel does;
  // -1: the plan's rule.
  int sum_in_kernel = -1;
};

// blocks_per_sm: how many blocks of the chosen kernel one SM holds at once (its registers
// decide; the CUDA occupancy query), or 0 where unknown, which leaves the grid uncapped.
inline MmaPlan plan_mma(const MmaKernelChoice& kernel, int M, int N, int K, int bits,
                        int sm_count, int blocks_per_sm, const MmaOverrides& overrides = {}) {
  MmaPlan plan{};
  plan.kernel = kernel;
  plan.blocks_per_sm = blocks_per_sm;
  plan.blocks_n = (N + kMmaRowsPerBlock - 1) / kMmaRowsPerBlock;
  const int slice_k = mma_slice_k_of(bits);
  const int chunks = (K / slice_k + 3) / 4;
  const int splits = overrides.splits > 0
                         ? (overrides.splits < chunks ? overrides.splits : chunks)
                         : planned_splits(plan.blocks_n, chunks, M, K, bits, sm_count,
                                          blocks_per_sm);
  plan.chunks_per_split = (chunks + splits - 1) / splits;
  plan.splits = (chunks + plan.chunks_per_split - 1) / plan.chunks_per_split;  // none empty
  plan.workspace_floats = plan.splits > 1 ? static_cast<int64_t>(plan.splits) * M * N : 0;
  const bool summable = plan.splits > 1 && plan.blocks_n <= kMaxTileCounters;
  plan.sum_in_kernel = summable && (overrides.sum_in_kernel >= 0
                                        ? overrides.sum_in_kernel == 1
                                        : M * plan.splits <= kMaxSumsInKernel);
  return plan;
}

// What one mma_gemm launch reads and writes: the caller's pointers and shapes.
template <typename T>
struct MmaOperands {
  const T* x;                  // (M, K), 16-byte aligned
  const int32_t* packed;       // (N, K / per_word), rows 16-byte aligned
  const T* scale;              // (N, groups)
  const int32_t* zero_packed;  // (ceil(N / per_word), groups), or null: symmetric
  T* out;                      // (..., N): M rows
  float* workspace;            // plan.workspace_floats floats
  int* tile_counters;          // kMaxTileCounters zeros, or null: a second kernel adds the splits
  int M;
  int N;
  int K;
  int group_len;
};

// Tensor-core GEMM for 1 ≤ M ≤ kMmaMaxRows. The caller has checked the shapes
// (mma_takes_shape), that x and the packed rows are 16-byte
// aligned, allocated plan.workspace_floats floats of workspace and, where plan.sum_in_kernel,
// passes kMaxTileCounters counters that are zeros (they are again when the kernel is done);
// no two launches in flight at once may share them.
template <typename T, int BITS, typename Stream>
void mma_gemm(const MmaOperands<T>& op, const MmaPlan& plan, Stream stream) {
  if (op.N == 0) return;
  const dim3 grid(plan.blocks_n, plan.splits);
  const dim3 block(kMmaThreads);
  float* partials = plan.splits > 1 ? op.workspace : nullptr;
  int* counters = plan.sum_in_kernel ? op.tile_counters : nullptr;
  const unsigned shared_bytes = counters != nullptr ? kMmaSharedBytes : 0u;
  with_mma_kernel<T, BITS>(plan.kernel, [&](auto kernel) {
    COMPRESS_LAUNCH(kernel, grid, block, shared_bytes, stream, op.x, op.packed, op.scale,
                    op.zero_packed, op.out, partials, counters, op.M, op.N, op.K, op.group_len,
                    op.K / op.group_len, plan.chunks_per_split);
  });
  if (plan.splits > 1 && counters == nullptr) {
    constexpr int kThreads = 256;
    const int64_t size = static_cast<int64_t>(op.M) * op.N;
    auto* sum = &sum_splits_kernel<T>;
    COMPRESS_LAUNCH(sum, dim3(static_cast<unsigned>((size + kThreads - 1) / kThreads)),
                    dim3(kThreads), 0u, stream, op.workspace, op.out, op.M, op.N, plan.splits);
  }
}

}  // namespace compress_kernels
