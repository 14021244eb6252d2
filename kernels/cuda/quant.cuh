// Weights as small integers: for every weight type the engine loads, one device function that
// turns a 32-weight sub-block of a row into 32 int8 values (packed four to an int, for __dp4a
// and the int8 tensor cores) with a float scale and offset. matvec.cu, gemm.cu and dequant.cu
// share these, so each type's bit layout is decoded in one place, as ggml lays it out
// (`storage/src/quant/dequant.rs` is the reference).
//
// The formulation. Sub-block element l (0..31) is
//     w[l] = d[h] * q[l] + m[h],   h = l / 16,
// with q an int8. Types with one scale per 32 weights have d[0] == d[1] and m[0] == m[1]
// (HALVES == 1); Q2_K, Q3_K and Q6_K have a scale per 16 (HALVES == 2). Activations come as
// q8_1 blocks: a[l] ≈ da * qa[l], with s = da * Σ qa. Then
//     Σ w·a = Σ_h d[h]·da·Σ_{l∈h} q·qa  +  Σ_h m[h]·da·Σ_{l∈h} qa
// and where HALVES == 1 the offset term is m·s, so one integer dot product (8 __dp4a, or one
// m16n8k32 mma) and two multiply-adds per 32 weights. Where the offset varies per 16 (Q2_K's
// mins) the activation sums of each half are needed: the decode path computes them with __dp4a
// against 0x01010101, the prefill layout stores them (quantize.cu).
//
// Each type's products d[h]·q are exact in f32 (an 11-bit f16 mantissa times integers of at
// most 13 bits together), so d·q + m rounds once, as the CPU's dequantization does: dequant.cu's
// outputs equal the reference's values.
//
// Offsets: Q8_0 is symmetric, and so are Q4_0, Q5_0, Q3_K and Q6_K once their codes' bias (8,
// 16, 4, 32) is subtracted from each byte (__vsub4): m = 0, and their products need no
// activation sums at all (exact integer dot products, as the CPU's are). Q4_1, Q5_1, Q4_K and
// Q5_K have a real offset per 32 weights (m·s); Q2_K one per 16.

#pragma once

#include "strata.cuh"

// One sub-block: q[i] holds elements 4i..4i+3, element 4i+j in byte j (signed).
struct qsub {
  int q[8];
  float d[2];
  float m[2];
};

// A quiet NaN: what a kernel writes for an output it cannot compute (an id out of range).
__device__ __forceinline__ float qnan() { return __int_as_float(0x7fc00000); }

// Four bytes at a 4-byte-aligned address.
__device__ __forceinline__ int ld_i32(const uint8_t* p) { return *(const int*)p; }

// Bits 0..3 of `h` moved to bit 4 of bytes 0..3 (the fifth bit of four 5-bit codes).
__device__ __forceinline__ int spread_bit4(int h) {
  return ((h << 4) & 0x00000010) | ((h << 11) & 0x00001000) | ((h << 18) & 0x00100000) |
         ((h << 25) & 0x10000000);
}

__device__ __forceinline__ int sub_bytes(int a, unsigned b) { return (int)__vsub4((unsigned)a, b); }

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, int& sc, int& mn) {
  if (j < 4) {
    sc = q[j] & 63;
    mn = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q3_K: scale i (0..15) of the 12 packed bytes, with its −32 bias.
__device__ __forceinline__ int scale_q3_k(int i, const uint8_t* p) {
  const int low = (p[i & 7] >> (4 * (i >> 3))) & 0xF;
  const int high = (p[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
  return (low | (high << 4)) - 32;
}

// Each type: its block, weights per block (QK), sub-blocks per block (SUBS), scales per
// sub-block (HALVES), whether it has an offset (MIN), the alignment its blocks keep in a row
// that starts 16-byte aligned (ALIGN), and `load(block, j, out)` for sub-block j of a block.

struct tq4_0 {
  typedef block_q4_0 block;
  enum : int { QK = 32, SUBS = 1, HALVES = 1, ALIGN = 2 };
  enum : bool { MIN = false };
  __device__ static __forceinline__ void load(const block* __restrict__ b, int, qsub& o) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int v = load_i32_u16(b->qs + 4 * i);
      o.q[i] = sub_bytes(v & 0x0F0F0F0F, 0x08080808u);
      o.q[i + 4] = sub_bytes((v >> 4) & 0x0F0F0F0F, 0x08080808u);
    }
    o.d[0] = o.d[1] = f16(b->d);
    o.m[0] = o.m[1] = 0.0f;
  }
};

struct tq4_1 {
  typedef block_q4_1 block;
  enum : int { QK = 32, SUBS = 1, HALVES = 1, ALIGN = 4 };
  enum : bool { MIN = true };
  __device__ static __forceinline__ void load(const block* __restrict__ b, int, qsub& o) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int v = ld_i32(b->qs + 4 * i);
      o.q[i] = v & 0x0F0F0F0F;
      o.q[i + 4] = (v >> 4) & 0x0F0F0F0F;
    }
    o.d[0] = o.d[1] = f16(b->d);
    o.m[0] = o.m[1] = f16(b->m);
  }
};

