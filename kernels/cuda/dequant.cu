// Weights back to floats.
//  - `dequant_f16_<type>`: rows of any weight type → f16 rows, for the cuBLAS comparison path
//    (ops::matmul::matmul_cublas); `dequant_f16_f32` also turns f32 activations into f16.
//  - `get_rows_<type>`: the embedding lookup (ggml's GET_ROWS): the rows ids[] names, as f32,
//    times `scale` (Gemma multiplies its embeddings by √n_embd; 1 elsewhere). An id outside the
//    table gives a NaN row, not a read out of bounds.
//  - `convert_f32_bf16`: f32 activations → bf16 for the BF16 tensor-core GEMM.
// A thread per 32-weight sub-block of quantized rows (decoded by quant.cuh: the values equal
// the CPU's dequantization exactly, see there), a thread per value of float rows.

#include "quant.cuh"

#define DQ_THREADS 256

// `subs` = rows · cols / 32; y f16 [rows][cols].
template <class T>
__device__ __forceinline__ void dq_f16_q(const uint8_t* __restrict__ w, uint16_t* __restrict__ y,
                                         int cols, long long subs) {
  const long long i = (long long)blockIdx.x * DQ_THREADS + threadIdx.x;
  if (i >= subs) return;
  const int nsub = cols >> 5;
  const long long r = i / nsub;
  const int s = (int)(i - r * nsub);
  qsub q;
  load_sub<T>(w + (size_t)r * (size_t)(cols / T::QK) * sizeof(typename T::block), s, q);
  uint4* out = (uint4*)(y + (size_t)i * 32);
#pragma unroll
  for (int k = 0; k < 4; k++) {
    unsigned u[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int l = 8 * k + 2 * j, h = l >> 4;
      const float a = q.d[h] * (float)(signed char)(q.q[l >> 2] >> (8 * (l & 3))) + q.m[h];
      const float b =
          q.d[h] * (float)(signed char)(q.q[(l + 1) >> 2] >> (8 * ((l + 1) & 3))) + q.m[h];
      u[j] = (unsigned)f16_bits(a) | ((unsigned)f16_bits(b) << 16);
    }
    out[k] = make_uint4(u[0], u[1], u[2], u[3]);
  }
}

// `subs` = n_ids · cols / 32; y f32 [n_ids][cols].
template <class T>
__device__ __forceinline__ void get_rows_q(const uint8_t* __restrict__ w,
                                           const int* __restrict__ ids, float* __restrict__ y,
                                           int n_rows, int cols, long long subs, float scale) {
  const long long i = (long long)blockIdx.x * DQ_THREADS + threadIdx.x;
  if (i >= subs) return;
  const int nsub = cols >> 5;
  const long long k = i / nsub;
  const int s = (int)(i - k * nsub);
  const int id = ids[k];
  float4* out = (float4*)(y + (size_t)i * 32);
  if (id < 0 || id >= n_rows) {
    const float nan = qnan();
#pragma unroll
    for (int j = 0; j < 8; j++) out[j] = make_float4(nan, nan, nan, nan);
    return;
  }
  qsub q;
  load_sub<T>(w + (size_t)id * (size_t)(cols / T::QK) * sizeof(typename T::block), s, q);
#pragma unroll
  for (int j = 0; j < 8; j++) {
    float v[4];
#pragma unroll
    for (int b = 0; b < 4; b++) {
      const int h = (4 * j + b) >> 4;
      v[b] = (q.d[h] * (float)(signed char)(q.q[j] >> (8 * b)) + q.m[h]) * scale;
    }
    out[j] = make_float4(v[0], v[1], v[2], v[3]);
  }
}

template <int TY>
__device__ __forceinline__ void dq_f16_f(const void* __restrict__ w, uint16_t* __restrict__ y,
                                         long long n) {
  const long long i = (long long)blockIdx.x * DQ_THREADS + threadIdx.x;
  if (i < n) y[i] = f16_bits(wload<TY>(w, (size_t)i));
}

template <int TY>
__device__ __forceinline__ void get_rows_f(const uint8_t* __restrict__ w,
                                           const int* __restrict__ ids, float* __restrict__ y,
                                           int n_rows, int cols, long long n, float scale) {
  const long long i = (long long)blockIdx.x * DQ_THREADS + threadIdx.x;
  if (i >= n) return;
  const long long k = i / cols;
  const int c = (int)(i - k * cols);
  const int id = ids[k];
  y[i] = id < 0 || id >= n_rows
             ? qnan()
             : wload<TY>(w + (size_t)id * cols * (TY == WF32 ? 4 : 2), (size_t)c) * scale;
}

