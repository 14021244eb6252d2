// Prefill attention: causal flash attention (FlashAttention-2's loop) for n query tokens of one
// sequence at positions pos0 .. pos0 + n - 1, over the paged KV cache (which already holds their
// keys and values), on f16 tensor cores.
//
// A block takes 64 query rows of one KV head — a row is a (token, query head of the group)
// pair, so the GQA group shares every K and V tile the block loads — and DV of the output's
// columns: all of them, or for heads of 256 one half per block (a warp's 16 x 256 f32
// accumulator alone would take 128 registers a thread, with Q's fragments more than there are;
// the halves recompute the scores instead, 1.5x the tensor work). It walks the visible
// positions in tiles of BN: S = Q K^T by mma m16n8k16 (Q in registers as A fragments, K from
// shared memory by ldmatrix), the online softmax in registers, P rounded to f16 as the next A
// fragment, O += P V (V by ldmatrix.trans). Tiles come in as f16: f16 pages by cp.async, Q8_0 /
// Q4_0 pages dequantized into shared memory on the way (kvcache.cuh).

#include "kvcache.cuh"

#define PF_THREADS 128
#define PF_BM 64

// The shared tiles are declared in each kernel (PREFILL_KERNEL): the simulator checks only
// shared variables of non-template functions.
template <int HD, int BN, int DV>
__device__ __forceinline__ void attn_prefill(
    unsigned (*k_s)[HD / 2 + 4], unsigned (*v_s)[DV / 2 + 4], const float* __restrict__ q,
    const uint64_t* __restrict__ k_pages, const uint64_t* __restrict__ v_pages, int n_pages,
    float* __restrict__ out, int n_tok, int pos0, int n_head, int n_head_kv, float scale,
    float softcap, int window, int page_tokens, int k_type, int v_type) {
  constexpr int KS = HD / 16;  // k-steps of Q K^T
  constexpr int NS = BN / 8;   // n-tiles of S
  constexpr int NO = DV / 8;   // n-tiles of O

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int group = n_head / n_head_kv;
  const int n_rows = n_tok * group;
  // The last rows (the longest causal spans) first, so the tail of the grid is short work.
  const int row0 = (gridDim.x - 1 - blockIdx.x) * PF_BM;
  const int kvh = blockIdx.y;
  const int dv0 = blockIdx.z * DV;  // this block's output columns
  const int kv_dim = n_head_kv * HD;
  const int k_row = kv_bytes(k_type, kv_dim), v_row = kv_bytes(v_type, kv_dim);
  const int k_off = kvh * kv_bytes(k_type, HD), v_off = kvh * kv_bytes(v_type, HD);

  // This lane's two rows (g and g + 8 of the warp's 16) and their query positions.
  int qpos[2];
  bool valid[2];
  const float* qrow[2];
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int r = row0 + warp * 16 + g + 8 * i;
    valid[i] = r < n_rows;
    const int tok = valid[i] ? r / group : 0;
    qpos[i] = pos0 + tok;
    qrow[i] = q + ((size_t)tok * n_head + kvh * group + (valid[i] ? r % group : 0)) * HD;
  }
  // Q as A fragments, rounded to f16 (ggml rounds q to f16 against f16 keys too).
  unsigned qa[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; kk++) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int row = i & 1, col = 16 * kk + 2 * t + 8 * (i >> 1);
      float2 v = make_float2(0.0f, 0.0f);
      if (valid[row]) v = *(const float2*)&qrow[row][col];
      qa[kk][i] = pack_half2(v.x, v.y);
    }
  }

  // The block's visible positions: [lo, hi].
  const int last_row = min(n_rows, row0 + PF_BM) - 1;
  const int hi = pos0 + last_row / group;
  const int lo = window > 0 ? max(0, pos0 + row0 / group - window + 1) : 0;

  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};

  for (int j0 = lo / BN * BN; j0 <= hi; j0 += BN) {
    kv_load_tile<HD, BN, PF_THREADS>(k_s, k_pages, n_pages, k_type, page_tokens, k_row, k_off,
                                     0, j0, lo, hi + 1);
    cp_async_commit();
    kv_load_tile<DV, BN, PF_THREADS>(v_s, v_pages, n_pages, v_type, page_tokens, v_row, v_off,
                                     dv0 / 8, j0, lo, hi + 1);
    cp_async_commit();
    cp_async_wait<1>();  // K has landed; V may still be on its way
    __syncthreads();

    // S = Q K^T: ldmatrix .x4 gives one n-tile's B fragments for two k-steps (matrix mi holds
    // keys 8n.. of columns 16kk + 8mi ..).
    float s[NS][4];
#pragma unroll
    for (int n = 0; n < NS; n++) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < KS; kk += 2) {
        unsigned b[4];
        ldmatrix_x4(b, &k_s[8 * n + (lane & 7)][(16 * kk + 8 * (lane >> 3)) / 2]);
        mma_f16_16816(s[n], qa[kk], b, s[n]);
        mma_f16_16816(s[n], qa[kk + 1], b + 2, s[n]);
      }
    }

    // Scale, cap, mask; the online softmax per row (a row's values sit in the 4 lanes of a
    // quad); P rounded to f16 and kept as the A fragments of P V.
    float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int n = 0; n < NS; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int r = e >> 1;
        const int kp = j0 + 8 * n + 2 * t + (e & 1);
        float v = s[n][e] * scale;
        if (softcap > 0.0f) v = softcap * tanhf(v / softcap);
        const bool vis = valid[r] && kp <= qpos[r] && (window <= 0 || kp > qpos[r] - window);
        s[n][e] = vis ? v : neg_inf();
        mx[r] = fmaxf(mx[r], s[n][e]);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      // A row with nothing visible yet keeps max -inf: exponents from 0 give it zeros.
      base[r] = m_new == neg_inf() ? 0.0f : m_new;
      alpha[r] = __expf(m[r] - base[r]);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < NO; n++) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    unsigned pa[NS / 2][4];
