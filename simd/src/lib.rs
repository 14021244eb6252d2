//! strata-simd: the CPU math.
//!
//! - [`dispatch`] picks the instruction-set level once (scalar, AVX2, AVX-512, VNNI), logs it,
//!   and honours `STRATA_SIMD=scalar|avx2|avx512` to force a lower one.
//! - [`matmul`] multiplies a quantized weight matrix by f32 activations: activations are
//!   quantized once per call to the weight type's partner format (Q8_K for K-quants, Q8_0 for
//!   the legacy types), then integer dot products run per row.
//! - [`membw`] measures the memory read bandwidth (the decode roofline).
//! - [`pool`] is the persistent worker pool every parallel kernel runs on, pinned to physical
//!   cores found by [`topology`] (sysfs, or hwloc with the `hwloc` feature; `STRATA_PIN=0`
//!   turns pinning off).
//! - [`tune`] measures the decode choices that depend on the microarchitecture (row or
//!   interleaved kernels, 256- or 512-bit, the software prefetch distance) and holds the
//!   process's.
//! - [`ops`] holds the small kernels: RMSNorm, RoPE, softmax, activations, attention.
//!
//! Nothing here knows about files, GGUF or models.

#![deny(unsafe_op_in_unsafe_fn)]

mod arch;
pub mod dispatch;
pub mod matmul;
pub mod membw;
pub mod ops;
pub mod pool;
mod scalar;
pub mod topology;
pub mod tune;
