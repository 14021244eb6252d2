// CUDA's execution model for the host C++ compiler: strata's kernel simulator.
//
// A kernel file (`kernels/cuda/*.cu`) includes "strata.cuh", which includes this header when
// it is not compiled by NVRTC. The same kernel text then runs on the CPU: every CUDA thread of
// a block is a fiber, `__syncthreads` and the warp collectives (shuffles, votes, `__syncwarp`,
// `mma`, `ldmatrix`) switch between them in a seeded random order, and every load and store the
// kernel makes is reported to the runtime (the file is compiled with `-fsanitize=thread`, whose
// callbacks `sim.cpp` implements instead of linking ThreadSanitizer), which checks it against
// the device buffers, the block's shared variables and the race detector.
//
// Everything here that touches the runtime's state is an out-of-line call into `sim.cpp`
// (compiled without instrumentation), so that the only instrumented accesses are the kernel's.

#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Vector types and launch geometry.

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
};
struct int2 {
  int x, y;
};
struct int4 {
  int x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
struct char4 {
  signed char x, y, z, w;
};
struct uchar4 {
  unsigned char x, y, z, w;
};
static_assert(alignof(int4) == 4, "vector types keep host alignment");

inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) {
  return {x, y, z, w};
}

// ---------------------------------------------------------------------------------------------
// The runtime's entry points (sim.cpp).

extern "C" {
uint3 sim_thread_idx();
uint3 sim_block_idx();
dim3 sim_block_dim();
dim3 sim_grid_dim();
void sim_syncthreads();
int sim_syncthreads_count(int pred);
void sim_syncwarp(unsigned mask);
unsigned sim_shfl(unsigned mask, unsigned value, int lane_or_delta, int width, int mode);
unsigned sim_vote(unsigned mask, int pred, int mode);
unsigned sim_activemask();
unsigned sim_lane_id();
void sim_trap(const char* what);

int sim_atomic_add_i32(int* p, int v);
unsigned sim_atomic_add_u32(unsigned* p, unsigned v);
unsigned long long sim_atomic_add_u64(unsigned long long* p, unsigned long long v);
float sim_atomic_add_f32(float* p, float v);
int sim_atomic_max_i32(int* p, int v);
unsigned sim_atomic_max_u32(unsigned* p, unsigned v);
int sim_atomic_min_i32(int* p, int v);
unsigned sim_atomic_min_u32(unsigned* p, unsigned v);
int sim_atomic_exch_i32(int* p, int v);
unsigned sim_atomic_exch_u32(unsigned* p, unsigned v);
int sim_atomic_cas_i32(int* p, int cmp, int v);
unsigned sim_atomic_cas_u32(unsigned* p, unsigned cmp, unsigned v);
unsigned long long sim_atomic_cas_u64(unsigned long long* p, unsigned long long cmp,
                                      unsigned long long v);

void sim_mma_m16n8k16_f16(float* d, const unsigned* a, const unsigned* b, const float* c);
void sim_mma_m16n8k16_bf16(float* d, const unsigned* a, const unsigned* b, const float* c);
void sim_mma_m16n8k32_s8(int* d, const unsigned* a, const unsigned* b, const int* c);
void sim_ldmatrix(unsigned* r, const void* row, int count, int trans);
void sim_cp_async(void* smem, const void* gmem, int bytes, int src_bytes);
void sim_cp_async_commit();
void sim_cp_async_wait(int keep);
uint16_t sim_f32_to_f16(float f);
float sim_f16_to_f32(uint16_t h);
uint16_t sim_f32_to_bf16(float f);
float sim_bf16_to_f32(uint16_t h);
}

// The shuffle and vote kinds sim_shfl / sim_vote take.
enum { SIM_SHFL_IDX = 0, SIM_SHFL_UP = 1, SIM_SHFL_DOWN = 2, SIM_SHFL_XOR = 3 };
enum { SIM_VOTE_BALLOT = 0, SIM_VOTE_ANY = 1, SIM_VOTE_ALL = 2 };

// ---------------------------------------------------------------------------------------------
// Qualifiers. A `__shared__` variable is a static in this file's shared-memory section
// (`sim_smem_<file>`), preceded by a never-used pad so that an access past its end lands in
// memory that belongs to no variable; the build harvests the section's symbols into the table
// the runtime checks accesses against. One block runs at a time, so statics are the block's.