#pragma unroll
    for (int n = 0; n < NS; n++) {
      const unsigned lo2 = pack_half2(__expf(s[n][0] - base[0]), __expf(s[n][1] - base[0]));
      const unsigned hi2 = pack_half2(__expf(s[n][2] - base[1]), __expf(s[n][3] - base[1]));
      // The sum of what P V will weight: the f16 values.
      l[0] += half_lo(lo2) + half_hi(lo2);
      l[1] += half_lo(hi2) + half_hi(hi2);
      pa[n / 2][2 * (n & 1)] = lo2;
      pa[n / 2][2 * (n & 1) + 1] = hi2;
    }

    cp_async_wait<0>();
    __syncthreads();
    // O += P V: ldmatrix .x4 .trans gives the B fragments of two n-tiles (columns 8n and
    // 8n + 8) for one k-step of 16 keys (matrix mi: keys 16kk + 8(mi & 1), columns + 8(mi >> 1)).
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
#pragma unroll
      for (int n = 0; n < NO; n += 2) {
        unsigned b[4];
        ldmatrix_x4_trans(
            b, &v_s[16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7)][(8 * n + 8 * (lane >> 4)) / 2]);
        mma_f16_16816(o[n], pa[kk], b, o[n]);
        mma_f16_16816(o[n + 1], pa[kk], b + 2, o[n + 1]);
      }
    }
    __syncthreads();  // the next tile overwrites k_s and v_s
  }

  // The quad's partial sums make the row's; rows past the batch write nothing.
#pragma unroll
  for (int r = 0; r < 2; r++) {
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; r++) {
    if (!valid[r]) continue;
    const int row = row0 + warp * 16 + g + 8 * r;
    const int tok = row / group;
    float* dst = out + ((size_t)tok * n_head + kvh * group + row % group) * HD + dv0;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
    for (int n = 0; n < NO; n++)
      *(float2*)&dst[8 * n + 2 * t] = make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
  }
}

#define PREFILL_KERNEL(HD, BN, DV)                                                              \
  extern "C" __global__ void __launch_bounds__(PF_THREADS) attn_prefill_hd##HD(                  \
      const float* __restrict__ q, const uint64_t* __restrict__ k_pages,                         \
      const uint64_t* __restrict__ v_pages, int n_pages, float* __restrict__ out, int n_tok,     \
      int pos0, int n_head, int n_head_kv, float scale, float softcap, int window,               \
      int page_tokens, int k_type, int v_type) {                                                 \
    __shared__ __align__(16) unsigned k_s[BN][HD / 2 + 4];                                       \
    __shared__ __align__(16) unsigned v_s[BN][DV / 2 + 4];                                       \
    attn_prefill<HD, BN, DV>(k_s, v_s, q, k_pages, v_pages, n_pages, out, n_tok, pos0, n_head,   \
                             n_head_kv, scale, softcap, window, page_tokens, k_type, v_type);    \
  }

// BN: a K and a V tile of BN rows fit the 48 KiB of static shared memory with room to spare.
// The launcher's grid has HD / DV blocks along z.
PREFILL_KERNEL(64, 64, 64)
SIM_EXPORT(attn_prefill_hd64)
PREFILL_KERNEL(128, 64, 128)
SIM_EXPORT(attn_prefill_hd128)
PREFILL_KERNEL(256, 32, 128)
SIM_EXPORT(attn_prefill_hd256)
