// Mixture-of-experts plumbing around the expert matmuls: the router (softmax, top-k,
// renormalisation), grouping the (token, slot) pairs by expert on the device, gathering the
// rows an expert runs on, the weighted sum of the expert outputs in a fixed slot order, and
// qwen2moe's sigmoid-gated shared expert.
//
// Everything here is deterministic: no result depends on the order threads or blocks run in
// (the only atomics count, and counts do not depend on order).

#include "strata.cuh"

// ---------------------------------------------------------------------------------------------
// Router. One warp per token: lane l holds experts l, l+32, l+64, ... in registers (the loads
// are coalesced, and the softmax and each top-k round are warp reductions with no shared
// memory or barriers). Up to 32·ROUTE_PER_LANE experts.

#define ROUTE_WARPS 4
#define ROUTE_PER_LANE 16
#define ROUTE_MAX_EXPERTS (32 * ROUTE_PER_LANE)

// Whether (v, i) ranks above (bv, bi): the larger probability, and on a tie the lower expert id
// (what the CPU's `route` picks). A strict total order, so every lane of a butterfly reduction
// ends with the same winner.
__device__ __forceinline__ bool route_better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

// For each of n tokens' ne router logits: p = softmax(logits); the k largest p (ties to the
// lower id) as ids[t][s] and weights[t][s], slot 0 the largest; with `norm`, the k weights
// divided by their sum (when it is positive), summed in slot order as the CPU does.
extern "C" __global__ void __launch_bounds__(ROUTE_WARPS * 32)
    moe_route_f32(const float* __restrict__ logits, int* __restrict__ ids,
                  float* __restrict__ weights, int n, int ne, int k, int norm) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * ROUTE_WARPS + (threadIdx.x >> 5);
  // A whole warp leaves together, and nothing below synchronises more than its warp.
  if (t >= n) return;
  const float* row = logits + (size_t)t * ne;
  float p[ROUTE_PER_LANE];
  float mx = neg_inf();
#pragma unroll
  for (int j = 0; j < ROUTE_PER_LANE; j++) {
    const int e = j * 32 + lane;
    p[j] = e < ne ? row[e] : neg_inf();
    mx = fmaxf(mx, p[j]);
  }
  mx = warp_max(mx);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < ROUTE_PER_LANE; j++) {
    if (j * 32 + lane < ne) {
      p[j] = expf(p[j] - mx);
      sum += p[j];
    }
  }
  sum = warp_sum(sum);
  // Probabilities are >= 0; -1 marks an expert that is absent or already taken.
