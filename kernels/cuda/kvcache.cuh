// The KV cache as the attention kernels see it: pages of `page_tokens` positions, each row one
// position's every KV head (`[n_head_kv][head_dim]`) in f16, Q8_0 or Q4_0 quantized along the
// head dimension in blocks of 32 — byte for byte the CPU's `KvPages` (strata_simd), so that a
// page moves between RAM and VRAM by a plain copy. A page table is a device array of u64 page
// base addresses; page `i` holds positions `i * page_tokens ..`.

#pragma once

#include "strata.cuh"

// Cache types (the codes of ops::kv::KvType).
#define KV_F16 0
#define KV_Q8_0 1
#define KV_Q4_0 2

// Bytes of `n` values of type `ty` (n a multiple of 32 for the quantized types).
__device__ __forceinline__ int kv_bytes(int ty, int n) {
  return ty == KV_F16 ? 2 * n : ty == KV_Q8_0 ? n / QK8_0 * (int)sizeof(block_q8_0)
                                              : n / QK4_0 * (int)sizeof(block_q4_0);
}

// Two f32 as an f16x2 register (low half first), rounded to nearest even.
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
  return (unsigned)f16_bits(lo) | ((unsigned)f16_bits(hi) << 16);
}
__device__ __forceinline__ float half_lo(unsigned u) { return f16((uint16_t)(u & 0xffffu)); }
__device__ __forceinline__ float half_hi(unsigned u) { return f16((uint16_t)(u >> 16)); }

// Eight values of one KV head's row as f16 (four f16x2 words): chunk `c` (values 8c..8c+7) of
// the head that starts at `head` in cache type `ty`. Quantized values are d * q in f32, then
// rounded to f16 (what the tensor cores and the shared-memory tiles hold).
__device__ __forceinline__ uint4 kv_chunk_f16(const uint8_t* head, int ty, int c) {
  uint4 r;
  if (ty == KV_F16) {
    const uint4* p = (const uint4*)(head + 16 * c);
    r = *p;
  } else if (ty == KV_Q8_0) {
    const uint8_t* b = head + (c / 4) * (int)sizeof(block_q8_0);
    const float d = f16(*(const uint16_t*)b);
    const uint16_t* qs = (const uint16_t*)(b + 2 + 8 * (c % 4));
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const unsigned two = qs[i];
      w[i] = pack_half2(d * (float)(int8_t)(two & 0xffu), d * (float)(int8_t)(two >> 8));
    }
    r = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    // Q4_0: value j < 16 is the low nibble of qs[j], value j + 16 its high nibble.
    const uint8_t* b = head + (c / 4) * (int)sizeof(block_q4_0);
    const float d = f16(*(const uint16_t*)b);
    const int q = c % 4;
    const uint16_t* qs = (const uint16_t*)(b + 2 + 8 * (q & 1));
    const int shift = (q >> 1) * 4;
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const unsigned two = qs[i];
      const int lo = (int)((two >> shift) & 15u) - 8, hi = (int)((two >> (8 + shift)) & 15u) - 8;
      w[i] = pack_half2(d * (float)lo, d * (float)hi);
    }
    r = make_uint4(w[0], w[1], w[2], w[3]);
  }
  return r;
}

// Loads columns 8 * c0 .. 8 * c0 + COLS - 1 of one KV head at positions p0 .. p0 + ROWS - 1 into
// `dst` as f16 (rows padded by 8 values so that ldmatrix and the row-per-thread reads hit
// distinct banks). Rows outside [lo, hi) — and rows whose page is past the table — are zeros:
// they are masked, and a zero value row keeps 0 * value finite. f16 rows are copied with
// cp.async (the caller commits and waits); quantized rows are dequantized through registers.
// NT threads (the whole block) share the work: each takes 16-byte chunks, consecutive threads
// consecutive chunks of a row.
template <int COLS, int ROWS, int NT>
__device__ __forceinline__ void kv_load_tile(unsigned (*dst)[COLS / 2 + 4],
                                             const uint64_t* __restrict__ pages, int n_pages,
                                             int ty, int page_tokens, int row_bytes, int head_off,
                                             int c0, int p0, int lo, int hi) {
  constexpr int CHUNKS = COLS / 8;
  static_assert(NT % CHUNKS == 0, "each thread keeps one chunk column");
  const int c = threadIdx.x % CHUNKS;
#pragma unroll 2
  for (int r = threadIdx.x / CHUNKS; r < ROWS; r += NT / CHUNKS) {
    const int p = p0 + r;
    const int pi = p / page_tokens;
    unsigned* d = &dst[r][4 * c];
    if (p < lo || p >= hi || pi >= n_pages) {
      *(uint4*)d = make_uint4(0, 0, 0, 0);
      continue;
    }
    const uint8_t* head =
        (const uint8_t*)pages[pi] + (size_t)(p - pi * page_tokens) * row_bytes + head_off;
    if (ty == KV_F16) {
      cp_async_16(d, head + 16 * (c0 + c), 16);
    } else {
      *(uint4*)d = kv_chunk_f16(head, ty, c0 + c);
    }
  }
}
