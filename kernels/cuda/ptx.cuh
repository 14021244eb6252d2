// Every piece of inline PTX strata's kernels use, behind a few small functions. On the GPU they
// are the instructions; in the simulator they are warp collectives in sim.cpp that compute each
// lane's fragment with the layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16" and
// "... mma.m16n8k32"). This is the only file with two texts; every other line of a kernel is the
// same on both sides.
//
// Fragments (g = lane / 4, t = lane % 4):
//  - mma m16n8k16 f16/bf16: a[4] holds A (16x16, row-major) elements a0..a7, two per register,
//    low half first: row g for a0,a1,a4,a5 else g+8; column 2t + (i&1), +8 for a4..a7.
//    b[2] holds B (16x8) b0..b3: k = 2t + (i&1), +8 for b2,b3; column n = g.
//    c[4]/d[4] (f32): row g for c0,c1 else g+8; column 2t + (i&1).
//  - mma m16n8k32 s8: a[4] holds a0..a15, four per register: row g for a0..a3, a8..a11 else g+8;
//    column 4t + (i&3), +16 for a8..a15. b[2] holds b0..b7: k = 4t + (i&3), +16 for b4..b7;
//    n = g. c/d (s32) as above.

#pragma once

#if defined(__CUDACC__)

__device__ __forceinline__ void mma_f16_16816(float d[4], const unsigned a[4], const unsigned b[2],
                                              const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_bf16_16816(float d[4], const unsigned a[4],
                                               const unsigned b[2], const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_s8_16832(int d[4], const unsigned a[4], const unsigned b[2],
                                             const int c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c[0]), "r"(c[1]),
        "r"(c[2]), "r"(c[3]));
}

// ldmatrix .x4: lanes 8m..8m+7 give the row addresses (16 bytes each, 16-byte aligned, in
// shared memory) of 8x8 b16 matrix m; r[m] receives row lane/4, columns 2(lane%4), +1.
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x2(unsigned r[2], const void* row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(a));
}
// The transposed form: r[m] receives column lane/4, rows 2(lane%4), +1.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned r[2], const void* row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(a));
}

// cp.async: 16 bytes from global to shared memory, bypassing registers; `src_bytes` < 16 fills
// the rest with zeros (0 for a row past the end). Completes at cp_async_wait.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  unsigned a = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Waits until at most `N` of the committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;"); }

#else  // the simulator

inline void mma_f16_16816(float d[4], const unsigned a[4], const unsigned b[2],
                          const float c[4]) {
  sim_mma_m16n8k16_f16(d, a, b, c);
}
inline void mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2],
                           const float c[4]) {
  sim_mma_m16n8k16_bf16(d, a, b, c);
}
inline void mma_s8_16832(int d[4], const unsigned a[4], const unsigned b[2], const int c[4]) {
  sim_mma_m16n8k32_s8(d, a, b, c);
}
inline void ldmatrix_x4(unsigned r[4], const void* row) { sim_ldmatrix(r, row, 4, 0); }
inline void ldmatrix_x2(unsigned r[2], const void* row) { sim_ldmatrix(r, row, 2, 0); }
inline void ldmatrix_x4_trans(unsigned r[4], const void* row) { sim_ldmatrix(r, row, 4, 1); }
inline void ldmatrix_x2_trans(unsigned r[2], const void* row) { sim_ldmatrix(r, row, 2, 1); }
inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  sim_cp_async(smem, gmem, 16, src_bytes);
}
inline void cp_async_commit() { sim_cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  SIM_FENCE();
  sim_cp_async_wait(N);
  SIM_FENCE();
}
inline void cp_async_wait_all() {
  SIM_FENCE();
  sim_cp_async_wait(-1);
  SIM_FENCE();
}

#endif
