// Decode: y[t][r] = Σ_c W[r][c] · x[t][c] for 1 to 8 tokens per read of the weights.
//
// One warp per weight row, four rows per block: lane i takes the row's 32-weight sub-blocks
// i, i + 32, … (consecutive lanes read consecutive blocks, so a warp's loads cover a contiguous
// stretch of the row), keeps one partial sum per token and the warp adds them with shuffles at
// the end: no shared memory, no barrier. The token count is a template parameter (kernels
// `matvec_<type>_n1` … `_n8`), so the sums stay in registers and each count gets only the
// registers it needs. Every weight is read once per launch whatever the token count: decode is
// bound by that read, and the activations (a few KiB per token) come from L1/L2.
//
//  - Quantized types: activations in q8_1 blocks (quantize.cu), each sub-block decoded to int8
//    by quant.cuh and multiplied with __dp4a (see the formulation there).
//  - F32, F16, BF16: f32 activations, eight weights per lane per step with 16-byte loads where
//    the row allows it (`vec`), one at a time otherwise.
//  - `matvec_id_<type>`: mixture of experts (ggml's MUL_MAT_ID). The weights are n_expert
//    matrices `expert_stride` bytes apart; ids[t][slot] picks the matrix for each (token, slot)
//    on the device, so routing needs no copy to the host. Grid y is the (token, slot) pair; the
//    activation row is the token's (x_per_slot = 0: gate/up) or the pair's (x_per_slot = 1:
//    down); output [n_tok][n_slot][rows]. An id outside [0, n_expert) yields NaN rows, not a
//    read out of bounds.

#include "quant.cuh"

#define MV_WARPS 4
#define MV_THREADS (32 * MV_WARPS)
// Eight blocks per SM (half the warps of an sm_80 SM): a register cap of 64 that every kernel
// here fits, stated so that ptxas does not pick a lower target of its own and spill.
#define MV_MIN_BLOCKS 8

// One sub-block of weights against the matching q8_1 block of one token.
template <class T>
__device__ __forceinline__ float dot_q8_1(const qsub& q, const block_q8_1* __restrict__ a) {
  int qa[8];
#pragma unroll
  for (int i = 0; i < 8; i++) qa[i] = ld_i32((const uint8_t*)a->qs + 4 * i);
  const float da = f16(a->d);
  if (T::HALVES == 1) {
    int s = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) s = __dp4a(q.q[i], qa[i], s);
    float r = q.d[0] * da * (float)s;
    if (T::MIN) r += q.m[0] * f16(a->s);
    return r;
  } else {
    int s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      s0 = __dp4a(q.q[i], qa[i], s0);
      s1 = __dp4a(q.q[i + 4], qa[i + 4], s1);
    }
    float r = da * (q.d[0] * (float)s0 + q.d[1] * (float)s1);
    if (T::MIN) {
      // The offset changes every 16 weights: the activations' sums per half.
      int z0 = 0, z1 = 0;
#pragma unroll
      for (int i = 0; i < 4; i++) {
        z0 = __dp4a(0x01010101, qa[i], z0);
        z1 = __dp4a(0x01010101, qa[i + 4], z1);
      }
      r += da * (q.m[0] * (float)z0 + q.m[1] * (float)z1);
    }
    return r;
  }
}

// This lane's share of row `wr` (nsub sub-blocks) against NT tokens of q8_1 activations.
template <class T, int NT>
__device__ __forceinline__ void mv_q_lane(const uint8_t* __restrict__ wr,
                                          const block_q8_1* __restrict__ x, int nsub,
                                          float acc[NT]) {
#pragma unroll
  for (int t = 0; t < NT; t++) acc[t] = 0.0f;
  // Not unrolled: NVVM unrolls it by default and ptxas then spills a few registers.
#pragma unroll 1
  for (int s = threadIdx.x & 31; s < nsub; s += 32) {
    qsub q;
    load_sub<T>(wr, s, q);
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] += dot_q8_1<T>(q, x + (size_t)t * nsub + s);
  }
}

// The warp's sums, token t's written by lane t.
template <int NT>
__device__ __forceinline__ void mv_store(float acc[NT], float* __restrict__ y, size_t stride) {
#pragma unroll
  for (int t = 0; t < NT; t++) {
    const float v = warp_sum(acc[t]);
    if ((int)(threadIdx.x & 31) == t) y[t * stride] = v;
  }
}