#define SIM_CAT2(a, b) a##b
#define SIM_CAT(a, b) SIM_CAT2(a, b)
#define SIM_STR2(a) #a
#define SIM_STR(a) SIM_STR2(a)
#ifndef SIM_TU
#error "SIM_TU (the kernel file's name) must be defined by the build"
#endif
#define SIM_SMEM_SECTION SIM_STR(SIM_CAT(sim_smem_, SIM_TU))

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __constant__ static const
#define __shared__                                                                   \
  __attribute__((section(SIM_SMEM_SECTION), used)) static char SIM_CAT(sim_pad_,   \
                                                                       __COUNTER__)[64]; \
  __attribute__((section(SIM_SMEM_SECTION), aligned(16))) static

// A compiler barrier: shared variables that a call cannot see (statics whose address never
// escapes) must still be reloaded after a synchronisation, as on the GPU.
#define SIM_FENCE() asm volatile("" ::: "memory")

#define threadIdx (sim_thread_idx())
#define blockIdx (sim_block_idx())
#define blockDim (sim_block_dim())
#define gridDim (sim_grid_dim())
#define warpSize 32

inline void __syncthreads() {
  SIM_FENCE();
  sim_syncthreads();
  SIM_FENCE();
}
inline int __syncthreads_count(int p) {
  SIM_FENCE();
  int r = sim_syncthreads_count(p);
  SIM_FENCE();
  return r;
}
inline int __syncthreads_or(int p) { return __syncthreads_count(p) != 0; }
inline int __syncthreads_and(int p) {
  return __syncthreads_count(p) == (int)(blockDim.x * blockDim.y * blockDim.z);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  SIM_FENCE();
  sim_syncwarp(mask);
  SIM_FENCE();
}
inline void __threadfence() { SIM_FENCE(); }
inline void __threadfence_block() { SIM_FENCE(); }
inline unsigned __activemask() { return sim_activemask(); }
inline void __trap() { sim_trap("__trap()"); }

// ---------------------------------------------------------------------------------------------
// Warp shuffles and votes, for every 32- and 64-bit type CUDA allows.

template <class T>
inline T sim_shfl_any(unsigned mask, T v, int lane, int width, int mode) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
  unsigned w[2] = {0, 0};
  std::memcpy(w, &v, sizeof(T));
  SIM_FENCE();
  w[0] = sim_shfl(mask, w[0], lane, width, mode);
  if (sizeof(T) == 8) w[1] = sim_shfl(mask, w[1], lane, width, mode);
  SIM_FENCE();
  T r;
  std::memcpy(&r, w, sizeof(T));
  return r;
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return sim_shfl_any(mask, v, src, width, SIM_SHFL_IDX);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return sim_shfl_any(mask, v, (int)delta, width, SIM_SHFL_UP);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return sim_shfl_any(mask, v, (int)delta, width, SIM_SHFL_DOWN);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return sim_shfl_any(mask, v, lane_mask, width, SIM_SHFL_XOR);
}
inline unsigned __ballot_sync(unsigned mask, int p) { return sim_vote(mask, p, SIM_VOTE_BALLOT); }
inline int __any_sync(unsigned mask, int p) { return (int)sim_vote(mask, p, SIM_VOTE_ANY); }
inline int __all_sync(unsigned mask, int p) { return (int)sim_vote(mask, p, SIM_VOTE_ALL); }

// ---------------------------------------------------------------------------------------------
// Atomics (one block runs at a time, but the runtime still records them as atomic accesses, so
// that atomics do not race with each other and a plain access racing one is reported).

