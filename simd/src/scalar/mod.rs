//! Scalar kernels: the reference every SIMD kernel is tested against, and the fallback on
//! CPUs without AVX2.
//!
//! Everything works on raw block bytes in ggml's layout (see `strata_storage::quant::blocks`).
//! Integer dot products are exact; the per-block float arithmetic follows ggml's order closely
//! enough that SIMD and scalar agree to rounding.

pub(crate) mod act;
pub(crate) mod dot;

/// Reads the little-endian f16 at `b[off..off + 2]` as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

#[inline(always)]
pub(crate) fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline(always)]
pub(crate) fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// Unpacks the 6-bit (scale, min) pair `j` of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
