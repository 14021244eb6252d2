// Prefill: y[t][r] = Σ_c W[r][c] · x[t][c] for many tokens, on tensor cores.
//
// Every GEMM here computes a 64 (weight rows) × 64 (tokens) tile per block of 4 warps, each warp
// a 32 × 32 quarter. Grid x walks the token tiles and grid y the row tiles, so the blocks that
// run together share a weight tile and it is read from memory once, then from L2.
//
//  - Quantized weights (`gemm_<type>`): int8 tensor cores, mma.m16n8k32. Per step of 128
//    columns the block copies the activations' quants (prefill layout of quantize.cu) to shared
//    memory with cp.async while its threads decode the weight tile with quant.cuh into int8 rows;
//    ldmatrix then loads both operands' fragments. Each 32 columns' int32 products are scaled
//    into the f32 sums right away (d_w·d_a·Σ + m_w·s_a, the formulation of quant.cuh): the
//    scales change every 32 weights. Types with a scale per 16 (Q2_K, Q3_K, Q6_K) multiply
//    twice, with the other half of the A fragment zeroed, and scale each half on its own.
//  - F16 / BF16 weights (`gemm_f16`, `gemm_bf16`): mma.m16n8k16 with f32 sums; weights and the
//    (converted) activations both come by cp.async, double-buffered 32 columns at a time.
//  - F32 weights (`gemm_f32`): a plain shared-memory tiled kernel, 4 × 4 outputs per thread.
//  - `gemm_id_*`: mixture-of-experts prefill. `moe_group` (one block) sorts the (token, slot)
//    pairs by the expert ids[] chose, on the device, and cuts each expert's list into tiles of
//    64; each GEMM block takes one tile: the expert's matrix, and the activation rows of its
//    pairs gathered into the token tile. Grid x is an upper bound on the tile count (pairs/64 +
//    experts + 1); blocks past the real tiles find an empty tile and leave. Pairs whose id is out
//    of range get NaN rows.

#include "quant.cuh"

#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_THREADS 128
// Four blocks per SM: a cap of 128 registers (the quantized kernels' f32 and int32 tiles need
// about that much) and 4 × 27 KiB of shared memory; stated so that ptxas does not pick a lower
// register target of its own and spill.
#define GEMM_MIN_BLOCKS 4
#define GEMM_KERNEL extern "C" __global__ void __launch_bounds__(GEMM_THREADS, GEMM_MIN_BLOCKS)

// The block's token columns: col[c] the activation row of column c, out[c] its output row (-1:
// none). Returns the expert (0 without ids), or -1 when the block has nothing to compute.
template <bool ID>
__device__ __forceinline__ int gemm_tile(int n, const int* __restrict__ pairs,
                                         const int4* __restrict__ tiles, int n_slot,
                                         int x_per_slot, int* col, int* out,
                                         float* __restrict__ y, int rows, int r0) {
  const int c = threadIdx.x;
  if (!ID) {
    const int t = blockIdx.x * GEMM_BN + c;
    if (c < GEMM_BN) col[c] = out[c] = t < n ? t : -1;
    return 0;
  }
  const int4 tl = tiles[blockIdx.x];  // {expert, first pair, pairs, 0}
  if (tl.z == 0) return -1;
  if (tl.x < 0) {  // pairs whose id was out of range
    for (int i = c; i < tl.z * GEMM_BM; i += blockDim.x) {
      const int r = r0 + i % GEMM_BM;
      if (r < rows) y[(size_t)pairs[tl.y + i / GEMM_BM] * rows + r] = qnan();
    }
    return -1;
  }
  if (c < GEMM_BN) {
    const int p = c < tl.z ? pairs[tl.y + c] : -1;
    out[c] = p;
    col[c] = p < 0 ? -1 : (x_per_slot ? p : p / n_slot);
  }
  return tl.x;
}

// ---------------------------------------------------------------------------------------------
// Quantized weights × q8_1 activations, int8 tensor cores.

#define GQ_SUBS 4  // 32-column sub-blocks per step
// Bytes per shared row: 128 quants + 16, so rows stay 16-byte aligned for ldmatrix and the 8
// rows one ldmatrix phase reads start 4 banks apart (no conflicts).
#define GQ_LDS 144

