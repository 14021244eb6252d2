// Rotary position embedding of q and k, in place, for a batch of tokens at arbitrary positions
// (one position per token: a batch may hold several sequences), in both layouts GGUF models use.
//
// The angles are the CPU's (`strata_simd::ops::rope::Rope::angles`, which follows ggml): the
// angle of pair i at position p is `(p * ts^i) * freq_scale` with `ts^i` accumulated by i
// repeated f32 multiplications, never a `powf`, so that the GPU rotates by the same angles as
// the CPU. `theta_scale` (`base^(-2/n_rot)`) is computed on the host by the same expression the
// CPU uses. The rotation's products are rounded one by one (no fma), as the CPU rounds them.

#include "strata.cuh"

#define ROPE_THREADS 256
// n_rot / 2 at most: heads of up to 512 values.
#define ROPE_MAX_PAIRS 256

// One block per token. q: [n_tok][n_head_q][head_dim], k: [n_tok][n_head_k][head_dim] (not read
// when n_head_k is 0). neox: 1 pairs (x[i], x[i + n_rot/2]), 0 pairs (x[2i], x[2i+1]).
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_f32(float* __restrict__ q, float* __restrict__ k, const int* __restrict__ pos,
             int n_head_q, int n_head_k, int head_dim, int n_rot, float theta_scale,
             float freq_scale, int neox) {
  __shared__ float cos_s[ROPE_MAX_PAIRS];
  __shared__ float sin_s[ROPE_MAX_PAIRS];
  const int tok = blockIdx.x;
  const int half = n_rot / 2;
  const float p = (float)pos[tok];
  // Thread i makes pair i's angle by i multiplications: the same chain of roundings as the
  // CPU's running product, and no longer than the chain one thread would run for all pairs.
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float theta = p;
    for (int j = 0; j < i; j++) theta = __fmul_rn(theta, theta_scale);
    const float a = __fmul_rn(theta, freq_scale);
    cos_s[i] = cosf(a);
    sin_s[i] = sinf(a);
  }
  __syncthreads();
  const int pairs_q = n_head_q * half;
  const int pairs = pairs_q + n_head_k * half;
  // Consecutive threads take consecutive pairs of a head: coalesced in both layouts.
  for (int w = threadIdx.x; w < pairs; w += blockDim.x) {
    const bool is_q = w < pairs_q;
    const int wi = is_q ? w : w - pairs_q;
    const int h = wi / half, i = wi % half;
    float* x = is_q ? q + ((size_t)tok * n_head_q + h) * head_dim
                    : k + ((size_t)tok * n_head_k + h) * head_dim;
    const int i0 = neox ? i : 2 * i;
    const int i1 = neox ? i + half : 2 * i + 1;
    const float a = x[i0], b = x[i1], c = cos_s[i], s = sin_s[i];
    x[i0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    x[i1] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
  }
}
SIM_EXPORT(rope_f32)
