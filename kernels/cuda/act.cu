// Element-wise work of a transformer step: the gated activations of the feed-forward block
// (SwiGLU, GeGLU), residual and bias adds, scaling by a constant, and the post-norm residual
// (Gemma 3's x += rms_norm(y)·w).
//
// These are all memory-bound: each thread handles ACT_PER_THREAD elements a block-width apart,
// so that every load instruction of a warp is one coalesced 128-byte transaction and each thread
// has several loads in flight. Rows run along gridDim.y (looping when there are more than the
// grid allows), columns along gridDim.x, so a single decode row still spreads over many SMs.

#include "strata.cuh"

#define ACT_THREADS 256
#define ACT_PER_THREAD 4
#define ACT_TILE (ACT_THREADS * ACT_PER_THREAD)

// The scalar twins of simd's `silu_mul_scalar` / `gelu_tanh_mul_scalar`, operation for operation
// (the same constants, the same order), so that the only differences are libm's against CUDA's
// expf/tanhf and the GPU's fused multiply-adds.
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ __forceinline__ float gelu_tanh_mul(float x, float u) {
  const float SQRT_2_OVER_PI = 0.7978846f;
  const float GELU_COEF_A = 0.044715f;
  const float inner = SQRT_2_OVER_PI * x * (1.0f + GELU_COEF_A * x * x);
  return 0.5f * x * (1.0f + tanhf(inner)) * u;
}

// out[r][i] = act(g[r][i]) * u[r][i] for `rows` rows of `ff`; each operand has its own row
// stride (in elements), so that a fused gate|up projection ([rows][2·ff]) is read in place.
// `out` may be `g` or `u` (each element is read and written by the same thread), hence no
// __restrict__ on the three.
template <bool GELU>
__device__ __forceinline__ void glu(const float* g, const float* u, float* out, int rows, int ff,
                                    int ld_g, int ld_u, int ld_out) {
  const int base = blockIdx.x * ACT_TILE + threadIdx.x;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* gr = g + (size_t)r * ld_g;
    const float* ur = u + (size_t)r * ld_u;
    float* orow = out + (size_t)r * ld_out;
#pragma unroll
    for (int j = 0; j < ACT_PER_THREAD; j++) {
      const int i = base + j * ACT_THREADS;
      if (i < ff) orow[i] = GELU ? gelu_tanh_mul(gr[i], ur[i]) : silu_mul(gr[i], ur[i]);
    }
  }
}

extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    swiglu_f32(const float* g, const float* u, float* out, int rows, int ff, int ld_g, int ld_u,
               int ld_out) {
  glu<false>(g, u, out, rows, ff, ld_g, ld_u, ld_out);
}
SIM_EXPORT(swiglu_f32)

extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    geglu_f32(const float* g, const float* u, float* out, int rows, int ff, int ld_g, int ld_u,
              int ld_out) {
  glu<true>(g, u, out, rows, ff, ld_g, ld_u, ld_out);
}
SIM_EXPORT(geglu_f32)

// x[i] += y[i] for n elements (the residual add). A grid-stride loop over tiles: the launcher
// caps the grid, so any n fits.
extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    add_f32(float* __restrict__ x, const float* __restrict__ y, long long n) {
  for (long long t = (long long)blockIdx.x * ACT_TILE; t < n; t += (long long)gridDim.x * ACT_TILE) {
#pragma unroll
    for (int j = 0; j < ACT_PER_THREAD; j++) {
      const long long i = t + threadIdx.x + j * ACT_THREADS;
      if (i < n) x[i] += y[i];
    }
  }
}
SIM_EXPORT(add_f32)

// x[i] *= s for n elements (Gemma's embedding scale √n_embd).
extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    scale_f32(float* __restrict__ x, float s, long long n) {
  for (long long t = (long long)blockIdx.x * ACT_TILE; t < n; t += (long long)gridDim.x * ACT_TILE) {
#pragma unroll
    for (int j = 0; j < ACT_PER_THREAD; j++) {
      const long long i = t + threadIdx.x + j * ACT_THREADS;
      if (i < n) x[i] *= s;
    }
  }
}
SIM_EXPORT(scale_f32)

// x[r][i] += b[i] for `rows` rows of `n` with row stride `ld` (the q/k/v projection biases).
extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    add_bias_f32(float* __restrict__ x, const float* __restrict__ b, int rows, int n, int ld) {
  const int base = blockIdx.x * ACT_TILE + threadIdx.x;
  // The bias slice this thread needs is the same for every row: loaded once.
  float bv[ACT_PER_THREAD];
#pragma unroll
  for (int j = 0; j < ACT_PER_THREAD; j++) {
    const int i = base + j * ACT_THREADS;
    bv[j] = i < n ? b[i] : 0.0f;
  }
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    float* xr = x + (size_t)r * ld;
#pragma unroll
    for (int j = 0; j < ACT_PER_THREAD; j++) {
      const int i = base + j * ACT_THREADS;
      if (i < n) xr[i] += bv[j];
    }
  }
}
SIM_EXPORT(add_bias_f32)

// x[r] += rms_norm(y[r])·w, one block per row of n (Gemma 3's post-attention and post-FFN
// norms, whose output only feeds the residual: the normed row is never stored). As the CPU
// does: y·scale·w, then added. Two passes over y; the second mostly hits L1/L2.
extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    residual_post_norm_f32(float* __restrict__ x, const float* __restrict__ y,
                           const float* __restrict__ w, int n, float eps) {
  __shared__ float red[32];
  const float* yr = y + (size_t)blockIdx.x * n;
  float* xr = x + (size_t)blockIdx.x * n;
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += yr[i] * yr[i];
  s = block_sum(s, red);
  const float scale = rsqrtf(s / (float)n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] += yr[i] * scale * w[i];
}
SIM_EXPORT(residual_post_norm_f32)