#pragma unroll
  for (int j = 0; j < ROUTE_PER_LANE; j++) p[j] = j * 32 + lane < ne ? p[j] / sum : -1.0f;

  // k rounds of a warp argmax. Lane s % 32 writes slot s, and with renormalisation rescales
  // the slots it wrote itself (so no lane reads another's store); a register array indexed by
  // slot would live in local memory.
  float wsum = 0.0f;
  int* idr = ids + (size_t)t * k;
  float* wr = weights + (size_t)t * k;
  for (int s = 0; s < k; s++) {
    float bv = -2.0f;
    int bi = 0;
    // Ascending ids within a lane: the strict > keeps the lowest on a tie.
#pragma unroll
    for (int j = 0; j < ROUTE_PER_LANE; j++) {
      if (p[j] > bv) {
        bv = p[j];
        bi = j * 32 + lane;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
      const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
      if (route_better(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    // The owner marks it taken (an unrolled compare keeps p in registers).
#pragma unroll
    for (int j = 0; j < ROUTE_PER_LANE; j++)
      if (j * 32 + lane == bi) p[j] = -1.0f;
    // Only NaN logits leave no winner (bv stays -2): the id stays in range, the weight is NaN.
    if (bv < -1.0f) bv = __int_as_float(0x7fffffff);
    if (lane == (s & 31)) {
      idr[s] = bi;
      wr[s] = bv;
    }
    // In slot order, as the CPU sums them (every lane holds the same winners).
    wsum += bv;
  }
  if (norm && wsum > 0.0f)
    for (int s = lane; s < k; s += 32) wr[s] = wr[s] / wsum;
}
SIM_EXPORT(moe_route_f32)

// ---------------------------------------------------------------------------------------------
// Grouping: for ids [n][k], per expert e the count of (token, slot) pairs routed to it, the
// offsets (exclusive prefix sum, ne + 1 entries) and the list of t·k + s for those pairs,
// ordered by token then slot; and pos[t·k + s], where that pair sits in the list. A grouped
// expert GEMM reads list[offsets[e] .. offsets[e + 1]); ids outside [0, ne) are left out.

#define GROUP_THREADS 256
#define GROUP_MAX_EXPERTS 1024

// counts[e] += how many of the nk ids equal e (counts cleared before). A shared histogram per
// block, then one global atomic per non-zero bin: the totals do not depend on the order.
extern "C" __global__ void __launch_bounds__(GROUP_THREADS)
    moe_count_i32(const int* __restrict__ ids, int* __restrict__ counts, int nk, int ne) {
  __shared__ int hist[GROUP_MAX_EXPERTS];
  for (int e = threadIdx.x; e < ne; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < nk; i += gridDim.x * blockDim.x) {
    const int e = ids[i];
    if (e >= 0 && e < ne) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < ne; e += blockDim.x)
    if (hist[e] != 0) atomicAdd(&counts[e], hist[e]);
}
SIM_EXPORT(moe_count_i32)

// The sum of an int over the block (blockDim.x a multiple of 32); every thread gets it.
__device__ __forceinline__ int block_sum_int(int v, int* scratch) {
  v = warp_sum_int(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0;
  v = warp_sum_int(v);
  __syncthreads();
  return v;
}

// One block per expert e: its offset from the counts below it, then a walk over the tokens in
// order, a block-wide exclusive scan of how many slots of each token chose e giving each
// pair's place. Every block reads all n·k ids (a few KiB, from L2), which keeps the order fixed
// without a global sort.
extern "C" __global__ void __launch_bounds__(GROUP_THREADS)
    moe_scatter_i32(const int* __restrict__ ids, const int* __restrict__ counts,
                    int* __restrict__ offsets, int* __restrict__ list, int* __restrict__ pos,
                    int n, int k, int ne) {
  __shared__ int red[32];
  __shared__ int warp_total[GROUP_THREADS / 32];
  const int e = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int c = 0;
  for (int i = threadIdx.x; i < e; i += blockDim.x) c += counts[i];
  int base = block_sum_int(c, red);
  if (threadIdx.x == 0) {
    offsets[e] = base;
    if (e == ne - 1) offsets[ne] = base + counts[e];
  }
  for (int t0 = 0; t0 < n; t0 += blockDim.x) {
    const int t = t0 + threadIdx.x;
    const int* row = ids + (size_t)t * k;
    int m = 0;
    if (t < n)
      for (int s = 0; s < k; s++) m += row[s] == e;
    // Inclusive scan within the warp, then the warps' totals.
    int incl = m;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(FULL_MASK, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
      const int v = warp_total[w];
      before += w < warp ? v : 0;
      total += v;
    }
    int at = base + before + incl - m;
    if (m != 0)
      for (int s = 0; s < k; s++)
        if (row[s] == e) {
          list[at] = t * k + s;
          pos[t * k + s] = at;
          at++;
        }
    base += total;
    // warp_total is rewritten by the next chunk.
    __syncthreads();
  }
}
SIM_EXPORT(moe_scatter_i32)

// ---------------------------------------------------------------------------------------------
// Rows, weighted sum, shared expert.

#define MOE_THREADS 256
#define MOE_PER_THREAD 4
#define MOE_TILE (MOE_THREADS * MOE_PER_THREAD)

// out[i] = x[list[i] / k] for i < m: the rows of an expert's tokens (or of every expert's, in
// list order), contiguous for its GEMM. A row that names no token (a list entry out of range)
// is written as zeros rather than read out of bounds.
extern "C" __global__ void __launch_bounds__(MOE_THREADS)
    moe_gather_f32(const float* __restrict__ x, const int* __restrict__ list,
                   float* __restrict__ out, int m, int n, int k, int n_embd) {
  const int base = blockIdx.x * MOE_TILE + threadIdx.x;
  for (int r = blockIdx.y; r < m; r += gridDim.y) {
    const int v = list[r];
    const int t = v >= 0 ? v / k : -1;
    float* orow = out + (size_t)r * n_embd;
    const float* xr = x + (size_t)(t >= 0 && t < n ? t : 0) * n_embd;
#pragma unroll
    for (int j = 0; j < MOE_PER_THREAD; j++) {
      const int i = base + j * MOE_THREADS;
      if (i < n_embd) orow[i] = t >= 0 && t < n ? xr[i] : 0.0f;
    }
  }
}
SIM_EXPORT(moe_gather_f32)

// out[t][i] = Σ_s w[t][s] · y[row(t, s)][i], the slots summed in order s = 0, 1, ... whatever
// order the experts ran in, where row(t, s) = t·k + s (y laid out [n][k][n_embd]) or, given
// `pos`, pos[t·k + s] (y in list order, as a grouped GEMM writes it).
extern "C" __global__ void __launch_bounds__(MOE_THREADS)
    moe_weighted_sum_f32(const float* __restrict__ y, const float* __restrict__ w,
                         const int* __restrict__ pos, float* __restrict__ out, int n, int k,
                         int n_embd) {
  const int base = blockIdx.x * MOE_TILE + threadIdx.x;
  for (int t = blockIdx.y; t < n; t += gridDim.y) {
    float acc[MOE_PER_THREAD];
#pragma unroll
    for (int j = 0; j < MOE_PER_THREAD; j++) acc[j] = 0.0f;
    for (int s = 0; s < k; s++) {
      const int slot = t * k + s;
      const int r = pos ? pos[slot] : slot;
      // A pair the grouping left out (its id out of range: pos is -1) adds nothing.
      if (r < 0 || r >= n * k) continue;
      const float ws = w[slot];
      const float* yr = y + (size_t)r * n_embd;
#pragma unroll
      for (int j = 0; j < MOE_PER_THREAD; j++) {
        const int i = base + j * MOE_THREADS;
        if (i < n_embd) acc[j] += ws * yr[i];
      }
    }
    float* orow = out + (size_t)t * n_embd;
#pragma unroll
    for (int j = 0; j < MOE_PER_THREAD; j++) {
      const int i = base + j * MOE_THREADS;
      if (i < n_embd) orow[i] = acc[j];
    }
  }
}
SIM_EXPORT(moe_weighted_sum_f32)

// acc[t] += sigmoid(x[t] · gate_inp) · y[t], one block per token (qwen2moe's shared expert,
// whose gate is a learned scalar per token).
extern "C" __global__ void __launch_bounds__(MOE_THREADS)
    moe_shared_gate_f32(const float* __restrict__ x, const float* __restrict__ gate_inp,
                        const float* __restrict__ y, float* __restrict__ acc, int n_embd) {
  __shared__ float red[32];
  const size_t off = (size_t)blockIdx.x * n_embd;
  float z = 0.0f;
  for (int i = threadIdx.x; i < n_embd; i += blockDim.x) z += x[off + i] * gate_inp[i];
  z = block_sum(z, red);
  const float g = 1.0f / (1.0f + expf(-z));
  for (int i = threadIdx.x; i < n_embd; i += blockDim.x) acc[off + i] += g * y[off + i];
}
SIM_EXPORT(moe_shared_gate_f32)
