//! Scalar dot products of one weight row with one activation row, both as block bytes.
//!
//! `n` is the number of elements (a multiple of the weight's block size); `w` holds the row's
//! blocks and `a` the activation in the partner format. Integer sums are exact; scales are
//! applied per block in f32 as ggml does.

use super::{f16_at, f32_at, scale_min_k4};
use strata_storage::quant::QK_K;

#[inline(always)]
fn q8(a: &[u8], i: usize) -> i32 {
    a[i] as i8 as i32
}

pub(crate) fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    (0..n).map(|i| f32_at(w, 4 * i) * f32_at(a, 4 * i)).sum()
}

pub(crate) fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    (0..n).map(|i| f16_at(w, 2 * i) * f16_at(a, 2 * i)).sum()
}

pub(crate) fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let bf = |b: &[u8], i: usize| {
        f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16)
    };
    (0..n).map(|i| bf(w, i) * bf(a, i)).sum()
}

pub(crate) fn dot_q4_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(18).zip(a.chunks_exact(34)).take(n / 32) {
        let mut s = 0i32;
        for j in 0..16 {
            s += ((x[2 + j] & 0xF) as i32 - 8) * q8(y, 2 + j);
            s += ((x[2 + j] >> 4) as i32 - 8) * q8(y, 2 + j + 16);
        }
        sum += s as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

pub(crate) fn dot_q4_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(20).zip(a.chunks_exact(36)).take(n / 32) {
        let mut s = 0i32;
        for j in 0..16 {
            s += (x[4 + j] & 0xF) as i32 * q8(y, 4 + j);
            s += (x[4 + j] >> 4) as i32 * q8(y, 4 + j + 16);
        }
        sum += s as f32 * (f16_at(x, 0) * f16_at(y, 0)) + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

pub(crate) fn dot_q5_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(22).zip(a.chunks_exact(34)).take(n / 32) {
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        let mut s = 0i32;
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            s += (((x[6 + j] & 0xF) as u32 | h0) as i32 - 16) * q8(y, 2 + j);
            s += (((x[6 + j] >> 4) as u32 | h1) as i32 - 16) * q8(y, 2 + j + 16);
        }
        sum += s as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

pub(crate) fn dot_q5_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(24).zip(a.chunks_exact(36)).take(n / 32) {
        let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
        let mut s = 0i32;
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            s += ((x[8 + j] & 0xF) as u32 | h0) as i32 * q8(y, 4 + j);
            s += ((x[8 + j] >> 4) as u32 | h1) as i32 * q8(y, 4 + j + 16);
        }
        sum += s as f32 * (f16_at(x, 0) * f16_at(y, 0)) + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

pub(crate) fn dot_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(34).zip(a.chunks_exact(34)).take(n / 32) {
        let s: i32 = (0..32).map(|j| q8(x, 2 + j) * q8(y, 2 + j)).sum();
        sum += s as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

/// Q8_K block fields: `d` at 0, `qs` at 4, `bsums` at 260.
#[inline(always)]
fn bsum(y: &[u8], j: usize) -> i32 {
    i16::from_le_bytes([y[260 + 2 * j], y[261 + 2 * j]]) as i32
}

pub(crate) fn dot_q2_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    // Block: scales[16] @0, qs[64] @16, d @80, dmin @82.
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(84).zip(a.chunks_exact(292)).take(n / QK_K) {
        let dy = f32_at(y, 0);
        let mut summs = 0i32;
        for (j, &sc) in x[..16].iter().enumerate() {
            summs += (sc >> 4) as i32 * bsum(y, j);
        }
        let mut isum = 0i32;
        let mut is = 0;
        for half in 0..2 {
            let q = &x[16 + 32 * half..16 + 32 * half + 32];
            for shift in [0, 2, 4, 6] {
                for part in 0..2 {
                    let sc = (x[is] & 0xF) as i32;
                    is += 1;
                    let base = 4 + half * 128 + (shift / 2) * 32 + part * 16;
                    let s: i32 = (0..16)
                        .map(|l| ((q[part * 16 + l] >> shift) & 3) as i32 * q8(y, base + l))
                        .sum();
                    isum += sc * s;
                }
            }
        }
        sum += dy * f16_at(x, 80) * isum as f32 - dy * f16_at(x, 82) * summs as f32;
    }
    sum
}

/// The 16 signed 6-bit scales of a Q3_K block (ggml's kmask unpacking), minus 32.
pub(crate) fn q3_k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for j in 0..16 {
        let low = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let high = (s[8 + (j % 4)] >> (2 * (j / 4))) & 3;
        out[j] = ((low | (high << 4)) as i8).wrapping_sub(32);
    }
    out
}

pub(crate) fn dot_q3_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    // Block: hmask[32] @0, qs[64] @32, scales[12] @96, d @108.
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(110).zip(a.chunks_exact(292)).take(n / QK_K) {
        let scales = q3_k_scales(&x[96..108]);
        let hm = &x[0..32];
        let mut isum = 0i32;
        let mut is = 0;
        let mut m = 1u8;
        for half in 0..2 {
            let q = &x[32 + 32 * half..32 + 32 * half + 32];
            for shift in [0, 2, 4, 6] {
                for part in 0..2 {
                    let base = 4 + half * 128 + (shift / 2) * 32 + part * 16;
                    let s: i32 = (0..16)
                        .map(|l| {
                            let k = part * 16 + l;
                            let v =
                                ((q[k] >> shift) & 3) as i32 - if hm[k] & m != 0 { 0 } else { 4 };
                            v * q8(y, base + l)
                        })
                        .sum();
                    isum += scales[is] as i32 * s;
                    is += 1;
                }
                m <<= 1;
            }
        }
        sum += f32_at(y, 0) * f16_at(x, 108) * isum as f32;
    }
    sum
}

