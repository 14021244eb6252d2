// Activations to 8-bit integers for the integer dot products of matvec.cu and gemm.cu.
//
// Both layouts quantize each 32 values of a row as ggml's quantize_row_q8_1 does:
// d = amax / 127, q = round(x / d) (computed as x * (1 / d), half away from zero), so the
// quants are byte for byte the CPU's. They differ in how the scale is kept:
//  - decode (`quantize_q8_1`): block_q8_1 rows, d and s = d·Σq as f16, as ggml stores them;
//  - prefill (`quantize_q8_1_mmq`): the quants of each row contiguous (16-byte aligned, so the
//    GEMM copies them to shared memory with cp.async as they are) and per 32 values a float4
//    {d, d·Σq, d·Σq[0..16], d·Σq[16..32]} in f32: the halves' sums are what Q2_K's per-16 mins
//    need, and f32 keeps the scale exact.
// One warp per 32 values: a lane per value, the amax and the sum by shuffles.

#include "strata.cuh"

#define QZ_THREADS 256

// The quant of lane's value `x`, the block's d, and the integer sums of the whole block and its
// first half (every lane gets them).
__device__ __forceinline__ int q8_1_lane(float x, float& d, int& sum, int& sum_lo) {
  const float amax = warp_max(fabsf(x));
  d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const int q = (int)roundf(x * id);
  sum = warp_sum_int(q);
  sum_lo = warp_sum_int((threadIdx.x & 31) < 16 ? q : 0);
  return q;
}

// x: f32 [n][cols] → y: block_q8_1 [n][cols / 32]. `blocks` = n · cols / 32.
extern "C" __global__ void __launch_bounds__(QZ_THREADS)
    quantize_q8_1(const float* __restrict__ x, block_q8_1* __restrict__ y, long long blocks) {
  const long long b = (long long)blockIdx.x * (QZ_THREADS / 32) + (threadIdx.x >> 5);
  if (b >= blocks) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  float d;
  int sum, sum_lo;
  const int q = q8_1_lane(x[b * 32 + lane], d, sum, sum_lo);
  y[b].qs[lane] = (int8_t)q;
  if (lane == 0) {
    y[b].d = f16_bits(d);
    y[b].s = f16_bits((float)sum * d);
  }
}
SIM_EXPORT(quantize_q8_1)

// x: f32 [n][cols] → qs: int8 [n][cols], ds: float4 [n][cols / 32]. `blocks` = n · cols / 32.
extern "C" __global__ void __launch_bounds__(QZ_THREADS)
    quantize_q8_1_mmq(const float* __restrict__ x, int8_t* __restrict__ qs,
                      float4* __restrict__ ds, long long blocks) {
  const long long b = (long long)blockIdx.x * (QZ_THREADS / 32) + (threadIdx.x >> 5);
  if (b >= blocks) return;
  const int lane = threadIdx.x & 31;
  float d;
  int sum, sum_lo;
  const int q = q8_1_lane(x[b * 32 + lane], d, sum, sum_lo);
  qs[b * 32 + lane] = (int8_t)q;
  if (lane == 0)
    ds[b] = make_float4(d, (float)sum * d, (float)sum_lo * d, (float)(sum - sum_lo) * d);
}
SIM_EXPORT(quantize_q8_1_mmq)
