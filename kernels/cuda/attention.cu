// Decode attention (flash-decoding) over the paged KV cache: one query token per sequence,
// several sequences per launch, each with its own page table and length.
//
// A block takes one split (a run of positions) of one sequence for one KV head and up to
// DEC_GMAX of its query heads (GQA: the group shares every K and V row the block reads). K and
// V tiles are loaded into shared memory as f16 (f16 pages by cp.async, Q8_0/Q4_0 pages
// dequantized on the way), scores and the online softmax are f32, and each split leaves its
// unnormalised output with its running max and sum; `attn_decode_combine` rescales the splits
// into the result. Splitting along the sequence gives a long context enough blocks for every
// SM even when a batch has one sequence and the model two KV heads.
//
// Numerics against the CPU (strata_simd's attention, ggml's CPU path): q is rounded to f16 as
// there, f16 keys are exact in the tiles (quantized ones are d*q rounded to f16), scores are
// f32 sums in another order, and the probabilities stay f32 (the CPU rounds them to f16).

#include "kvcache.cuh"

#define DEC_THREADS 128
// Query heads per block; a larger group is split over blockIdx.y.
#define DEC_GMAX 8

// Sequence `seq`'s visible positions and its splits: [lo, len), cut at multiples of `split`
// (so a split reads as few pages as possible), counted from the split that holds `lo`.
struct DecodeRange {
  int len, s0, n_split;
};
__device__ __forceinline__ DecodeRange decode_range(const int* seqs, int seq, int window,
                                                    int split, int max_len, int max_splits) {
  DecodeRange r;
  r.len = min(seqs[2 * seq + 1], max_len);
  const int lo = window > 0 ? max(0, r.len - window) : 0;
  r.s0 = lo / split * split;
  r.n_split = r.len > 0 ? min(max_splits, (r.len - r.s0 + split - 1) / split) : 0;
  return r;
}

// The tile geometry of heads of HD values.
template <int HD>
struct DecodeGeom {
  enum : int { T = 8192 / HD };               // positions per tile: 16 KiB of f16 a side
  enum : int { TPH = DEC_THREADS / T };       // score phase: threads per position
  enum : int { HPT = DEC_GMAX / TPH };        // ... heads per thread
  enum : int { CP = HD / 2 };                 // value phase: column pairs
  enum : int { HSTRIDE = DEC_THREADS / CP };  // ... threads per column pair
  enum : int { HPV = DEC_GMAX / HSTRIDE };    // ... heads per thread
  static_assert(TPH * HPT == DEC_GMAX && HSTRIDE * HPV == DEC_GMAX, "head split");
};