inline int atomicAdd(int* p, int v) { return sim_atomic_add_i32(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return sim_atomic_add_u32(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return sim_atomic_add_u64(p, v);
}
inline float atomicAdd(float* p, float v) { return sim_atomic_add_f32(p, v); }
inline int atomicMax(int* p, int v) { return sim_atomic_max_i32(p, v); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return sim_atomic_max_u32(p, v); }
inline int atomicMin(int* p, int v) { return sim_atomic_min_i32(p, v); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return sim_atomic_min_u32(p, v); }
inline int atomicExch(int* p, int v) { return sim_atomic_exch_i32(p, v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return sim_atomic_exch_u32(p, v); }
inline int atomicCAS(int* p, int c, int v) { return sim_atomic_cas_i32(p, c, v); }
inline unsigned atomicCAS(unsigned* p, unsigned c, unsigned v) {
  return sim_atomic_cas_u32(p, c, v);
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c,
                                    unsigned long long v) {
  return sim_atomic_cas_u64(p, c, v);
}

// ---------------------------------------------------------------------------------------------
// Integer and float intrinsics.

inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; i++) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
  return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; i++) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
  return c;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; i++) {
    unsigned sel = (s >> (4 * i)) & 7u;
    r |= (unsigned)((v >> (8 * sel)) & 0xffu) << (8 * i);
  }
  return r;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline unsigned __float_as_uint(float f) {
  unsigned i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __uint_as_float(unsigned i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float2int_rn(float f) { return (int)std::nearbyint(f); }
inline int __float2int_rz(float f) { return (int)f; }
inline float __saturatef(float f) { return f < 0.f ? 0.f : (f > 1.f ? 1.f : f); }
inline float __expf(float f) { return std::exp(f); }
inline float __logf(float f) { return std::log(f); }
inline float __sinf(float f) { return std::sin(f); }
inline float __cosf(float f) { return std::cos(f); }
inline void __sincosf(float f, float* s, float* c) {
  *s = std::sin(f);
  *c = std::cos(f);
}
inline void sincosf(float f, float* s, float* c) {
  *s = std::sin(f);
  *c = std::cos(f);
}
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float rsqrtf(float f) { return 1.0f / std::sqrt(f); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// The rounded operations that CUDA never contracts into an fma (kernels use them where a
// result must match the CPU bit for bit). The empty asm keeps the host compiler from
// contracting them either, whatever -march it is given.
inline float __fmul_rn(float a, float b) {
  float r = a * b;
  asm("" : "+x"(r));
  return r;
}
inline float __fadd_rn(float a, float b) {
  float r = a + b;
  asm("" : "+x"(r));
  return r;
}
inline float __fsub_rn(float a, float b) {
  float r = a - b;
  asm("" : "+x"(r));
  return r;
}
using std::max;
using std::min;
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
// Per-byte subtraction modulo 256 (no borrow between bytes).
inline unsigned __vsub4(unsigned a, unsigned b) {
  unsigned r = 0;
  for (int i = 0; i < 4; i++) r |= (((a >> (8 * i)) - (b >> (8 * i))) & 0xffu) << (8 * i);
  return r;
}

// ---------------------------------------------------------------------------------------------
// half and bfloat16 with CUDA's rounding (round to nearest even).

struct __half {
  uint16_t x;
  __half() = default;
  __half(float f) : x(sim_f32_to_f16(f)) {}
  operator float() const { return sim_f16_to_f32(x); }
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : x(sim_f32_to_bf16(f)) {}
  operator float() const { return sim_bf16_to_f32(x); }
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __half half;
typedef __half2 half2;
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4, "half keeps CUDA's size");
static_assert(sizeof(__nv_bfloat16) == 2, "bfloat16 keeps CUDA's size");

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return (float)h; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float2half2_rn(float a) { return {__half(a), __half(a)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline float __low2float(__half2 h) { return (float)h.x; }
inline float __high2float(__half2 h) { return (float)h.y; }
inline float2 __half22float2(__half2 h) { return {(float)h.x, (float)h.y}; }
inline __half2 __float22half2_rn(float2 f) { return {__half(f.x), __half(f.y)}; }
inline __half __ushort_as_half(unsigned short u) {
  __half h;
  h.x = u;
  return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  __nv_bfloat16 h;
  h.x = u;
  return h;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

// ---------------------------------------------------------------------------------------------
// Kernel registration: `SIM_EXPORT(name)` after a kernel makes it launchable by name. The thunk
// unpacks `cuLaunchKernel`-style parameters (an array of pointers to each argument's value).
// It reads host memory, so it is not instrumented.

namespace sim {
template <class... A, std::size_t... I>
__attribute__((no_sanitize_thread, always_inline)) inline void invoke(void (*f)(A...), void** p,
                                                                      std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
}  // namespace sim

#define SIM_EXPORT(name)                                                                   \
  extern "C" __attribute__((no_sanitize_thread)) void SIM_CAT(strata_sim_thunk_, name)(    \
      void** p) {                                                                          \
    sim::invoke(name, p, std::make_index_sequence<sim::arity(name)>{});                    \
  }

namespace sim {
template <class... A>
constexpr std::size_t arity(void (*)(A...)) {
  return sizeof...(A);
}
}  // namespace sim