pub(crate) fn dot_q4_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    // Block: d @0, dmin @2, scales[12] @4, qs[128] @16.
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(144).zip(a.chunks_exact(292)).take(n / QK_K) {
        let sc = &x[4..16];
        let mut isum = 0i32;
        let mut summs = 0i32;
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, sc);
            summs += m as i32 * (bsum(y, 2 * j) + bsum(y, 2 * j + 1));
            let q = &x[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
            let shift = 4 * (j % 2);
            let d: i32 = (0..32)
                .map(|l| ((q[l] >> shift) & 0xF) as i32 * q8(y, 4 + 32 * j + l))
                .sum();
            isum += s as i32 * d;
        }
        let dy = f32_at(y, 0);
        sum += dy * f16_at(x, 0) * isum as f32 - dy * f16_at(x, 2) * summs as f32;
    }
    sum
}

pub(crate) fn dot_q5_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    // Block: d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48.
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(176).zip(a.chunks_exact(292)).take(n / QK_K) {
        let sc = &x[4..16];
        let qh = &x[16..48];
        let mut isum = 0i32;
        let mut summs = 0i32;
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, sc);
            summs += m as i32 * (bsum(y, 2 * j) + bsum(y, 2 * j + 1));
            let q = &x[48 + 32 * (j / 2)..48 + 32 * (j / 2) + 32];
            let shift = 4 * (j % 2);
            let d: i32 = (0..32)
                .map(|l| {
                    let v = ((q[l] >> shift) & 0xF) as i32 + (((qh[l] >> j) & 1) as i32) * 16;
                    v * q8(y, 4 + 32 * j + l)
                })
                .sum();
            isum += s as i32 * d;
        }
        let dy = f32_at(y, 0);
        sum += dy * f16_at(x, 0) * isum as f32 - dy * f16_at(x, 2) * summs as f32;
    }
    sum
}

pub(crate) fn dot_q6_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    // Block: ql[128] @0, qh[64] @128, scales[16] (i8) @192, d @208.
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)).take(n / QK_K) {
        let mut isum = 0i32;
        for half in 0..2 {
            let ql = &x[64 * half..64 * half + 64];
            let qh = &x[128 + 32 * half..128 + 32 * half + 32];
            let sc = &x[192 + 8 * half..192 + 8 * half + 8];
            let base = 4 + 128 * half;
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                isum += sc[is] as i8 as i32 * q1 * q8(y, base + l);
                isum += sc[is + 2] as i8 as i32 * q2 * q8(y, base + l + 32);
                isum += sc[is + 4] as i8 as i32 * q3 * q8(y, base + l + 64);
                isum += sc[is + 6] as i8 as i32 * q4 * q8(y, base + l + 96);
            }
        }
        sum += f32_at(y, 0) * f16_at(x, 208) * isum as f32;
    }
    sum
}