#define wty_f32 WF32
#define wty_f16 WF16
#define wty_bf16 WBF16

// dequant_f16_<type>(w, y, cols, subs) and get_rows_<type>(w, ids, y, n_rows, cols, subs,
// scale) for quantized types (a thread per sub-block); for float types the last count is of
// values (a thread per value). Blocks of 256 threads.
#define DQ_Q(NAME)                                                                                \
  extern "C" __global__ void __launch_bounds__(DQ_THREADS)                                        \
      dequant_f16_##NAME(const uint8_t* __restrict__ w, uint16_t* __restrict__ y, int cols,       \
                         long long subs) {                                                        \
    dq_f16_q<t##NAME>(w, y, cols, subs);                                                          \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(DQ_THREADS)                                        \
      get_rows_##NAME(const uint8_t* __restrict__ w, const int* __restrict__ ids,                 \
                      float* __restrict__ y, int n_rows, int cols, long long subs,                \
                      float scale) {                                                              \
    get_rows_q<t##NAME>(w, ids, y, n_rows, cols, subs, scale);                                    \
  }
#define DQ_F(NAME)                                                                                \
  extern "C" __global__ void __launch_bounds__(DQ_THREADS)                                        \
      dequant_f16_##NAME(const uint8_t* __restrict__ w, uint16_t* __restrict__ y,                 \
                         int /* cols */, long long n) {                                           \
    dq_f16_f<wty_##NAME>(w, y, n);                                                                \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(DQ_THREADS)                                        \
      get_rows_##NAME(const uint8_t* __restrict__ w, const int* __restrict__ ids,                 \
                      float* __restrict__ y, int n_rows, int cols, long long n,                   \
                      float scale) {                                                              \
    get_rows_f<wty_##NAME>(w, ids, y, n_rows, cols, n, scale);                                    \
  }

// convert_f32_bf16(x, y, n): y[i] = x[i] rounded to bf16 (nearest even).
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    convert_f32_bf16(const float* __restrict__ x, uint16_t* __restrict__ y, long long n) {
  const long long i = (long long)blockIdx.x * DQ_THREADS + threadIdx.x;
  if (i < n) y[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
}
SIM_EXPORT(convert_f32_bf16)

// The kernels, one line each (the simulator's build reads the SIM_EXPORT lines).
DQ_Q(q4_0)
SIM_EXPORT(dequant_f16_q4_0)
SIM_EXPORT(get_rows_q4_0)
DQ_Q(q4_1)
SIM_EXPORT(dequant_f16_q4_1)
SIM_EXPORT(get_rows_q4_1)
DQ_Q(q5_0)
SIM_EXPORT(dequant_f16_q5_0)
SIM_EXPORT(get_rows_q5_0)
DQ_Q(q5_1)
SIM_EXPORT(dequant_f16_q5_1)
SIM_EXPORT(get_rows_q5_1)
DQ_Q(q8_0)
SIM_EXPORT(dequant_f16_q8_0)
SIM_EXPORT(get_rows_q8_0)
DQ_Q(q2_K)
SIM_EXPORT(dequant_f16_q2_K)
SIM_EXPORT(get_rows_q2_K)
DQ_Q(q3_K)
SIM_EXPORT(dequant_f16_q3_K)
SIM_EXPORT(get_rows_q3_K)
DQ_Q(q4_K)
SIM_EXPORT(dequant_f16_q4_K)
SIM_EXPORT(get_rows_q4_K)
DQ_Q(q5_K)
SIM_EXPORT(dequant_f16_q5_K)
SIM_EXPORT(get_rows_q5_K)
DQ_Q(q6_K)
SIM_EXPORT(dequant_f16_q6_K)
SIM_EXPORT(get_rows_q6_K)
DQ_F(f32)
SIM_EXPORT(dequant_f16_f32)
SIM_EXPORT(get_rows_f32)
DQ_F(f16)
SIM_EXPORT(dequant_f16_f16)
SIM_EXPORT(get_rows_f16)
DQ_F(bf16)
SIM_EXPORT(dequant_f16_bf16)
SIM_EXPORT(get_rows_bf16)