template <class T, int NT>
__device__ __forceinline__ void mv_q(const uint8_t* __restrict__ w,
                                     const block_q8_1* __restrict__ x, float* __restrict__ y,
                                     int rows, int cols) {
  const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp: no collective is left half-joined
  const int nsub = cols >> 5;
  const size_t row_bytes = (size_t)(cols / T::QK) * sizeof(typename T::block);
  float acc[NT];
  mv_q_lane<T, NT>(w + (size_t)row * row_bytes, x, nsub, acc);
  mv_store<NT>(acc, y + row, (size_t)rows);
}

template <int TY>
__device__ __forceinline__ size_t wsize() {
  return TY == WF32 ? 4 : 2;
}

// Float weights: this lane's share of row `wr` against NT f32 token rows of `cols` values.
template <int TY, int NT>
__device__ __forceinline__ void mv_f_lane(const uint8_t* __restrict__ wr,
                                          const float* __restrict__ x, int cols, int vec,
                                          float acc[NT]) {
#pragma unroll
  for (int t = 0; t < NT; t++) acc[t] = 0.0f;
  const int lane = threadIdx.x & 31;
  if (vec) {
    // Not unrolled: under the 64-register cap NVVM's default unrolling makes ptxas 12.9 spill
    // (8 tokens) or crash (matvec_f32_n1). A step is already 16 bytes of weights per lane.
#pragma unroll 1
    for (int c = 8 * lane; c < cols; c += 256) {
      float w[8];
      wload8<TY>(wr + (size_t)c * wsize<TY>(), w);
#pragma unroll
      for (int t = 0; t < NT; t++) {
        const float4* xp = (const float4*)(x + (size_t)t * cols + c);
        const float4 a = xp[0], b = xp[1];
        acc[t] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y +
                  w[6] * b.z + w[7] * b.w;
      }
    }
  } else {
    for (int c = lane; c < cols; c += 32) {
      const float w = wload<TY>(wr, c);
#pragma unroll
      for (int t = 0; t < NT; t++) acc[t] += w * x[(size_t)t * cols + c];
    }
  }
}

template <int TY, int NT>
__device__ __forceinline__ void mv_f(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                     float* __restrict__ y, int rows, int cols, int vec) {
  const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;
  float acc[NT];
  mv_f_lane<TY, NT>(w + (size_t)row * cols * wsize<TY>(), x, cols, vec, acc);
  mv_store<NT>(acc, y + row, (size_t)rows);
}

// Which expert pair blockIdx.y uses, its activation row and its output row; false (and NaN
// written) for an id out of range.
__device__ __forceinline__ bool mv_expert(const int* __restrict__ ids, int n_expert, int n_slot,
                                          int x_per_slot, int rows, int row, float* __restrict__ y,
                                          int& e, size_t& xrow, float*& out) {
  const int p = blockIdx.y;
  e = ids[p];
  out = y + (size_t)p * rows + row;
  xrow = x_per_slot ? (size_t)p : (size_t)(p / n_slot);
  if (e < 0 || e >= n_expert) {
    if ((threadIdx.x & 31) == 0) *out = qnan();
    return false;
  }
  return true;
}

template <class T>
__device__ __forceinline__ void mv_q_id(const uint8_t* __restrict__ w, long long expert_stride,
                                        int n_expert, const int* __restrict__ ids, int n_slot,
                                        const block_q8_1* __restrict__ x, int x_per_slot,
                                        float* __restrict__ y, int rows, int cols) {
  const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;
  int e;
  size_t xrow;
  float* out;
  if (!mv_expert(ids, n_expert, n_slot, x_per_slot, rows, row, y, e, xrow, out)) return;
  const int nsub = cols >> 5;
  const size_t row_bytes = (size_t)(cols / T::QK) * sizeof(typename T::block);
  float acc[1];
  mv_q_lane<T, 1>(w + (size_t)e * expert_stride + (size_t)row * row_bytes, x + xrow * nsub, nsub,
                  acc);
  mv_store<1>(acc, out, 0);
}

template <int TY>
__device__ __forceinline__ void mv_f_id(const uint8_t* __restrict__ w, long long expert_stride,
                                        int n_expert, const int* __restrict__ ids, int n_slot,
                                        const float* __restrict__ x, int x_per_slot,
                                        float* __restrict__ y, int rows, int cols, int vec) {
  const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;
  int e;
  size_t xrow;
  float* out;
  if (!mv_expert(ids, n_expert, n_slot, x_per_slot, rows, row, y, e, xrow, out)) return;
  float acc[1];
  mv_f_lane<TY, 1>(w + (size_t)e * expert_stride + (size_t)row * cols * wsize<TY>(),
                   x + xrow * cols, cols, vec, acc);
  mv_store<1>(acc, out, 0);
}

