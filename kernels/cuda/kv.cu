// Writing K and V rows into the paged cache in its type: f16 (round to nearest even), or Q8_0 /
// Q4_0 quantized exactly as the CPU's `strata_storage::quant::quantize_row` does (ggml's
// `quantize_row_*_ref`): the same scale, the same reciprocal, the same rounding, no fma
// contraction — so a page written here equals, byte for byte, the page the CPU would write.

#include "kvcache.cuh"

#define KV_THREADS 128

// One 32-value block of a row, by one warp (lane j holds value j): Q8_0.
__device__ __forceinline__ void store_q8_0(uint8_t* blk, float x) {
  const int lane = threadIdx.x & 31;
  // fmaxf skips NaN as f32::max does.
  const float amax = warp_max(fabsf(x));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  // roundf: halves away from zero, as Rust's f32::round.
  int q = (int)roundf(__fmul_rn(x, id));
  q = max(-128, min(127, q));
  if (lane == 0) *(uint16_t*)blk = f16_bits(d);
  blk[2 + lane] = (uint8_t)(int8_t)q;
}

// Q4_0: the element of largest magnitude (the first of equals, as the CPU scans) maps to -8.
__device__ __forceinline__ void store_q4_0(uint8_t* blk, float x) {
  const int lane = threadIdx.x & 31;
  float a = x != x ? -1.0f : fabsf(x);  // a NaN never wins
  float v = x;
  int at = lane;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float oa = __shfl_xor_sync(FULL_MASK, a, o);
    const float ov = __shfl_xor_sync(FULL_MASK, v, o);
    const int oat = __shfl_xor_sync(FULL_MASK, at, o);
    if (oa > a || (oa == a && oat < at)) {
      a = oa;
      v = ov;
      at = oat;
    }
  }
  // The CPU's scan keeps +0 unless some |x| > 0 (so d is -0 for a block of zeros).
  const float mx = a > 0.0f ? v : 0.0f;
  const float d = mx / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const int q = min(15, (int)__fadd_rn(__fmul_rn(x, id), 8.5f));
  const int hi = __shfl_down_sync(FULL_MASK, q, 16);
  if (lane == 0) *(uint16_t*)blk = f16_bits(d);
  if (lane < 16) blk[2 + lane] = (uint8_t)(q | (hi << 4));
}

// Grid (n_tok, 2): blockIdx.y 0 writes keys, 1 values. k_src/v_src: [n_tok][width] f32; pos:
// each token's position; k_pages/v_pages: n_pages page base addresses each. A token whose page
// is not in the table is skipped (the launcher cannot see device positions; this keeps a bad
// one from writing outside the pages).
extern "C" __global__ void __launch_bounds__(KV_THREADS)
    kv_store(const float* __restrict__ k_src, const float* __restrict__ v_src,
             const int* __restrict__ pos, const uint64_t* __restrict__ k_pages,
             const uint64_t* __restrict__ v_pages, int n_pages, int page_tokens, int width,
             int k_type, int v_type) {
  const int tok = blockIdx.x;
  const bool is_v = blockIdx.y == 1;
  const int ty = is_v ? v_type : k_type;
  const float* src = (is_v ? v_src : k_src) + (size_t)tok * width;
  const int p = pos[tok];
  if (p < 0 || p / page_tokens >= n_pages) return;
  const int pi = p / page_tokens;
  uint8_t* row = (uint8_t*)(is_v ? v_pages : k_pages)[pi] +
                 (size_t)(p - pi * page_tokens) * kv_bytes(ty, width);
  if (ty == KV_F16) {
    uint16_t* h = (uint16_t*)row;
    for (int i = threadIdx.x; i < width; i += blockDim.x) h[i] = f16_bits(src[i]);
    return;
  }
  // A warp per 32-value block: coalesced reads, one reduction per block.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int b = warp; b < width / 32; b += blockDim.x >> 5) {
    const float x = src[b * 32 + lane];
    if (ty == KV_Q8_0) {
      store_q8_0(row + b * (int)sizeof(block_q8_0), x);
    } else {
      store_q4_0(row + b * (int)sizeof(block_q4_0), x);
    }
  }
}
SIM_EXPORT(kv_store)
