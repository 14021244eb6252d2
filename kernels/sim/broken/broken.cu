// Kernels with the bugs a GPU shows and a CPU run usually hides. The simulator must catch each
// one with a message that names it (kernels/tests/sim_checks.rs). Not compiled to PTX.

#include "../../cuda/strata.cuh"

// A block sum that forgets the barrier between writing the per-warp partials and reading them.
extern "C" __global__ void broken_missing_sync(const float* x, float* out) {
  __shared__ float partial[32];
  float v = warp_sum(x[blockIdx.x * blockDim.x + threadIdx.x]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = v;
  // __syncthreads() missing here
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) out[blockIdx.x] = v;
  }
}
SIM_EXPORT(broken_missing_sync)

// Reads one element past the end of its input (`i <= n`).
extern "C" __global__ void broken_oob_read(const float* x, float* y, int n) {
  for (int i = threadIdx.x; i <= n; i += blockDim.x) y[0] = x[i];
}
SIM_EXPORT(broken_oob_read)

// Every thread writes its value into one shared slot, then thread 0 reads it: a write-write race.
extern "C" __global__ void broken_smem_race(const float* x, float* y) {
  __shared__ float slot[4];
  slot[1] = x[threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) y[0] = slot[1];
}
SIM_EXPORT(broken_smem_race)

// Shifts a shared tile by one: the last thread reads past the end of `tile`.
extern "C" __global__ void broken_smem_oob(const float* x, float* y) {
  __shared__ float tile[64];
  tile[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  y[threadIdx.x] = tile[threadIdx.x + 1];
}
SIM_EXPORT(broken_smem_oob)

// A warp reduction with the lower half's mask: lane 0 reads lane 16, which is not in the mask.
extern "C" __global__ void broken_shfl_mask(const float* x, float* y) {
  float v = x[threadIdx.x];
  if (threadIdx.x < 16) v += __shfl_xor_sync(0x0000ffffu, v, 16);
  y[threadIdx.x] = v;
}
SIM_EXPORT(broken_shfl_mask)

// A barrier inside a branch only some threads take.
extern "C" __global__ void broken_partial_barrier(const float* x, float* y) {
  float v = x[threadIdx.x];
  if (threadIdx.x < 64) {
    __syncthreads();
    v *= 2.0f;
  }
  y[threadIdx.x] = v;
}
SIM_EXPORT(broken_partial_barrier)

// One warp multiplies a 16x16 f16 tile A (row-major) by a 16x8 tile B (B[k][n] at b[k*8+n]) into
// D (16x8 f32, row-major) with mma.m16n8k16, loading fragments as the PTX ISA lays them out.
// `wrong` != 0 swaps the rows of a2/a3 with a0/a1 (g+8 taken for g): a wrong fragment index.
__device__ void mma_f16_tile(const uint16_t* a, const uint16_t* b, float* d, int wrong) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  unsigned fa[4], fb[2];
  for (int r = 0; r < 4; r++) {
    unsigned lo = 0, hi = 0;
    for (int h = 0; h < 2; h++) {
      const int i = 2 * r + h;
      int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      if (wrong && (i == 2 || i == 3)) row = g;
      const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      (h ? hi : lo) = a[row * 16 + col];
    }
    fa[r] = lo | (hi << 16);
  }
  for (int r = 0; r < 2; r++) {
    unsigned v[2];
    for (int h = 0; h < 2; h++) {
      const int i = 2 * r + h;
      const int k = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
      v[h] = b[k * 8 + g];
    }
    fb[r] = v[0] | (v[1] << 16);
  }
  const float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float out[4];
  mma_f16_16816(out, fa, fb, c);
  for (int i = 0; i < 4; i++) d[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)] = out[i];
}

extern "C" __global__ void mma_f16_ok(const uint16_t* a, const uint16_t* b, float* d) {
  mma_f16_tile(a, b, d, 0);
}
SIM_EXPORT(mma_f16_ok)

extern "C" __global__ void broken_mma_fragment(const uint16_t* a, const uint16_t* b, float* d) {
  mma_f16_tile(a, b, d, 1);
}
SIM_EXPORT(broken_mma_fragment)