// Every kernel of this file: 128 threads, MV_MIN_BLOCKS blocks per SM.
#define MV_KERNEL extern "C" __global__ void __launch_bounds__(MV_THREADS, MV_MIN_BLOCKS)

#define wty_f32 WF32
#define wty_f16 WF16
#define wty_bf16 WBF16

// matvec_<type>_n<NT>(w, x, y, rows, cols): x block_q8_1 [NT][cols/32] or f32 [NT][cols],
// y f32 [NT][rows]; grid ceil(rows / 4) blocks of 128 threads.
#define MV_Q(NAME, NT)                                                                            \
  MV_KERNEL                                                                                       \
      matvec_##NAME##_n##NT(const uint8_t* __restrict__ w, const block_q8_1* __restrict__ x,      \
                            float* __restrict__ y, int rows, int cols) {                          \
    mv_q<t##NAME, NT>(w, x, y, rows, cols);                                                       \
  }
#define MV_F(NAME, NT)                                                                            \
  MV_KERNEL                                                                                       \
      matvec_##NAME##_n##NT(const uint8_t* __restrict__ w, const float* __restrict__ x,           \
                            float* __restrict__ y, int rows, int cols, int vec) {                 \
    mv_f<wty_##NAME, NT>(w, x, y, rows, cols, vec);                                               \
  }
// matvec_id_<type>(w, expert_stride, n_expert, ids, n_slot, x, x_per_slot, y, rows, cols[, vec]):
// grid (ceil(rows / 4), n_tok · n_slot) blocks of 128 threads.
#define MV_Q_ID(NAME)                                                                             \
  MV_KERNEL matvec_id_##NAME(                                                                     \
      const uint8_t* __restrict__ w, long long expert_stride, int n_expert,                       \
      const int* __restrict__ ids, int n_slot, const block_q8_1* __restrict__ x,                  \
      int x_per_slot, float* __restrict__ y, int rows, int cols) {                                \
    mv_q_id<t##NAME>(w, expert_stride, n_expert, ids, n_slot, x, x_per_slot, y, rows, cols);      \
  }
#define MV_F_ID(NAME)                                                                             \
  MV_KERNEL matvec_id_##NAME(                                                                     \
      const uint8_t* __restrict__ w, long long expert_stride, int n_expert,                       \
      const int* __restrict__ ids, int n_slot, const float* __restrict__ x, int x_per_slot,       \
      float* __restrict__ y, int rows, int cols, int vec) {                                       \
    mv_f_id<wty_##NAME>(w, expert_stride, n_expert, ids, n_slot, x, x_per_slot, y, rows,          \
                        cols, vec);                                                               \
  }

