// Sampling on the device: argmax of each logits row (greedy decode copies back one integer per
// sequence), the top-k values and indices of each row (the host's sampler chain then works on
// k candidates instead of the vocabulary), and log-softmax (log-probabilities).
//
// A vocabulary row is 150k-260k logits, so argmax and top-k split each row over many blocks
// (one decode row still fills the GPU) and reduce the blocks' partial results in a second,
// small kernel: no atomics, so the result does not depend on which block finishes first.

#include "strata.cuh"

// ---------------------------------------------------------------------------------------------
// Argmax: the largest value, the lowest index on a tie (the CPU's greedy sampler keeps the
// first of equal maxima). NaNs never win; a row of NaNs gives index 0.

#define ARGMAX_THREADS 256
#define ARGMAX_PER_THREAD 8
#define ARGMAX_CHUNK (ARGMAX_THREADS * ARGMAX_PER_THREAD)

__device__ __forceinline__ bool arg_better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

// (bv, bi) reduced over the block: every thread gets the winner. `sv`/`si` hold 32 entries.
__device__ __forceinline__ void block_argmax(float& bv, int& bi, float* sv, int* si) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
    const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
    if (arg_better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  const bool have = lane < (int)(blockDim.x >> 5);
  bv = have ? sv[lane] : neg_inf();
  bi = have ? si[lane] : 0x7fffffff;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
    const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
    if (arg_better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  __syncthreads();
}

// Block (c, r) reduces elements [c·ARGMAX_CHUNK, (c+1)·ARGMAX_CHUNK) of row r into
// part_v/part_i[r·gridDim.x + c]. Index 0x7fffffff marks a chunk with no comparable value.
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_partial_f32(const float* __restrict__ x, float* __restrict__ part_v,
                       int* __restrict__ part_i, int n) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const float* row = x + (size_t)blockIdx.y * n;
  float bv = neg_inf();
  int bi = 0x7fffffff;
#pragma unroll
  for (int j = 0; j < ARGMAX_PER_THREAD; j++) {
    const int i = blockIdx.x * ARGMAX_CHUNK + j * ARGMAX_THREADS + threadIdx.x;
    if (i < n) {
      const float v = row[i];
      if (arg_better(v, i, bv, bi)) {
        bv = v;
        bi = i;
      }
    }
  }
  block_argmax(bv, bi, sv, si);
  if (threadIdx.x == 0) {
    part_v[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = bv;
    part_i[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = bi;
  }
}
SIM_EXPORT(argmax_partial_f32)

// One block per row: the winner among its `chunks` partial results.
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_final_f32(const float* __restrict__ part_v, const int* __restrict__ part_i,
                     int* __restrict__ out, int chunks) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const size_t off = (size_t)blockIdx.x * chunks;
  float bv = neg_inf();
  int bi = 0x7fffffff;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    const float v = part_v[off + c];
    const int i = part_i[off + c];
    if (arg_better(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  }
  block_argmax(bv, bi, sv, si);
  if (threadIdx.x == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
}
SIM_EXPORT(argmax_final_f32)

// ---------------------------------------------------------------------------------------------
// Top-k (k <= 128): bitonic top-k over 64-bit keys (the value's bits made order-preserving,
// high; the complement of the index, low), so one unsigned comparison orders by value, then by
// lower index, exactly as f32::total_cmp and the CPU sampler's sort do (-0 below +0, NaN above
// infinity). The padding key 0 ranks below every value but a NaN with all bits set.
//
// Stage 1 (block per TOPK_CHUNK elements of a row): sort runs of K2 keys (K2 = k rounded up to
// a power of two), then halve the number of runs until one is left: the top K2 of two sorted
// runs A and B are max(A[i], B[K2-1-i]), a bitonic sequence, sorted by a bitonic merge of
// log2(K2) steps. Stage 2 (block per row) merges the chunks' runs the same way.

#define TOPK_THREADS 256
#define TOPK_CHUNK 4096
#define TOPK_MAX_K 128

__device__ __forceinline__ unsigned long long topk_key(float v, int i) {
  const unsigned b = __float_as_uint(v);
  const unsigned o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return ((unsigned long long)o << 32) | (unsigned long long)(0xffffffffu - (unsigned)i);
}

__device__ __forceinline__ float topk_value(unsigned long long key) {
  const unsigned o = (unsigned)(key >> 32);
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

__device__ __forceinline__ int topk_index(unsigned long long key) {
  return (int)(0xffffffffu - (unsigned)key);
}

// Sorts each run of k2 keys of keys[0, len) descending (len a multiple of k2, k2 a power of
// two): the bitonic network up to size k2, the direction of each sub-sequence taken from the
// element's place inside its run, so that every run ends descending.
__device__ __forceinline__ void sort_runs(unsigned long long* keys, int len, int k2) {
  for (int size = 2; size <= k2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int p = threadIdx.x; p < (len >> 1); p += blockDim.x) {
        const int i = 2 * p - (p & (stride - 1));
        const int j = i + stride;
        const bool desc = ((i & (k2 - 1)) & size) == 0;
        const unsigned long long a = keys[i], b = keys[j];
        if (desc ? a < b : a > b) {
          keys[i] = b;
          keys[j] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Merges `runs` sorted runs of k2 keys (runs a power of two) into run 0: the top k2 of all.
__device__ __forceinline__ void merge_runs(unsigned long long* keys, int runs, int k2) {
  for (int gap = 1; gap < runs; gap <<= 1) {
    // Run a = m·2·gap takes the elementwise max with run a + gap reversed.
    const int pairs = runs / (2 * gap);
    for (int q = threadIdx.x; q < pairs * k2; q += blockDim.x) {
      const int a = (q / k2) * 2 * gap, i = q % k2;
      const unsigned long long x = keys[a * k2 + i], y = keys[(a + gap) * k2 + k2 - 1 - i];
      if (y > x) keys[a * k2 + i] = y;
    }
    __syncthreads();
    // Bitonic merge of each surviving run, descending.
    for (int stride = k2 >> 1; stride > 0; stride >>= 1) {
      for (int q = threadIdx.x; q < pairs * (k2 >> 1); q += blockDim.x) {
        const int a = (q / (k2 >> 1)) * 2 * gap, p = q % (k2 >> 1);
        const int i = a * k2 + 2 * p - (p & (stride - 1));
        const int j = i + stride;
        const unsigned long long u = keys[i], v = keys[j];
        if (u < v) {
          keys[i] = v;
          keys[j] = u;
        }
      }
      __syncthreads();
    }
  }
}

// Block (c, r): the top k2 keys of chunk c of row r, sorted, into part[(r·chunks + c)·k2 ...].
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_partial_f32(const float* __restrict__ x, unsigned long long* __restrict__ part, int n,
                     int k2) {
  __shared__ unsigned long long keys[TOPK_CHUNK];
  const float* row = x + (size_t)blockIdx.y * n;
  const int c0 = blockIdx.x * TOPK_CHUNK;
  // The last chunk of a row is padded with keys that rank below every value.
  for (int i = threadIdx.x; i < TOPK_CHUNK; i += blockDim.x)
    keys[i] = c0 + i < n ? topk_key(row[c0 + i], c0 + i) : 0ull;
  __syncthreads();
  sort_runs(keys, TOPK_CHUNK, k2);
  merge_runs(keys, TOPK_CHUNK / k2, k2);
  unsigned long long* out = part + ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * k2;
  for (int i = threadIdx.x; i < k2; i += blockDim.x) out[i] = keys[i];
}
SIM_EXPORT(topk_partial_f32)

// Block r: merges the `chunks` sorted runs of row r (TOPK_CHUNK / k2 - 1 at a time, next to the
// best so far) and writes the top k as values and indices, largest first.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_final_f32(const unsigned long long* __restrict__ part, float* __restrict__ values,
                   int* __restrict__ indices, int chunks, int k2, int k) {
  __shared__ unsigned long long keys[TOPK_CHUNK];
  const unsigned long long* runs = part + (size_t)blockIdx.x * chunks * k2;
  const int cap = TOPK_CHUNK / k2;
  int done = 0;
  bool first = true;
  while (done < chunks) {
    // Run 0 is the best so far (after the first batch); the rest are the next chunks' runs.
    const int lead = first ? 0 : 1;
    const int take = min(cap - lead, chunks - done);
    int used = lead + take, runs_p2 = 1;
    while (runs_p2 < used) runs_p2 <<= 1;
    for (int i = threadIdx.x + lead * k2; i < runs_p2 * k2; i += blockDim.x)
      keys[i] = i < used * k2 ? runs[(size_t)done * k2 + i - lead * k2] : 0ull;
    __syncthreads();
    merge_runs(keys, runs_p2, k2);
    done += take;
    first = false;
  }
  float* vr = values + (size_t)blockIdx.x * k;
  int* ir = indices + (size_t)blockIdx.x * k;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    vr[i] = topk_value(keys[i]);
    ir[i] = topk_index(keys[i]);
  }
}
SIM_EXPORT(topk_final_f32)

// ---------------------------------------------------------------------------------------------
// Log-softmax: out[r][i] = x[r][i] - max - log(Σ exp(x[r][j] - max)), one block per row (for
// log-probabilities, not on the greedy path). 1024 threads: one block must stream a whole
// vocabulary row.

#define LSM_THREADS 1024

extern "C" __global__ void __launch_bounds__(LSM_THREADS)
    log_softmax_f32(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float red[32];
  const float* row = x + (size_t)blockIdx.x * n;
  float* orow = out + (size_t)blockIdx.x * n;
  float mx = neg_inf();
  for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, row[i]);
  mx = block_max(mx, red);
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(row[i] - mx);
  s = block_sum(s, red);
  const float lse = mx + logf(s);
  for (int i = threadIdx.x; i < n; i += blockDim.x) orow[i] = row[i] - lse;
}
SIM_EXPORT(log_softmax_f32)
