// The device environment dequant_matmul_kernels.cuh expects, for nvcc: kernel launches, the
// block's dynamic shared memory, and one warp-wide tensor-core multiply-accumulate. The test
// emulator (tests/kernels/cuda_emulator/) provides its own for the CPU. Included by
// dequant_matmul.cu and by benchmarks/kernel_sass.py's instantiation unit.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#define COMPRESS_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)

template <typename T>
__device__ __forceinline__ T* compress_shared_memory() {
  extern __shared__ __align__(16) unsigned char compress_shared_bytes[];
  return reinterpret_cast<T*>(compress_shared_bytes);
}

// One warp-wide tensor-core multiply-accumulate (sm_80+): d (16×8) += a (16×16) · b (16×8),
// for each activation type (the PTX type name must be part of the instruction's literal).
#define COMPRESS_DEFINE_MMA(T, PTX_TYPE)                                                     \
  __device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],       \
                                               const uint32_t (&b)[2], T) {                 \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE ".f32 "     \
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"        \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                             \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));         \
  }
COMPRESS_DEFINE_MMA(__half, "f16")
COMPRESS_DEFINE_MMA(__nv_bfloat16, "bf16")
#undef COMPRESS_DEFINE_MMA