struct GqSmem {
  int8_t* a;     // [GEMM_BM][GQ_LDS] weights
  int8_t* b;     // [GEMM_BN][GQ_LDS] activations
  float* ad;     // [GQ_SUBS][2][GEMM_BM] weight scale per sub-block half
  float* am;     // [GQ_SUBS][2][GEMM_BM] weight offset
  float4* bds;   // [GQ_SUBS][GEMM_BN] activation {d, s, s_lo, s_hi}
  int* col;
  int* out;
};

template <class T, bool ID>
__device__ __forceinline__ void gemm_q(const uint8_t* __restrict__ w, long long expert_stride,
                                       const int8_t* __restrict__ xq,
                                       const float4* __restrict__ xds,
                                       const int* __restrict__ pairs,
                                       const int4* __restrict__ tiles, int n_slot, int x_per_slot,
                                       float* __restrict__ y, int rows, int cols, int n,
                                       GqSmem sm) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3, wm = warp >> 1, wn = warp & 1;
  const int r0 = blockIdx.y * GEMM_BM;
  const int e = gemm_tile<ID>(n, pairs, tiles, n_slot, x_per_slot, sm.col, sm.out, y, rows, r0);
  if (e < 0) return;  // the whole block, before any barrier
  w += (size_t)e * expert_stride;
  const int nsub = cols >> 5;
  const size_t row_bytes = (size_t)(cols / T::QK) * sizeof(typename T::block);
  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; mi++)
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
      for (int k = 0; k < 4; k++) acc[mi][ni][k] = 0.0f;

  for (int k0 = 0; k0 < nsub; k0 += GQ_SUBS) {
    __syncthreads();  // the previous step's fragments are loaded; col/out are written
    // Activations: 2 × 16 bytes of quants and one float4 per (token, sub-block), zeros past
    // the last token or column.
    for (int i = tid; i < GEMM_BN * GQ_SUBS * 2; i += GEMM_THREADS) {
      const int c = i >> 3, s = (i >> 1) & 3, h = i & 1, r = sm.col[c];
      const bool ok = r >= 0 && k0 + s < nsub;
      const int8_t* src = ok ? xq + (size_t)r * cols + (size_t)(k0 + s) * 32 + 16 * h : xq;
      cp_async_16(sm.b + c * GQ_LDS + 32 * s + 16 * h, src, ok ? 16 : 0);
    }
    for (int i = tid; i < GEMM_BN * GQ_SUBS; i += GEMM_THREADS) {
      const int c = i >> 2, s = i & 3, r = sm.col[c];
      const bool ok = r >= 0 && k0 + s < nsub;
      cp_async_16(sm.bds + s * GEMM_BN + c, ok ? xds + (size_t)r * nsub + k0 + s : xds,
                  ok ? 16 : 0);
    }
    cp_async_commit();
    // Weights, decoded while the copies fly: one (row, sub-block) per thread and pass.
    for (int i = tid; i < GEMM_BM * GQ_SUBS; i += GEMM_THREADS) {
      const int r = i >> 2, s = i & 3;
      qsub q;
      if (r0 + r < rows && k0 + s < nsub) {
        load_sub<T>(w + (size_t)(r0 + r) * row_bytes, k0 + s, q);
      } else {
#pragma unroll
        for (int k = 0; k < 8; k++) q.q[k] = 0;
        q.d[0] = q.d[1] = q.m[0] = q.m[1] = 0.0f;
      }
      int4* dst = (int4*)(sm.a + r * GQ_LDS + 32 * s);
      dst[0] = make_int4(q.q[0], q.q[1], q.q[2], q.q[3]);
      dst[1] = make_int4(q.q[4], q.q[5], q.q[6], q.q[7]);
#pragma unroll
      for (int h = 0; h < T::HALVES; h++) {
        sm.ad[(2 * s + h) * GEMM_BM + r] = q.d[h];
        if (T::MIN) sm.am[(2 * s + h) * GEMM_BM + r] = q.m[h];
      }
    }
    cp_async_wait_all();
    __syncthreads();

    for (int s = 0; s < GQ_SUBS; s++) {
      if (k0 + s >= nsub) break;  // the same for every thread
      unsigned af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; mi++)
        ldmatrix_x4(af[mi], sm.a + (wm * 32 + mi * 16 + (lane & 15)) * GQ_LDS + 32 * s +
                                (lane >> 4) * 16);
#pragma unroll
      for (int nj = 0; nj < 2; nj++) {
        unsigned r4[4];
        ldmatrix_x4(r4, sm.b + (wn * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * GQ_LDS +
                            32 * s + ((lane >> 3) & 1) * 16);
        bf[2 * nj][0] = r4[0];
        bf[2 * nj][1] = r4[1];
        bf[2 * nj + 1][0] = r4[2];
        bf[2 * nj + 1][1] = r4[3];
      }
#pragma unroll
      for (int h = 0; h < T::HALVES; h++) {
        // This half's weight scales of the thread's 4 rows and A fragments (the other half's
        // 16 columns zeroed where the scale changes at 16).
        float rd[2][2], rm[2][2];
        unsigned a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; mi++) {
#pragma unroll
          for (int hh = 0; hh < 2; hh++) {
            const int r = wm * 32 + mi * 16 + g + 8 * hh;
            rd[mi][hh] = sm.ad[(2 * s + h) * GEMM_BM + r];
            rm[mi][hh] = T::MIN ? sm.am[(2 * s + h) * GEMM_BM + r] : 0.0f;
          }
#pragma unroll
          for (int k = 0; k < 4; k++)
            a[mi][k] = T::HALVES == 2 && (k >> 1) != h ? 0u : af[mi][k];
        }
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
          float cd[2], cs[2];
#pragma unroll
          for (int j = 0; j < 2; j++) {
            const float4 v = sm.bds[s * GEMM_BN + wn * 32 + ni * 8 + 2 * t4 + j];
            cd[j] = v.x;
            cs[j] = T::HALVES == 1 ? v.y : (h == 0 ? v.z : v.w);
          }
#pragma unroll
          for (int mi = 0; mi < 2; mi++) {
            const int zero[4] = {0, 0, 0, 0};
            int c[4];
            mma_s8_16832(c, a[mi], bf[ni], zero);
#pragma unroll
            for (int k = 0; k < 4; k++) {
              float v = rd[mi][k >> 1] * cd[k & 1] * (float)c[k];
              if (T::MIN) v += rm[mi][k >> 1] * cs[k & 1];
              acc[mi][ni][k] += v;
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int mi = 0; mi < 2; mi++)
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
      for (int k = 0; k < 4; k++) {
        const int r = r0 + wm * 32 + mi * 16 + g + 8 * (k >> 1);
        const int o = sm.out[wn * 32 + ni * 8 + 2 * t4 + (k & 1)];
        if (r < rows && o >= 0) y[(size_t)o * rows + r] = acc[mi][ni][k];
      }
}

#define GQ_SMEM                                                                                   \
  __shared__ __align__(16) int8_t s_a[GEMM_BM * GQ_LDS];                                          \
  __shared__ __align__(16) int8_t s_b[GEMM_BN * GQ_LDS];                                          \
  __shared__ float s_ad[GQ_SUBS * 2 * GEMM_BM];                                                   \
  __shared__ float s_am[GQ_SUBS * 2 * GEMM_BM];                                                   \
  __shared__ __align__(16) float4 s_bds[GQ_SUBS * GEMM_BN];                                       \
  __shared__ int s_col[GEMM_BN];                                                                  \
  __shared__ int s_out[GEMM_BN];                                                                  \
  const GqSmem sm = {s_a, s_b, s_ad, s_am, s_bds, s_col, s_out};

// gemm_<type>(w, xq, xds, y, rows, cols, n): xq int8 [n][cols] and xds float4 [n][cols/32]
// (quantize_q8_1_mmq), y f32 [n][rows]; grid (ceil(n / 64), ceil(rows / 64)), 128 threads.
#define GEMM_Q(NAME)                                                                              \
  GEMM_KERNEL                                                                                     \
      gemm_##NAME(const uint8_t* __restrict__ w, const int8_t* __restrict__ xq,                   \
                  const float4* __restrict__ xds, float* __restrict__ y, int rows, int cols,      \
                  int n) {                                                                        \
    GQ_SMEM                                                                                       \
    gemm_q<t##NAME, false>(w, 0, xq, xds, nullptr, nullptr, 1, 0, y, rows, cols, n, sm);          \
  }
// gemm_id_<type>(w, expert_stride, xq, xds, pairs, tiles, n_slot, x_per_slot, y, rows, cols):
// pairs and tiles from moe_group; y f32 [n_tok][n_slot][rows]; grid (max tiles, ceil(rows / 64)).
#define GEMM_Q_ID(NAME)                                                                           \
  GEMM_KERNEL gemm_id_##NAME(                                                                     \
      const uint8_t* __restrict__ w, long long expert_stride, const int8_t* __restrict__ xq,      \
      const float4* __restrict__ xds, const int* __restrict__ pairs,                              \
      const int4* __restrict__ tiles, int n_slot, int x_per_slot, float* __restrict__ y,          \
      int rows, int cols) {                                                                       \
    GQ_SMEM                                                                                       \
    gemm_q<t##NAME, true>(w, expert_stride, xq, xds, pairs, tiles, n_slot, x_per_slot, y,         \
                          rows, cols, 0, sm);                                                     \
  }

