// RMS normalisation: y = x / sqrt(mean(x²) + eps) * w, per row. One block per row.

#include "strata.cuh"

#define NORM_THREADS 256

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                 int n, float eps) {
  __shared__ float red[32];
  const float* xr = x + (size_t)blockIdx.x * n;
  float* yr = y + (size_t)blockIdx.x * n;
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i] * xr[i];
  s = block_sum(s, red);
  const float scale = rsqrtf(s / (float)n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
}
SIM_EXPORT(rms_norm_f32)

// The residual add fused with the next RMSNorm, one block per row of n: x += y, then
// xb = rms_norm(x)·w. This is every layer boundary of a pre-norm model (the attention output
// added, then the FFN's norm; the FFN output added, then the next layer's attention norm or
// the output norm): one launch and one read of x instead of two. Each thread reads back only
// the elements it wrote, so the second pass needs no barrier beyond the reduction's.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    add_rms_norm_f32(float* __restrict__ x, const float* __restrict__ y,
                     const float* __restrict__ w, float* __restrict__ xb, int n, float eps) {
  __shared__ float red[32];
  float* xr = x + (size_t)blockIdx.x * n;
  const float* yr = y + (size_t)blockIdx.x * n;
  float* br = xb + (size_t)blockIdx.x * n;
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = xr[i] + yr[i];
    xr[i] = v;
    s += v * v;
  }
  s = block_sum(s, red);
  const float scale = rsqrtf(s / (float)n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) br[i] = xr[i] * scale * w[i];
}
SIM_EXPORT(add_rms_norm_f32)

// The same boundary in a post-norm model (Gemma 3): x += rms_norm(y)·w_post, then
// xb = rms_norm(x)·w. Two reductions in one block; y's norm is never stored.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    post_norm_add_rms_norm_f32(float* __restrict__ x, const float* __restrict__ y,
                               const float* __restrict__ w_post, const float* __restrict__ w,
                               float* __restrict__ xb, int n, float eps) {
  __shared__ float red[32];
  float* xr = x + (size_t)blockIdx.x * n;
  const float* yr = y + (size_t)blockIdx.x * n;
  float* br = xb + (size_t)blockIdx.x * n;
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += yr[i] * yr[i];
  s = block_sum(s, red);
  const float post = rsqrtf(s / (float)n + eps);
  s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = xr[i] + yr[i] * post * w_post[i];
    xr[i] = v;
    s += v * v;
  }
  s = block_sum(s, red);
  const float scale = rsqrtf(s / (float)n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) br[i] = xr[i] * scale * w[i];
}
SIM_EXPORT(post_norm_add_rms_norm_f32)
