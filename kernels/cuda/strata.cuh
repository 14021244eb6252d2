// What every strata kernel file includes: the compiler split (NVRTC for the GPU, the host C++
// compiler against the simulator), fixed-width integers, ggml's quantization blocks byte for
// byte (as `strata_storage::quant` defines them), and small device helpers.
//
// Kernels are written once, in CUDA C++, and must compile on both sides. Conventions:
//  - every kernel is `extern "C" __global__` and is followed by `SIM_EXPORT(name)`;
//  - `__shared__` only for fixed-size arrays inside kernels (no `extern __shared__`);
//  - inline PTX only through the functions of ptx.cuh;
//  - no `printf`, no dynamic allocation, no recursion;
//  - compile-time constants in templates as `enum` members, not `static constexpr` data (the
//    simulator's build gives template statics plain storage, see kernels/build.rs).

#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SIM_EXPORT(name)
#if defined(__CUDACC_RTC__)
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#endif
#define STRATA_GPU 1
#else
#include "../sim/sim.h"
#define STRATA_GPU 0
#endif

#include "ptx.cuh"

// ---------------------------------------------------------------------------------------------
// ggml's quantization blocks. Scales are stored as f16 bits (`uint16_t`) so that the structs are
// plain bytes on both sides; `f16(bits)` converts.

#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK8_1 32
#define QK_K 256
#define K_SCALE_SIZE 12

struct block_q4_0 {
  uint16_t d;
  uint8_t qs[QK4_0 / 2];
};
struct block_q4_1 {
  uint16_t d, m;
  uint8_t qs[QK4_1 / 2];
};
struct block_q5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[QK5_0 / 2];
};
struct block_q5_1 {
  uint16_t d, m;
  uint8_t qh[4];
  uint8_t qs[QK5_1 / 2];
};
struct block_q8_0 {
  uint16_t d;
  int8_t qs[QK8_0];
};
// Activations for the integer dot products: d (f16) the scale, s = d * sum(qs) (f16).
struct block_q8_1 {
  uint16_t d, s;
  int8_t qs[QK8_1];
};
struct block_q2_K {
  uint8_t scales[QK_K / 16];
  uint8_t qs[QK_K / 4];
  uint16_t d, dmin;
};
struct block_q3_K {
  uint8_t hmask[QK_K / 8];
  uint8_t qs[QK_K / 4];
  uint8_t scales[12];
  uint16_t d;
};
struct block_q4_K {
  uint16_t d, dmin;
  uint8_t scales[K_SCALE_SIZE];
  uint8_t qs[QK_K / 2];
};
struct block_q5_K {
  uint16_t d, dmin;
  uint8_t scales[K_SCALE_SIZE];
  uint8_t qh[QK_K / 8];
  uint8_t qs[QK_K / 2];
};
struct block_q6_K {
  uint8_t ql[QK_K / 2];
  uint8_t qh[QK_K / 4];
  int8_t scales[QK_K / 16];
  uint16_t d;
};

static_assert(sizeof(block_q4_0) == 18, "block_q4_0 is 18 bytes");
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 is 20 bytes");
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 is 22 bytes");
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 is 24 bytes");
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 is 34 bytes");
static_assert(sizeof(block_q8_1) == 36, "block_q8_1 is 36 bytes");
static_assert(sizeof(block_q2_K) == 84, "block_q2_K is 84 bytes");
static_assert(sizeof(block_q3_K) == 110, "block_q3_K is 110 bytes");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K is 144 bytes");
static_assert(sizeof(block_q5_K) == 176, "block_q5_K is 176 bytes");
static_assert(sizeof(block_q6_K) == 210, "block_q6_K is 210 bytes");

// ---------------------------------------------------------------------------------------------
// Helpers.

__device__ __forceinline__ float f16(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
__device__ __forceinline__ uint16_t f16_bits(float f) {
  return __half_as_ushort(__float2half_rn(f));
}
__device__ __forceinline__ float bf16(uint16_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}

#define FULL_MASK 0xffffffffu

// NVRTC has no <cmath>: infinities by their bits.
__device__ __forceinline__ float neg_inf() { return __int_as_float((int)0xff800000u); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

// Four bytes from any alignment, little-endian (quantized blocks are 2-byte aligned at best).
__device__ __forceinline__ int load_i32_u16(const void* p) {
  const uint16_t* h = (const uint16_t*)p;
  return (int)((uint32_t)h[0] | ((uint32_t)h[1] << 16));
}
__device__ __forceinline__ int load_i32_u8(const void* p) {
  const uint8_t* b = (const uint8_t*)p;
  return (int)((uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) |
               ((uint32_t)b[3] << 24));
}

// The sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets
// it. `scratch` is 32 floats of shared memory, free again when this returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : neg_inf();
  v = warp_max(v);
  __syncthreads();
  return v;
}
