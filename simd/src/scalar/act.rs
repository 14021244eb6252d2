//! Activation quantizers: f32 rows into the partner format of each weight type, as ggml's
//! reference quantizers do it (Q8_0, Q8_1, Q8_K, f16, bf16).

use super::put_f16;
use strata_storage::quant::QK_K;

/// Q8_0: per 32 values, `d = amax / 127` (stored f16) and `q = round(x / d)`.
pub(crate) fn quantize_q8_0(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(32).zip(y.chunks_exact_mut(34)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16(yb, 0, d);
        for (q, &v) in yb[2..].iter_mut().zip(xb) {
            *q = (v * id).round() as i8 as u8;
        }
    }
}

/// Q8_1: Q8_0 plus `s = d * sum(q)` (f16) so that Q4_1/Q5_1 can add their offset in one step.
pub(crate) fn quantize_q8_1(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(32).zip(y.chunks_exact_mut(36)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in yb[4..].iter_mut().zip(xb) {
            let qi = (v * id).round() as i8;
            sum += qi as i32;
            *q = qi as u8;
        }
        put_f16(yb, 0, d);
        put_f16(yb, 2, sum as f32 * d);
    }
}

/// Rounds to nearest, ties to even, like ggml's `nearest_int` (valid for |v| < 2^22).
#[inline(always)]
pub(crate) fn nearest_int(v: f32) -> i32 {
    let f = v + 12582912.0;
    (f.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Q8_K: per 256 values, `d` (f32) from the value of largest magnitude, 256 i8 and 16 sums of
/// 16 (`bsums`, used by the K-quants to apply their mins).
pub(crate) fn quantize_q8_k(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(292)) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            yb.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in yb[4..4 + QK_K].iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8 as u8;
        }
        for j in 0..16 {
            let s: i32 = yb[4 + 16 * j..4 + 16 * j + 16]
                .iter()
                .map(|&q| q as i8 as i32)
                .sum();
            let off = 4 + QK_K + 2 * j;
            yb[off..off + 2].copy_from_slice(&(s as i16).to_le_bytes());
        }
        yb[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

pub(crate) fn quantize_f16(x: &[f32], y: &mut [u8]) {
    for (i, &v) in x.iter().enumerate() {
        put_f16(y, 2 * i, v);
    }
}

pub(crate) fn quantize_bf16(x: &[f32], y: &mut [u8]) {
    for (i, &v) in x.iter().enumerate() {
        y[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
    }
}

pub(crate) fn copy_f32(x: &[f32], y: &mut [u8]) {
    for (i, &v) in x.iter().enumerate() {
        y[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
}