// Grid (max_splits, n_head_kv * head chunks, n_seq), DEC_THREADS threads.
//  q:        [n_seq][n_head][HD] f32
//  k_pages, v_pages: n_pages page base addresses each (K and V pages of one layer)
//  seqs:     [n_seq][2] i32: (index of the sequence's first page in the tables, positions)
//  part:     [n_seq][n_head][max_splits][HD + 2] f32: per split, the unnormalised output, the
//            max score and the sum of exp(score - max)
// The shared arrays are declared in each kernel (DECODE_KERNEL), not here: the simulator
// checks only shared variables of non-template functions (a template's statics are emitted
// outside the shared-memory section).
template <int HD>
__device__ __forceinline__ void attn_decode(
    float (*q_s)[HD], unsigned (*k_s)[HD / 2 + 4], unsigned (*v_s)[HD / 2 + 4],
    float (*p_s)[DecodeGeom<HD>::T], float* m_s, float* l_s, float* alpha_s,
    const float* __restrict__ q, const uint64_t* __restrict__ k_pages,
    const uint64_t* __restrict__ v_pages, int n_pages, const int* __restrict__ seqs,
    float* __restrict__ part, int n_head, int n_head_kv, float scale, float softcap, int window,
    int page_tokens, int k_type, int v_type, int split, int max_splits, int max_len) {
  constexpr int T = DecodeGeom<HD>::T;
  constexpr int TPH = DecodeGeom<HD>::TPH;
  constexpr int HPT = DecodeGeom<HD>::HPT;
  constexpr int CP = DecodeGeom<HD>::CP;
  constexpr int HSTRIDE = DecodeGeom<HD>::HSTRIDE;
  constexpr int HPV = DecodeGeom<HD>::HPV;

  const int seq = blockIdx.z, j = blockIdx.x, tid = threadIdx.x;
  const int group = n_head / n_head_kv;
  const int chunks = (group + DEC_GMAX - 1) / DEC_GMAX;
  const int kvh = blockIdx.y / chunks;
  const int g0 = (blockIdx.y % chunks) * DEC_GMAX;
  const int ng = min(DEC_GMAX, group - g0);
  const DecodeRange rg = decode_range(seqs, seq, window, split, max_len, max_splits);
  if (j >= rg.n_split) return;  // the whole block: before any barrier
  const int lo = window > 0 ? max(0, rg.len - window) : 0;
  const int a = max(lo, rg.s0 + j * split), b = min(rg.len, rg.s0 + (j + 1) * split);
  // The sequence's own tables; a first page outside the tables reads as no pages (zeros).
  const int first = seqs[2 * seq];
  const uint64_t* kp = k_pages + max(0, first);
  const uint64_t* vp = v_pages + max(0, first);
  const int np = first < 0 ? 0 : n_pages - first;
  const int kv_dim = n_head_kv * HD;
  const int k_row = kv_bytes(k_type, kv_dim), v_row = kv_bytes(v_type, kv_dim);
  const int k_off = kvh * kv_bytes(k_type, HD), v_off = kvh * kv_bytes(v_type, HD);
  const int h0 = kvh * group + g0;

  // q rounded to f16 (as ggml rounds it to multiply f16 keys), zeros past the group.
  for (int i = tid; i < DEC_GMAX * HD; i += DEC_THREADS) {
    const int g = i / HD, d = i % HD;
    q_s[g][d] = g < ng ? f16(f16_bits(q[((size_t)seq * n_head + h0 + g) * HD + d])) : 0.0f;
  }
  if (tid < DEC_GMAX) {
    m_s[tid] = neg_inf();
    l_s[tid] = 0.0f;
  }
  float acc[HPV][2];
#pragma unroll
  for (int k = 0; k < HPV; k++) acc[k][0] = acc[k][1] = 0.0f;

  for (int t0 = a; t0 < b; t0 += T) {
    kv_load_tile<HD, T, DEC_THREADS>(k_s, kp, np, k_type, page_tokens, k_row, k_off, 0, t0, a, b);
    kv_load_tile<HD, T, DEC_THREADS>(v_s, vp, np, v_type, page_tokens, v_row, v_off, 0, t0, a, b);
    cp_async_wait_all();
    __syncthreads();

    // Scores: thread (position p, heads gq, gq + TPH, ...); a warp reads 32 rows (distinct
    // banks thanks to the padding) against the same q values (a broadcast).
    {
      const int p = tid % T, gq = tid / T;
      float s[HPT];
#pragma unroll
      for (int k = 0; k < HPT; k++) s[k] = 0.0f;
#pragma unroll 1
      for (int c = 0; c < HD / 8; c++) {
        const uint4 kk = *(const uint4*)&k_s[p][4 * c];
        const float kf[8] = {half_lo(kk.x), half_hi(kk.x), half_lo(kk.y), half_hi(kk.y),
                             half_lo(kk.z), half_hi(kk.z), half_lo(kk.w), half_hi(kk.w)};
#pragma unroll
        for (int k = 0; k < HPT; k++) {
          const float4 qa = *(const float4*)&q_s[gq + k * TPH][8 * c];
          const float4 qb = *(const float4*)&q_s[gq + k * TPH][8 * c + 4];
          s[k] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] +
                  qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
        }
      }
#pragma unroll
      for (int k = 0; k < HPT; k++) {
        float v = s[k] * scale;
        if (softcap > 0.0f) v = softcap * tanhf(v / softcap);
        p_s[gq + k * TPH][p] = (t0 + p < b) ? v : neg_inf();
      }
    }
    __syncthreads();

    // Online softmax: warp w keeps heads w, w + 4.
    {
      const int lane = tid & 31, warp = tid >> 5;
      for (int g = warp; g < ng; g += DEC_THREADS / 32) {
        float mx = neg_inf();
        for (int p = lane; p < T; p += 32) mx = fmaxf(mx, p_s[g][p]);
        mx = warp_max(mx);
        const float m_old = m_s[g];
        const float m_new = fmaxf(m_old, mx);  // finite: the tile has a visible position
        const float alpha = __expf(m_old - m_new);
        float sum = 0.0f;
        for (int p = lane; p < T; p += 32) {
          const float e = __expf(p_s[g][p] - m_new);
          p_s[g][p] = e;
          sum += e;
        }
        sum = warp_sum(sum);
        __syncwarp();
        if (lane == 0) {
          m_s[g] = m_new;
          l_s[g] = l_s[g] * alpha + sum;
          alpha_s[g] = alpha;
        }
      }
    }
    __syncthreads();

    // Values: thread (column pair c, heads gv, gv + HSTRIDE, ...); a warp reads one row's
    // consecutive words, and the probabilities four at a time (broadcast).
    {
      const int c = tid % CP, gv = tid / CP;
      const int n = b - t0 < T ? b - t0 : T;
#pragma unroll
      for (int k = 0; k < HPV; k++) {
        if (gv + k * HSTRIDE < ng) {
          const float al = alpha_s[gv + k * HSTRIDE];
          acc[k][0] *= al;
          acc[k][1] *= al;
        }
      }
      for (int p = 0; p < n; p += 4) {
        float v0[4], v1[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const unsigned w = v_s[p + i][c];
          v0[i] = half_lo(w);
          v1[i] = half_hi(w);
        }
#pragma unroll
        for (int k = 0; k < HPV; k++) {
          const float4 pr = *(const float4*)&p_s[gv + k * HSTRIDE][p];
          acc[k][0] += pr.x * v0[0] + pr.y * v0[1] + pr.z * v0[2] + pr.w * v0[3];
          acc[k][1] += pr.x * v1[0] + pr.y * v1[1] + pr.z * v1[2] + pr.w * v1[3];
        }
      }
    }
    __syncthreads();  // the next tile overwrites k_s, v_s and p_s
  }

  {
    const int c = tid % CP, gv = tid / CP;
#pragma unroll
    for (int k = 0; k < HPV; k++) {
      const int g = gv + k * HSTRIDE;
      if (g < ng) {
        float* o = part + (((size_t)seq * n_head + h0 + g) * max_splits + j) * (HD + 2);
        *(float2*)&o[2 * c] = make_float2(acc[k][0], acc[k][1]);
      }
    }
    if (tid < ng) {
      float* o = part + (((size_t)seq * n_head + h0 + tid) * max_splits + j) * (HD + 2);
      o[HD] = m_s[tid];
      o[HD + 1] = l_s[tid];
    }
  }
}

