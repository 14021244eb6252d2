//! NEON dot products for the legacy 8- and 4-bit types and Q4_K, in two flavours: `*_dotprod`
//! use `sdot` (ARMv8.2 `dotprod`: Apple M1+, Graviton 2+, Cortex-A76+), the others
//! only baseline NEON (`smull` + pairwise widening adds) for older cores such as Cortex-A72.
//!
//! Integer partial sums are reduced per (sub-)block and scaled in f32 in exactly the order of
//! the scalar twins in `crate::scalar::dot`, so both agree to the last bit on every input.
//! Blocks are taken with `chunks_exact`, so every load below reads inside its block; the only
//! precondition a caller must meet is the CPU feature.

use std::arch::aarch64::*;

use strata_storage::quant::QK_K;

use crate::scalar::{f16_at, f32_at, scale_min_k4};

const Q8_0_BYTES: usize = 34;
const Q4_0_BYTES: usize = 18;
const Q4_K_BYTES: usize = 144;
const Q8_K_BYTES: usize = 292;

/// `acc[i] += Σ a[4i..4i+4]·b[4i..4i+4]`: one `sdot`. `vdotq_s32` is still unstable in
/// `std::arch` (rust-lang/rust#117224), so the instruction is written out; `.arch_extension`
/// lets the assembler accept it whatever the crate-wide target features are.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` exists on this CPU (the function's `dotprod` feature, checked at run time
    // by the dispatcher) and touches only the three vector registers named here.
    unsafe {
        std::arch::asm!(
            ".arch_extension dotprod",
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// `Σ a·b + Σ c·d` over 16 signed bytes each, with `sdot`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn dot32_dotprod(a: int8x16_t, b: int8x16_t, c: int8x16_t, d: int8x16_t) -> i32 {
    let acc = sdot(sdot(vdupq_n_s32(0), a, b), c, d);
    vaddvq_s32(acc)
}

/// `Σ a·b + Σ c·d` over 16 signed bytes each, with baseline NEON. Every product of two i8 fits
/// in i16 (|−128·−128| = 2¹⁴), and the pairwise adds widen to i32 before anything can overflow.
#[inline]
#[target_feature(enable = "neon")]
fn dot32_neon(a: int8x16_t, b: int8x16_t, c: int8x16_t, d: int8x16_t) -> i32 {
    let ab = vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    let ab = vpadalq_s16(ab, vmull_high_s8(a, b));
    let cd = vpadalq_s16(ab, vmull_s8(vget_low_s8(c), vget_low_s8(d)));
    let cd = vpadalq_s16(cd, vmull_high_s8(c, d));
    vaddvq_s32(cd)
}

/// Loads 16 signed bytes from `b[off..off + 16]`.
///
/// # Safety
/// `off + 16 <= b.len()`.
#[inline(always)]
unsafe fn load_s8(b: &[u8], off: usize) -> int8x16_t {
    debug_assert!(off + 16 <= b.len());
    // SAFETY: the caller keeps the 16 bytes inside `b`; `vld1q_s8` has no alignment needs.
    unsafe { vld1q_s8(b.as_ptr().add(off).cast::<i8>()) }
}

/// Loads 16 unsigned bytes from `b[off..off + 16]`.
///
/// # Safety
/// `off + 16 <= b.len()`.
#[inline(always)]
unsafe fn load_u8(b: &[u8], off: usize) -> uint8x16_t {
    debug_assert!(off + 16 <= b.len());
    // SAFETY: as for `load_s8`.
    unsafe { vld1q_u8(b.as_ptr().add(off)) }
}

/// Splits 16 bytes of packed nibbles into the low and high nibbles as signed lanes (0..=15).
#[inline(always)]
fn nibbles(v: uint8x16_t) -> (int8x16_t, int8x16_t) {
    // SAFETY: baseline NEON, always present on aarch64 (the target enables `neon`).
    unsafe {
        let lo = vandq_u8(v, vdupq_n_u8(0x0F));
        let hi = vshrq_n_u8::<4>(v);
        (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
    }
}

/// Defines one flavour of every kernel over the given 32-lane integer dot product.
macro_rules! kernels {
    ($features:literal, $dot32:ident, $q8_0:ident, $q4_0:ident, $q4_k:ident) => {
        /// Q8_0 weights × Q8_0 activations over `n` elements.
        ///
        /// # Safety
        /// The CPU must have the features this function enables.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let mut sum = 0.0f32;
            let blocks = w.chunks_exact(Q8_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES));
            for (x, y) in blocks.take(n / 32) {
                // SAFETY: both blocks are 34 bytes: quants at 2..18 and 18..34.
                let (x0, x1, y0, y1) =
                    unsafe { (load_s8(x, 2), load_s8(x, 18), load_s8(y, 2), load_s8(y, 18)) };
                let s = $dot32(x0, y0, x1, y1);
                sum += s as f32 * (f16_at(x, 0) * f16_at(y, 0));
            }
            sum
        }

        /// Q4_0 weights × Q8_0 activations over `n` elements.
        ///
        /// # Safety
        /// The CPU must have the features this function enables.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q4_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let mut sum = 0.0f32;
            let blocks = w.chunks_exact(Q4_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES));
            for (x, y) in blocks.take(n / 32) {
                // SAFETY: an 18-byte Q4_0 block has its 16 quant bytes at 2..18, a 34-byte
                // Q8_0 block its 32 quants at 2..34.
                let (q, y0, y1) = unsafe { (load_u8(x, 2), load_s8(y, 2), load_s8(y, 18)) };
                let (lo, hi) = nibbles(q);
                // Low nibbles are elements 0..16, high nibbles 16..32, both offset by 8.
                let eight = vdupq_n_s8(8);
                let s = $dot32(vsubq_s8(lo, eight), y0, vsubq_s8(hi, eight), y1);
                sum += s as f32 * (f16_at(x, 0) * f16_at(y, 0));
            }
            sum
        }

        /// Q4_K weights × Q8_K activations over `n` elements.
        ///
        /// # Safety
        /// The CPU must have the features this function enables.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q4_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
            // Q4_K: d @0, dmin @2, scales[12] @4, qs[128] @16. Q8_K: d (f32) @0, qs[256] @4,
            // bsums[16] (i16, sums of 16 quants each) @260.
            let mut sum = 0.0f32;
            let blocks = w.chunks_exact(Q4_K_BYTES).zip(a.chunks_exact(Q8_K_BYTES));
            for (x, y) in blocks.take(n / QK_K) {
                let sc = &x[4..16];
                let bsum = |i: usize| i16::from_le_bytes([y[260 + 2 * i], y[261 + 2 * i]]) as i32;
                let mut isum = 0i32;
                let mut summs = 0i32;
                // 32 bytes of quants hold two sub-blocks: low nibbles sub-block 2j, high 2j+1.
                for j in 0..4 {
                    let (s_lo, m_lo) = scale_min_k4(2 * j, sc);
                    let (s_hi, m_hi) = scale_min_k4(2 * j + 1, sc);
                    summs += m_lo as i32 * (bsum(4 * j) + bsum(4 * j + 1));
                    summs += m_hi as i32 * (bsum(4 * j + 2) + bsum(4 * j + 3));
                    let qo = 16 + 32 * j;
                    let yo = 4 + 64 * j;
                    // SAFETY: qo + 32 <= 144 and yo + 64 <= 260, inside the blocks.
                    let (q0, q1, y0, y1, y2, y3) = unsafe {
                        (
                            load_u8(x, qo),
                            load_u8(x, qo + 16),
                            load_s8(y, yo),
                            load_s8(y, yo + 16),
                            load_s8(y, yo + 32),
                            load_s8(y, yo + 48),
                        )
                    };
                    let (lo0, hi0) = nibbles(q0);
                    let (lo1, hi1) = nibbles(q1);
                    isum += s_lo as i32 * $dot32(lo0, y0, lo1, y1);
                    isum += s_hi as i32 * $dot32(hi0, y2, hi1, y3);
                }
                let dy = f32_at(y, 0);
                sum += dy * f16_at(x, 0) * isum as f32 - dy * f16_at(x, 2) * summs as f32;
            }
            sum
        }
    };
}

kernels!(
    "neon,dotprod",
    dot32_dotprod,
    dot_q8_0_dotprod,
    dot_q4_0_dotprod,
    dot_q4_k_dotprod
);
kernels!("neon", dot32_neon, dot_q8_0, dot_q4_0, dot_q4_k);