struct tq5_0 {
  typedef block_q5_0 block;
  enum : int { QK = 32, SUBS = 1, HALVES = 1, ALIGN = 2 };
  enum : bool { MIN = false };
  __device__ static __forceinline__ void load(const block* __restrict__ b, int, qsub& o) {
    const int qh = load_i32_u16(b->qh);
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int v = load_i32_u16(b->qs + 4 * i);
      o.q[i] = sub_bytes((v & 0x0F0F0F0F) | spread_bit4(qh >> (4 * i)), 0x10101010u);
      o.q[i + 4] =
          sub_bytes(((v >> 4) & 0x0F0F0F0F) | spread_bit4(qh >> (4 * i + 16)), 0x10101010u);
    }
    o.d[0] = o.d[1] = f16(b->d);
    o.m[0] = o.m[1] = 0.0f;
  }
};

struct tq5_1 {
  typedef block_q5_1 block;
  enum : int { QK = 32, SUBS = 1, HALVES = 1, ALIGN = 8 };
  enum : bool { MIN = true };
  __device__ static __forceinline__ void load(const block* __restrict__ b, int, qsub& o) {
    const int qh = ld_i32(b->qh);
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int v = ld_i32(b->qs + 4 * i);
      o.q[i] = (v & 0x0F0F0F0F) | spread_bit4(qh >> (4 * i));
      o.q[i + 4] = ((v >> 4) & 0x0F0F0F0F) | spread_bit4(qh >> (4 * i + 16));
    }
    o.d[0] = o.d[1] = f16(b->d);
    o.m[0] = o.m[1] = f16(b->m);
  }
};

struct tq8_0 {
  typedef block_q8_0 block;
  enum : int { QK = 32, SUBS = 1, HALVES = 1, ALIGN = 2 };
  enum : bool { MIN = false };
  __device__ static __forceinline__ void load(const block* __restrict__ b, int, qsub& o) {
#pragma unroll
    for (int i = 0; i < 8; i++) o.q[i] = load_i32_u16(b->qs + 4 * i);
    o.d[0] = o.d[1] = f16(b->d);
    o.m[0] = o.m[1] = 0.0f;
  }
};

// Q2_K: sub-block j = 4·half + k takes bits 2k..2k+1 of qs[32·half ..+32]; its 16-weight
// halves use scales[2j] and scales[2j+1] (low nibble: scale, high nibble: min).
struct tq2_K {
  typedef block_q2_K block;
  enum : int { QK = QK_K, SUBS = 8, HALVES = 2, ALIGN = 4 };
  enum : bool { MIN = true };
  __device__ static __forceinline__ void load(const block* __restrict__ b, int j, qsub& o) {
    const int half = j >> 2, k = j & 3;
#pragma unroll
    for (int i = 0; i < 8; i++)
      o.q[i] = (ld_i32(b->qs + 32 * half + 4 * i) >> (2 * k)) & 0x03030303;
    const float d = f16(b->d), dmin = f16(b->dmin);
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int sc = b->scales[2 * j + h];
      o.d[h] = d * (float)(sc & 0xF);
      o.m[h] = -(dmin * (float)(sc >> 4));
    }
  }
};

// Q3_K: as Q2_K for the low two bits; bit 4·half + k of hmask[l] is the third (clear: −4).
struct tq3_K {
  typedef block_q3_K block;
  enum : int { QK = QK_K, SUBS = 8, HALVES = 2, ALIGN = 2 };
  enum : bool { MIN = false };
  __device__ static __forceinline__ void load(const block* __restrict__ b, int j, qsub& o) {
    const int half = j >> 2, k = j & 3, hb = 4 * half + k;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const int lo = (load_i32_u16(b->qs + 32 * half + 4 * i) >> (2 * k)) & 0x03030303;
      const int hi = ((load_i32_u16(b->hmask + 4 * i) >> hb) & 0x01010101) << 2;
      o.q[i] = sub_bytes(lo | hi, 0x04040404u);
    }
    const float d = f16(b->d);
#pragma unroll
    for (int h = 0; h < 2; h++) {
      o.d[h] = d * (float)scale_q3_k(2 * j + h, b->scales);
      o.m[h] = 0.0f;
    }
  }
};

