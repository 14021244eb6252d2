//! x86-64 kernels: AVX2 (+FMA, F16C) and AVX-512 (+VNNI). Each is a
//! `#[target_feature] unsafe fn` that the dispatch table calls only after the CPU has been
//! checked for the features it enables.

pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod gemm;
pub(crate) mod gemm_avx2;
pub(crate) mod interleaved;
pub(crate) mod interleaved_avx2;
pub(crate) mod interleaved_avx2_kq;
pub(crate) mod interleaved_vnni256;
pub(crate) mod multi;