// The kernels, one line each (the simulator's build reads the SIM_EXPORT lines).
MV_Q(q4_0, 1)
SIM_EXPORT(matvec_q4_0_n1)
MV_Q(q4_0, 2)
SIM_EXPORT(matvec_q4_0_n2)
MV_Q(q4_0, 3)
SIM_EXPORT(matvec_q4_0_n3)
MV_Q(q4_0, 4)
SIM_EXPORT(matvec_q4_0_n4)
MV_Q(q4_0, 5)
SIM_EXPORT(matvec_q4_0_n5)
MV_Q(q4_0, 6)
SIM_EXPORT(matvec_q4_0_n6)
MV_Q(q4_0, 7)
SIM_EXPORT(matvec_q4_0_n7)
MV_Q(q4_0, 8)
SIM_EXPORT(matvec_q4_0_n8)
MV_Q(q4_1, 1)
SIM_EXPORT(matvec_q4_1_n1)
MV_Q(q4_1, 2)
SIM_EXPORT(matvec_q4_1_n2)
MV_Q(q4_1, 3)
SIM_EXPORT(matvec_q4_1_n3)
MV_Q(q4_1, 4)
SIM_EXPORT(matvec_q4_1_n4)
MV_Q(q4_1, 5)
SIM_EXPORT(matvec_q4_1_n5)
MV_Q(q4_1, 6)
SIM_EXPORT(matvec_q4_1_n6)
MV_Q(q4_1, 7)
SIM_EXPORT(matvec_q4_1_n7)
MV_Q(q4_1, 8)
SIM_EXPORT(matvec_q4_1_n8)
MV_Q(q5_0, 1)
SIM_EXPORT(matvec_q5_0_n1)
MV_Q(q5_0, 2)
SIM_EXPORT(matvec_q5_0_n2)
MV_Q(q5_0, 3)
SIM_EXPORT(matvec_q5_0_n3)
MV_Q(q5_0, 4)
SIM_EXPORT(matvec_q5_0_n4)
MV_Q(q5_0, 5)
SIM_EXPORT(matvec_q5_0_n5)
MV_Q(q5_0, 6)
SIM_EXPORT(matvec_q5_0_n6)
MV_Q(q5_0, 7)
SIM_EXPORT(matvec_q5_0_n7)
MV_Q(q5_0, 8)
SIM_EXPORT(matvec_q5_0_n8)
MV_Q(q5_1, 1)
SIM_EXPORT(matvec_q5_1_n1)
MV_Q(q5_1, 2)
SIM_EXPORT(matvec_q5_1_n2)
MV_Q(q5_1, 3)
SIM_EXPORT(matvec_q5_1_n3)
MV_Q(q5_1, 4)
SIM_EXPORT(matvec_q5_1_n4)
MV_Q(q5_1, 5)
SIM_EXPORT(matvec_q5_1_n5)
MV_Q(q5_1, 6)
SIM_EXPORT(matvec_q5_1_n6)
MV_Q(q5_1, 7)
SIM_EXPORT(matvec_q5_1_n7)
MV_Q(q5_1, 8)
SIM_EXPORT(matvec_q5_1_n8)
MV_Q(q8_0, 1)
SIM_EXPORT(matvec_q8_0_n1)
MV_Q(q8_0, 2)
SIM_EXPORT(matvec_q8_0_n2)
MV_Q(q8_0, 3)
SIM_EXPORT(matvec_q8_0_n3)
MV_Q(q8_0, 4)
SIM_EXPORT(matvec_q8_0_n4)
MV_Q(q8_0, 5)
SIM_EXPORT(matvec_q8_0_n5)
MV_Q(q8_0, 6)
SIM_EXPORT(matvec_q8_0_n6)
MV_Q(q8_0, 7)
SIM_EXPORT(matvec_q8_0_n7)
MV_Q(q8_0, 8)
SIM_EXPORT(matvec_q8_0_n8)
MV_Q(q2_K, 1)
SIM_EXPORT(matvec_q2_K_n1)
MV_Q(q2_K, 2)
SIM_EXPORT(matvec_q2_K_n2)
MV_Q(q2_K, 3)
SIM_EXPORT(matvec_q2_K_n3)
MV_Q(q2_K, 4)
SIM_EXPORT(matvec_q2_K_n4)
MV_Q(q2_K, 5)
SIM_EXPORT(matvec_q2_K_n5)
MV_Q(q2_K, 6)
SIM_EXPORT(matvec_q2_K_n6)
MV_Q(q2_K, 7)
SIM_EXPORT(matvec_q2_K_n7)
MV_Q(q2_K, 8)
SIM_EXPORT(matvec_q2_K_n8)
MV_Q(q3_K, 1)
SIM_EXPORT(matvec_q3_K_n1)
MV_Q(q3_K, 2)
SIM_EXPORT(matvec_q3_K_n2)
MV_Q(q3_K, 3)
SIM_EXPORT(matvec_q3_K_n3)
MV_Q(q3_K, 4)
SIM_EXPORT(matvec_q3_K_n4)
MV_Q(q3_K, 5)
SIM_EXPORT(matvec_q3_K_n5)
MV_Q(q3_K, 6)
SIM_EXPORT(matvec_q3_K_n6)
MV_Q(q3_K, 7)
SIM_EXPORT(matvec_q3_K_n7)
MV_Q(q3_K, 8)
SIM_EXPORT(matvec_q3_K_n8)
MV_Q(q4_K, 1)
SIM_EXPORT(matvec_q4_K_n1)
MV_Q(q4_K, 2)
SIM_EXPORT(matvec_q4_K_n2)
MV_Q(q4_K, 3)
SIM_EXPORT(matvec_q4_K_n3)
MV_Q(q4_K, 4)
SIM_EXPORT(matvec_q4_K_n4)
MV_Q(q4_K, 5)
SIM_EXPORT(matvec_q4_K_n5)
MV_Q(q4_K, 6)
SIM_EXPORT(matvec_q4_K_n6)
MV_Q(q4_K, 7)
SIM_EXPORT(matvec_q4_K_n7)
MV_Q(q4_K, 8)
SIM_EXPORT(matvec_q4_K_n8)
MV_Q(q5_K, 1)
SIM_EXPORT(matvec_q5_K_n1)
MV_Q(q5_K, 2)
SIM_EXPORT(matvec_q5_K_n2)
MV_Q(q5_K, 3)
SIM_EXPORT(matvec_q5_K_n3)
MV_Q(q5_K, 4)
SIM_EXPORT(matvec_q5_K_n4)
MV_Q(q5_K, 5)
SIM_EXPORT(matvec_q5_K_n5)
MV_Q(q5_K, 6)
SIM_EXPORT(matvec_q5_K_n6)
MV_Q(q5_K, 7)
SIM_EXPORT(matvec_q5_K_n7)
MV_Q(q5_K, 8)
SIM_EXPORT(matvec_q5_K_n8)
MV_Q(q6_K, 1)
SIM_EXPORT(matvec_q6_K_n1)
MV_Q(q6_K, 2)
SIM_EXPORT(matvec_q6_K_n2)
MV_Q(q6_K, 3)
SIM_EXPORT(matvec_q6_K_n3)
MV_Q(q6_K, 4)
SIM_EXPORT(matvec_q6_K_n4)
MV_Q(q6_K, 5)
SIM_EXPORT(matvec_q6_K_n5)
MV_Q(q6_K, 6)
SIM_EXPORT(matvec_q6_K_n6)
MV_Q(q6_K, 7)
SIM_EXPORT(matvec_q6_K_n7)
MV_Q(q6_K, 8)
SIM_EXPORT(matvec_q6_K_n8)
MV_F(f32, 1)
SIM_EXPORT(matvec_f32_n1)
MV_F(f32, 2)
SIM_EXPORT(matvec_f32_n2)
MV_F(f32, 3)
SIM_EXPORT(matvec_f32_n3)
MV_F(f32, 4)
SIM_EXPORT(matvec_f32_n4)
MV_F(f32, 5)
SIM_EXPORT(matvec_f32_n5)
MV_F(f32, 6)
SIM_EXPORT(matvec_f32_n6)
MV_F(f32, 7)
SIM_EXPORT(matvec_f32_n7)
MV_F(f32, 8)
SIM_EXPORT(matvec_f32_n8)
MV_F(f16, 1)
SIM_EXPORT(matvec_f16_n1)
MV_F(f16, 2)
SIM_EXPORT(matvec_f16_n2)
MV_F(f16, 3)
SIM_EXPORT(matvec_f16_n3)
MV_F(f16, 4)
SIM_EXPORT(matvec_f16_n4)
MV_F(f16, 5)
SIM_EXPORT(matvec_f16_n5)
MV_F(f16, 6)
SIM_EXPORT(matvec_f16_n6)
MV_F(f16, 7)
SIM_EXPORT(matvec_f16_n7)
MV_F(f16, 8)
SIM_EXPORT(matvec_f16_n8)
MV_F(bf16, 1)
SIM_EXPORT(matvec_bf16_n1)
MV_F(bf16, 2)
SIM_EXPORT(matvec_bf16_n2)
MV_F(bf16, 3)
SIM_EXPORT(matvec_bf16_n3)
MV_F(bf16, 4)
SIM_EXPORT(matvec_bf16_n4)
MV_F(bf16, 5)
SIM_EXPORT(matvec_bf16_n5)
MV_F(bf16, 6)
SIM_EXPORT(matvec_bf16_n6)
MV_F(bf16, 7)
SIM_EXPORT(matvec_bf16_n7)
MV_F(bf16, 8)
SIM_EXPORT(matvec_bf16_n8)
MV_Q_ID(q4_0)
SIM_EXPORT(matvec_id_q4_0)
MV_Q_ID(q4_1)
SIM_EXPORT(matvec_id_q4_1)
MV_Q_ID(q5_0)
SIM_EXPORT(matvec_id_q5_0)
MV_Q_ID(q5_1)
SIM_EXPORT(matvec_id_q5_1)
MV_Q_ID(q8_0)
SIM_EXPORT(matvec_id_q8_0)
MV_Q_ID(q2_K)
SIM_EXPORT(matvec_id_q2_K)
MV_Q_ID(q3_K)
SIM_EXPORT(matvec_id_q3_K)
MV_Q_ID(q4_K)
SIM_EXPORT(matvec_id_q4_K)
MV_Q_ID(q5_K)
SIM_EXPORT(matvec_id_q5_K)
MV_Q_ID(q6_K)
SIM_EXPORT(matvec_id_q6_K)
MV_F_ID(f32)
SIM_EXPORT(matvec_id_f32)
MV_F_ID(f16)
SIM_EXPORT(matvec_id_f16)
MV_F_ID(bf16)
SIM_EXPORT(matvec_id_bf16)