#define DECODE_KERNEL(HD)                                                                       \
  extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode_hd##HD(                 \
      const float* __restrict__ q, const uint64_t* __restrict__ k_pages,                        \
      const uint64_t* __restrict__ v_pages, int n_pages, const int* __restrict__ seqs,          \
      float* __restrict__ part, int n_head, int n_head_kv, float scale, float softcap,          \
      int window, int page_tokens, int k_type, int v_type, int split, int max_splits,           \
      int max_len) {                                                                            \
    __shared__ __align__(16) float q_s[DEC_GMAX][HD];                                           \
    __shared__ __align__(16) unsigned k_s[DecodeGeom<HD>::T][HD / 2 + 4];                       \
    __shared__ __align__(16) unsigned v_s[DecodeGeom<HD>::T][HD / 2 + 4];                       \
    __shared__ __align__(16) float p_s[DEC_GMAX][DecodeGeom<HD>::T];                            \
    __shared__ float m_s[DEC_GMAX];                                                             \
    __shared__ float l_s[DEC_GMAX];                                                             \
    __shared__ float alpha_s[DEC_GMAX];                                                         \
    attn_decode<HD>(q_s, k_s, v_s, p_s, m_s, l_s, alpha_s, q, k_pages, v_pages, n_pages, seqs,  \
                    part, n_head, n_head_kv, scale, softcap, window, page_tokens, k_type,       \
                    v_type, split, max_splits, max_len);                                        \
  }

DECODE_KERNEL(64)
SIM_EXPORT(attn_decode_hd64)
DECODE_KERNEL(128)
SIM_EXPORT(attn_decode_hd128)
DECODE_KERNEL(256)
SIM_EXPORT(attn_decode_hd256)

// Grid (n_head, n_seq), 128 threads: out[seq][h] = sum_j e_j * acc_j / sum_j e_j * l_j with
// e_j = exp(m_j - max_j m_j), over the sequence's splits. A sequence with no positions gets 0.
extern "C" __global__ void __launch_bounds__(128)
    attn_decode_combine(const float* __restrict__ part, const int* __restrict__ seqs,
                        float* __restrict__ out, int n_head, int head_dim, int window, int split,
                        int max_splits, int max_len) {
  const int h = blockIdx.x, seq = blockIdx.y;
  const DecodeRange rg = decode_range(seqs, seq, window, split, max_len, max_splits);
  const float* pp = part + ((size_t)seq * n_head + h) * max_splits * (head_dim + 2);
  float* o = out + ((size_t)seq * n_head + h) * head_dim;
  float m = neg_inf();
  for (int j = 0; j < rg.n_split; j++) m = fmaxf(m, pp[j * (head_dim + 2) + head_dim]);
  float l = 0.0f;
  for (int j = 0; j < rg.n_split; j++) {
    const float* pj = pp + j * (head_dim + 2);
    l += __expf(pj[head_dim] - m) * pj[head_dim + 1];
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < rg.n_split; j++) {
      const float* pj = pp + j * (head_dim + 2);
      acc += __expf(pj[head_dim] - m) * pj[d];
    }
    o[d] = acc * inv;
  }
}
SIM_EXPORT(attn_decode_combine)