// ---------------------------------------------------------------------------------------------
// F16 / BF16 weights × activations of the same type, f16/bf16 tensor cores.

#define GH_KT 32   // columns per step
#define GH_LDS 40  // halves per shared row: 16-byte aligned rows, ldmatrix phases conflict-free

// Queues the copies of step k0 into buffer `a`/`b` (zeros past the ends; cols % 8 == 0).
__device__ __forceinline__ void gh_load(uint16_t* a, uint16_t* b, const uint16_t* __restrict__ w,
                                        const uint16_t* __restrict__ x, const int* col, int r0,
                                        int rows, int cols, int k0) {
  for (int i = threadIdx.x; i < GEMM_BM * 4; i += GEMM_THREADS) {
    const int r = i >> 2, k = k0 + 8 * (i & 3);
    const bool ok = r0 + r < rows && k < cols;
    cp_async_16(a + r * GH_LDS + 8 * (i & 3), ok ? w + (size_t)(r0 + r) * cols + k : w,
                ok ? 16 : 0);
  }
  for (int i = threadIdx.x; i < GEMM_BN * 4; i += GEMM_THREADS) {
    const int c = i >> 2, k = k0 + 8 * (i & 3), xr = col[c];
    const bool ok = xr >= 0 && k < cols;
    cp_async_16(b + c * GH_LDS + 8 * (i & 3), ok ? x + (size_t)xr * cols + k : x, ok ? 16 : 0);
  }
  cp_async_commit();
}