// Q4_K: sub-block j takes the low (even j) or high (odd j) nibbles of qs[32·(j/2) ..+32].
struct tq4_K {
  typedef block_q4_K block;
  enum : int { QK = QK_K, SUBS = 8, HALVES = 1, ALIGN = 16 };
  enum : bool { MIN = true };
  __device__ static __forceinline__ void load(const block* __restrict__ b, int j, qsub& o) {
    const uint8_t* q = b->qs + 32 * (j >> 1);
    const int sh = 4 * (j & 1);
#pragma unroll
    for (int i = 0; i < 8; i++) o.q[i] = (ld_i32(q + 4 * i) >> sh) & 0x0F0F0F0F;
    int sc, mn;
    scale_min_k4(j, b->scales, sc, mn);
    o.d[0] = o.d[1] = f16(b->d) * (float)sc;
    o.m[0] = o.m[1] = -(f16(b->dmin) * (float)mn);
  }
};

// Q5_K: Q4_K plus the fifth bit, bit j of qh[l].
struct tq5_K {
  typedef block_q5_K block;
  enum : int { QK = QK_K, SUBS = 8, HALVES = 1, ALIGN = 16 };
  enum : bool { MIN = true };
  __device__ static __forceinline__ void load(const block* __restrict__ b, int j, qsub& o) {
    const uint8_t* q = b->qs + 32 * (j >> 1);
    const int sh = 4 * (j & 1);
#pragma unroll
    for (int i = 0; i < 8; i++)
      o.q[i] = ((ld_i32(q + 4 * i) >> sh) & 0x0F0F0F0F) |
               (((ld_i32(b->qh + 4 * i) >> j) & 0x01010101) << 4);
    int sc, mn;
    scale_min_k4(j, b->scales, sc, mn);
    o.d[0] = o.d[1] = f16(b->d) * (float)sc;
    o.m[0] = o.m[1] = -(f16(b->dmin) * (float)mn);
  }
};

// Q6_K: sub-block j = 4·half + k: nibble k/2 of ql[64·half + 32·(k%2) + l] and bits 2k..2k+1 of
// qh[32·half + l], minus 32; scales[2j], scales[2j+1] for its halves.
struct tq6_K {
  typedef block_q6_K block;
  enum : int { QK = QK_K, SUBS = 8, HALVES = 2, ALIGN = 2 };
  enum : bool { MIN = false };
  __device__ static __forceinline__ void load(const block* __restrict__ b, int j, qsub& o) {
    const int half = j >> 2, k = j & 3;
    const uint8_t* ql = b->ql + 64 * half + 32 * (k & 1);
    const uint8_t* qh = b->qh + 32 * half;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const int lo = (load_i32_u16(ql + 4 * i) >> (4 * (k >> 1))) & 0x0F0F0F0F;
      const int hi = ((load_i32_u16(qh + 4 * i) >> (2 * k)) & 0x03030303) << 4;
      o.q[i] = sub_bytes(lo | hi, 0x20202020u);
    }
    const float d = f16(b->d);
#pragma unroll
    for (int h = 0; h < 2; h++) {
      o.d[h] = d * (float)b->scales[2 * j + h];
      o.m[h] = 0.0f;
    }
  }
};

// Sub-block `s` (counted along the row) of a row of type T.
template <class T>
__device__ __forceinline__ void load_sub(const uint8_t* __restrict__ row, int s, qsub& o) {
  const typename T::block* b = (const typename T::block*)row + s / T::SUBS;
  T::load(b, s % T::SUBS, o);
}

// The float weight types, by how the engine numbers them here.
#define WF32 0
#define WF16 1
#define WBF16 2

template <int TY>
__device__ __forceinline__ float wload(const void* p, size_t i) {
  if (TY == WF32) return ((const float*)p)[i];
  if (TY == WF16) return f16(((const uint16_t*)p)[i]);
  return bf16(((const uint16_t*)p)[i]);
}

// Eight consecutive weights from a 16-byte-aligned address (f16/bf16) or two (f32).
template <int TY>
__device__ __forceinline__ void wload8(const void* p, float w[8]) {
  if (TY == WF32) {
    const float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  } else {
    const uint4 v = *(const uint4*)p;
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      if (TY == WF16) {
        w[2 * i] = f16((uint16_t)(u[i] & 0xffff));
        w[2 * i + 1] = f16((uint16_t)(u[i] >> 16));
      } else {
        w[2 * i] = __uint_as_float(u[i] << 16);
        w[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
      }
    }
  }
}