// The s8 form: A 16x32 (row-major), B 32x8 (B[k][n] at b[k*8+n]), D 16x8 int32.
extern "C" __global__ void mma_s8_ok(const int8_t* a, const int8_t* b, int* d) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  unsigned fa[4], fb[2];
  for (int r = 0; r < 4; r++) {
    unsigned v = 0;
    for (int j = 0; j < 4; j++) {
      const int i = 4 * r + j;
      const int row = (i < 4 || (i >= 8 && i < 12)) ? g : g + 8;
      const int col = 4 * t + (i & 3) + (i >= 8 ? 16 : 0);
      v |= (unsigned)(uint8_t)a[row * 32 + col] << (8 * j);
    }
    fa[r] = v;
  }
  for (int r = 0; r < 2; r++) {
    unsigned v = 0;
    for (int j = 0; j < 4; j++) {
      const int i = 4 * r + j;
      const int k = 4 * t + (i & 3) + (i >= 4 ? 16 : 0);
      v |= (unsigned)(uint8_t)b[k * 8 + g] << (8 * j);
    }
    fb[r] = v;
  }
  const int c[4] = {0, 0, 0, 0};
  int out[4];
  mma_s8_16832(out, fa, fb, c);
  for (int i = 0; i < 4; i++) d[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)] = out[i];
}
SIM_EXPORT(mma_s8_ok)

// ldmatrix .x4 over a 16x16 b16 tile staged in shared memory by cp.async, then the same mma as
// mma_f16_ok: lanes 0-15 address rows 0-15 of columns 0-7, lanes 16-31 rows 0-15 of columns
// 8-15, which gives exactly the A fragment. B comes through ldmatrix .x2 .trans from a k-major
// 16x8 tile. `skip_wait` != 0 forgets cp.async.wait.
__device__ void ldmatrix_tile(const uint16_t* a, const uint16_t* b, float* d, int skip_wait) {
  __shared__ __align__(16) uint16_t sa[16 * 16];
  __shared__ __align__(16) uint16_t sb[16 * 8];
  const int lane = threadIdx.x;
  // 32 lanes copy 16 bytes each of A (512 bytes), then 16 lanes B (256 bytes).
  cp_async_16(&sa[lane * 8], &a[lane * 8], 16);
  if (lane < 16) cp_async_16(&sb[lane * 8], &b[lane * 8], 16);
  cp_async_commit();
  if (!skip_wait) cp_async_wait<0>();
  __syncwarp();
  unsigned fa[4], fb[2];
  ldmatrix_x4(fa, &sa[(lane & 15) * 16 + (lane >> 4) * 8]);
  ldmatrix_x2_trans(fb, &sb[(lane & 15) * 8]);
  const float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float out[4];
  mma_f16_16816(out, fa, fb, c);
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; i++) d[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)] = out[i];
  if (skip_wait) cp_async_wait_all();
}

extern "C" __global__ void ldmatrix_ok(const uint16_t* a, const uint16_t* b, float* d) {
  ldmatrix_tile(a, b, d, 0);
}
SIM_EXPORT(ldmatrix_ok)

extern "C" __global__ void broken_cp_async_wait(const uint16_t* a, const uint16_t* b, float* d) {
  ldmatrix_tile(a, b, d, 1);
}
SIM_EXPORT(broken_cp_async_wait)

// Atomics into shared memory do not race with each other; the total lands in y[0].
extern "C" __global__ void atomic_ok(const int* x, int* y) {
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, x[threadIdx.x]);
  __syncthreads();
  if (threadIdx.x == 0) y[0] = total;
}
SIM_EXPORT(atomic_ok)

// Reads host memory through a pointer smuggled in as an integer.
extern "C" __global__ void broken_host_pointer(unsigned long long host, float* y) {
  y[threadIdx.x] = ((const float*)host)[threadIdx.x];
}
SIM_EXPORT(broken_host_pointer)

// Shared memory inside a template (and an inline function) lives in its own COMDAT section, not
// the file's shared section: the simulator must check it all the same.
template <int N>
__device__ float template_sum(float v, int sync) {
  __shared__ float part[N];
  part[threadIdx.x] = v;
  if (sync) __syncthreads();
  float s = 0.0f;
  for (int i = 0; i < N; i++) s += part[i];
  return s;
}

extern "C" __global__ void template_sum_ok(const float* x, float* y) {
  y[threadIdx.x] = template_sum<64>(x[threadIdx.x], 1);
}
SIM_EXPORT(template_sum_ok)

extern "C" __global__ void broken_template_race(const float* x, float* y) {
  y[threadIdx.x] = template_sum<32>(x[threadIdx.x], 0);
}
SIM_EXPORT(broken_template_race)

__device__ __forceinline__ float inline_shift(float v) {
  __shared__ float line[32];
  line[threadIdx.x] = v;
  __syncthreads();
  return line[threadIdx.x + 1];
}

extern "C" __global__ void broken_inline_oob(const float* x, float* y) {
  y[threadIdx.x] = inline_shift(x[threadIdx.x]);
}
SIM_EXPORT(broken_inline_oob)