template <bool BF, bool ID>
__device__ __forceinline__ void gemm_h(const uint16_t* __restrict__ w, long long expert_stride,
                                       const uint16_t* __restrict__ x,
                                       const int* __restrict__ pairs,
                                       const int4* __restrict__ tiles, int n_slot, int x_per_slot,
                                       float* __restrict__ y, int rows, int cols, int n,
                                       uint16_t* s_a, uint16_t* s_b, int* col, int* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t4 = lane & 3, wm = warp >> 1, wn = warp & 1;
  const int r0 = blockIdx.y * GEMM_BM;
  const int e = gemm_tile<ID>(n, pairs, tiles, n_slot, x_per_slot, col, out, y, rows, r0);
  if (e < 0) return;
  w = (const uint16_t*)((const uint8_t*)w + (size_t)e * expert_stride);
  __syncthreads();  // col[] before the first copies
  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; mi++)
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
      for (int k = 0; k < 4; k++) acc[mi][ni][k] = 0.0f;

  const int steps = (cols + GH_KT - 1) / GH_KT;
  gh_load(s_a, s_b, w, x, col, r0, rows, cols, 0);
  for (int st = 0; st < steps; st++) {
    const int buf = st & 1;
    if (st + 1 < steps) {
      gh_load(s_a + (buf ^ 1) * GEMM_BM * GH_LDS, s_b + (buf ^ 1) * GEMM_BN * GH_LDS, w, x, col,
              r0, rows, cols, (st + 1) * GH_KT);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* a = s_a + buf * GEMM_BM * GH_LDS;
    const uint16_t* b = s_b + buf * GEMM_BN * GH_LDS;
#pragma unroll
    for (int ks = 0; ks < GH_KT / 16; ks++) {
      unsigned af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; mi++)
        ldmatrix_x4(af[mi],
                    a + (wm * 32 + mi * 16 + (lane & 15)) * GH_LDS + 16 * ks + (lane >> 4) * 8);
#pragma unroll
      for (int nj = 0; nj < 2; nj++) {
        unsigned r4[4];
        ldmatrix_x4(r4, b + (wn * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * GH_LDS +
                            16 * ks + ((lane >> 3) & 1) * 8);
        bf[2 * nj][0] = r4[0];
        bf[2 * nj][1] = r4[1];
        bf[2 * nj + 1][0] = r4[2];
        bf[2 * nj + 1][1] = r4[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
          if (BF)
            mma_bf16_16816(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
          else
            mma_f16_16816(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
        }
    }
    __syncthreads();  // this buffer is refilled by the next step's copies
  }

#pragma unroll
  for (int mi = 0; mi < 2; mi++)
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
      for (int k = 0; k < 4; k++) {
        const int r = r0 + wm * 32 + mi * 16 + g + 8 * (k >> 1);
        const int o = out[wn * 32 + ni * 8 + 2 * t4 + (k & 1)];
        if (r < rows && o >= 0) y[(size_t)o * rows + r] = acc[mi][ni][k];
      }
}

#define GH_SMEM                                                                                   \
  __shared__ __align__(16) uint16_t s_a[2 * GEMM_BM * GH_LDS];                                    \
  __shared__ __align__(16) uint16_t s_b[2 * GEMM_BN * GH_LDS];                                    \
  __shared__ int s_col[GEMM_BN];                                                                  \
  __shared__ int s_out[GEMM_BN];

// gemm_f16 / gemm_bf16(w, x, y, rows, cols, n): w [rows][cols] and x [n][cols] of the type
// (cols % 8 == 0, both 16-byte aligned), y f32 [n][rows]; grid as gemm_<type>.
GEMM_KERNEL
    gemm_f16(const uint16_t* __restrict__ w, const uint16_t* __restrict__ x,
             float* __restrict__ y, int rows, int cols, int n) {
  GH_SMEM
  gemm_h<false, false>(w, 0, x, nullptr, nullptr, 1, 0, y, rows, cols, n, s_a, s_b, s_col, s_out);
}
SIM_EXPORT(gemm_f16)

GEMM_KERNEL
    gemm_bf16(const uint16_t* __restrict__ w, const uint16_t* __restrict__ x,
              float* __restrict__ y, int rows, int cols, int n) {
  GH_SMEM
  gemm_h<true, false>(w, 0, x, nullptr, nullptr, 1, 0, y, rows, cols, n, s_a, s_b, s_col, s_out);
}
SIM_EXPORT(gemm_bf16)

// gemm_id_f16 / gemm_id_bf16(w, expert_stride, x, pairs, tiles, n_slot, x_per_slot, y, rows,
// cols): as gemm_id_<type>, with x [rows of activations][cols] of the weights' type.
GEMM_KERNEL
    gemm_id_f16(const uint16_t* __restrict__ w, long long expert_stride,
                const uint16_t* __restrict__ x, const int* __restrict__ pairs,
                const int4* __restrict__ tiles, int n_slot, int x_per_slot, float* __restrict__ y,
                int rows, int cols) {
  GH_SMEM
  gemm_h<false, true>(w, expert_stride, x, pairs, tiles, n_slot, x_per_slot, y, rows, cols, 0,
                      s_a, s_b, s_col, s_out);
}
SIM_EXPORT(gemm_id_f16)

GEMM_KERNEL
    gemm_id_bf16(const uint16_t* __restrict__ w, long long expert_stride,
                 const uint16_t* __restrict__ x, const int* __restrict__ pairs,
                 const int4* __restrict__ tiles, int n_slot, int x_per_slot,
                 float* __restrict__ y, int rows, int cols) {
  GH_SMEM
  gemm_h<true, true>(w, expert_stride, x, pairs, tiles, n_slot, x_per_slot, y, rows, cols, 0,
                     s_a, s_b, s_col, s_out);
}
SIM_EXPORT(gemm_id_bf16)

// ---------------------------------------------------------------------------------------------
// F32 weights × f32 activations: shared-memory tiles and FMAs.

#define GF_KT 16
#define GF_THREADS 256
#define GF_LD (GEMM_BM + 4)

template <bool ID>
__device__ __forceinline__ void gemm_f(const float* __restrict__ w, long long expert_stride,
                                       const float* __restrict__ x,
                                       const int* __restrict__ pairs,
                                       const int4* __restrict__ tiles, int n_slot, int x_per_slot,
                                       float* __restrict__ y, int rows, int cols, int n,
                                       float* s_a, float* s_b, int* col, int* out) {
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int r0 = blockIdx.y * GEMM_BM;
  const int e = gemm_tile<ID>(n, pairs, tiles, n_slot, x_per_slot, col, out, y, rows, r0);
  if (e < 0) return;
  w = (const float*)((const uint8_t*)w + (size_t)e * expert_stride);
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
  for (int k0 = 0; k0 < cols; k0 += GF_KT) {
    __syncthreads();
    // Sixteen consecutive threads read sixteen consecutive columns of one row.
#pragma unroll
    for (int l = 0; l < 4; l++) {
      const int i = tid + GF_THREADS * l, r = i >> 4, k = k0 + (i & 15);
      s_a[(i & 15) * GF_LD + r] = r0 + r < rows && k < cols ? w[(size_t)(r0 + r) * cols + k] : 0.0f;
      const int xr = col[r];
      s_b[(i & 15) * GF_LD + r] = xr >= 0 && k < cols ? x[(size_t)xr * cols + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < GF_KT; k++) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; i++) av[i] = s_a[k * GF_LD + tx + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) bv[j] = s_b[k * GF_LD + ty + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
    }
  }
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int r = r0 + tx + 16 * i, o = out[ty + 16 * j];
      if (r < rows && o >= 0) y[(size_t)o * rows + r] = acc[i][j];
    }
}

#define GF_SMEM                                                                                   \
  __shared__ float s_a[GF_KT * GF_LD];                                                            \
  __shared__ float s_b[GF_KT * GF_LD];                                                            \
  __shared__ int s_col[GEMM_BN];                                                                  \
  __shared__ int s_out[GEMM_BN];

// gemm_f32(w, x, y, rows, cols, n): w [rows][cols], x [n][cols], y [n][rows], f32; grid as
// gemm_<type>, 256 threads.
extern "C" __global__ void __launch_bounds__(GF_THREADS)
    gemm_f32(const float* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
             int rows, int cols, int n) {
  GF_SMEM
  gemm_f<false>(w, 0, x, nullptr, nullptr, 1, 0, y, rows, cols, n, s_a, s_b, s_col, s_out);
}
SIM_EXPORT(gemm_f32)

extern "C" __global__ void __launch_bounds__(GF_THREADS)
    gemm_id_f32(const float* __restrict__ w, long long expert_stride, const float* __restrict__ x,
                const int* __restrict__ pairs, const int4* __restrict__ tiles, int n_slot,
                int x_per_slot, float* __restrict__ y, int rows, int cols) {
  GF_SMEM
  gemm_f<true>(w, expert_stride, x, pairs, tiles, n_slot, x_per_slot, y, rows, cols, 0, s_a, s_b,
               s_col, s_out);
}
SIM_EXPORT(gemm_id_f32)

// ---------------------------------------------------------------------------------------------
// MoE routing for the grouped GEMMs.

#define MG_THREADS 256
#define MG_MAX_BUCKETS 1024  // experts + 1 (the bucket of ids out of range)
#define MG_CHUNK 1024

// moe_group(ids, n_pairs, n_expert, pairs, tiles, max_tiles): ids int [n_pairs] (pair p = token ·
// n_slot + slot). Writes pairs int [n_pairs], the pair indices ordered by expert and, within an
// expert, by index (a stable order: the same tiles on every run), and tiles int4 [max_tiles]:
// {expert (-1: ids out of range), first entry of pairs, count ≤ 64, 0}, the unused ones with
// count 0. One block: thread e counts and places expert e's pairs, scanning the ids a chunk at
// a time from shared memory (every thread reads the same word: a broadcast); thread 0 lays out
// the offsets and tiles. n_expert < 1024, max_tiles ≥ ceil(n_pairs / 64) + n_expert + 1.
extern "C" __global__ void __launch_bounds__(MG_THREADS)
    moe_group(const int* __restrict__ ids, int n_pairs, int n_expert, int* __restrict__ pairs,
              int4* __restrict__ tiles, int max_tiles) {
  __shared__ int cnt[MG_MAX_BUCKETS];
  __shared__ int off[MG_MAX_BUCKETS];
  __shared__ int chunk[MG_CHUNK];
  __shared__ int n_tiles[1];
  const int tid = threadIdx.x, nb = n_expert + 1;
  for (int b = tid; b < nb; b += MG_THREADS) cnt[b] = 0;
  for (int base = 0; base < n_pairs; base += MG_CHUNK) {
    const int m = min(MG_CHUNK, n_pairs - base);
    __syncthreads();
    for (int j = tid; j < m; j += MG_THREADS) {
      const int v = ids[base + j];
      chunk[j] = v >= 0 && v < n_expert ? v : n_expert;
    }
    __syncthreads();
    for (int b = tid; b < nb; b += MG_THREADS) {
      int c = 0;
      for (int j = 0; j < m; j++) c += chunk[j] == b;
      cnt[b] += c;
    }
  }
  __syncthreads();
  if (tid == 0) {
    int o = 0, nt = 0;
    for (int b = 0; b < nb; b++) {
      off[b] = o;
      for (int s = 0; s < cnt[b] && nt < max_tiles; s += GEMM_BN)
        tiles[nt++] = make_int4(b < n_expert ? b : -1, o + s, min(GEMM_BN, cnt[b] - s), 0);
      o += cnt[b];
    }
    n_tiles[0] = nt;
  }
  __syncthreads();
  for (int i = n_tiles[0] + tid; i < max_tiles; i += MG_THREADS) tiles[i] = make_int4(0, 0, 0, 0);
  for (int base = 0; base < n_pairs; base += MG_CHUNK) {
    const int m = min(MG_CHUNK, n_pairs - base);
    __syncthreads();
    for (int j = tid; j < m; j += MG_THREADS) {
      const int v = ids[base + j];
      chunk[j] = v >= 0 && v < n_expert ? v : n_expert;
    }
    __syncthreads();
    for (int b = tid; b < nb; b += MG_THREADS) {
      int o = off[b];
      for (int j = 0; j < m; j++)
        if (chunk[j] == b) pairs[o++] = base + j;
      off[b] = o;
    }
  }
}
SIM_EXPORT(moe_group)

// The quantized kernels, one line each (the simulator's build reads the SIM_EXPORT lines).
GEMM_Q(q4_0)
SIM_EXPORT(gemm_q4_0)
GEMM_Q_ID(q4_0)
SIM_EXPORT(gemm_id_q4_0)
GEMM_Q(q4_1)
SIM_EXPORT(gemm_q4_1)
GEMM_Q_ID(q4_1)
SIM_EXPORT(gemm_id_q4_1)
GEMM_Q(q5_0)
SIM_EXPORT(gemm_q5_0)
GEMM_Q_ID(q5_0)
SIM_EXPORT(gemm_id_q5_0)
GEMM_Q(q5_1)
SIM_EXPORT(gemm_q5_1)
GEMM_Q_ID(q5_1)
SIM_EXPORT(gemm_id_q5_1)
GEMM_Q(q8_0)
SIM_EXPORT(gemm_q8_0)
GEMM_Q_ID(q8_0)
SIM_EXPORT(gemm_id_q8_0)
GEMM_Q(q2_K)
SIM_EXPORT(gemm_q2_K)
GEMM_Q_ID(q2_K)
SIM_EXPORT(gemm_id_q2_K)
GEMM_Q(q3_K)
SIM_EXPORT(gemm_q3_K)
GEMM_Q_ID(q3_K)
SIM_EXPORT(gemm_id_q3_K)
GEMM_Q(q4_K)
SIM_EXPORT(gemm_q4_K)
GEMM_Q_ID(q4_K)
SIM_EXPORT(gemm_id_q4_K)
GEMM_Q(q5_K)
SIM_EXPORT(gemm_q5_K)
GEMM_Q_ID(q5_K)
SIM_EXPORT(gemm_id_q5_K)
GEMM_Q(q6_K)
SIM_EXPORT(gemm_q6_K)
GEMM_Q_ID(q6_K)
SIM_EXPORT(gemm_id_q6_K)
