//! Scalar dequantization: the reference every SIMD and GPU kernel is compared against.
//!
//! Each `dequantize_block_*` function reproduces ggml's `dequantize_row_*` for one block,
//! including the order of its float operations (`(d * sc) * q - (dmin * m)`), so results are
//! bit-identical to llama.cpp's and gguf-py's. The loops are plain indexed loops over fixed-size
//! arrays, which the compiler unrolls and vectorises.

use super::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K, QuantBlock, f16_bits_to_f32, get_scale_min_k4, q3_k_scales,
    read_block_exact,
};
use super::{GgmlType, QK_K, QuantError};

/// Dequantizes one row: `dst.len()` elements (a multiple of `ty.block_size()`) from `src`, which
/// must be exactly `ty.row_bytes(dst.len())` bytes. `src` may have any alignment.
///
/// Supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
/// and Q8_K; other types give [`QuantError::UnsupportedType`].
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_lengths(ty, dst.len(), src.len())?;
    match ty {
        GgmlType::F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]).to_le());
            }
        }
        GgmlType::Bf16 => {
            // bf16 is the top half of an f32, so widening is a shift (what ggml and gguf-py do).
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        GgmlType::Q4_0 => each_block(src, dst, dequantize_block_q4_0),
        GgmlType::Q4_1 => each_block(src, dst, dequantize_block_q4_1),
        GgmlType::Q5_0 => each_block(src, dst, dequantize_block_q5_0),
        GgmlType::Q5_1 => each_block(src, dst, dequantize_block_q5_1),
        GgmlType::Q8_0 => each_block(src, dst, dequantize_block_q8_0),
        GgmlType::Q8_1 => each_block(src, dst, dequantize_block_q8_1),
        GgmlType::Q2K => each_block(src, dst, dequantize_block_q2_k),
        GgmlType::Q3K => each_block(src, dst, dequantize_block_q3_k),
        GgmlType::Q4K => each_block(src, dst, dequantize_block_q4_k),
        GgmlType::Q5K => each_block(src, dst, dequantize_block_q5_k),
        GgmlType::Q6K => each_block(src, dst, dequantize_block_q6_k),
        GgmlType::Q8K => each_block(src, dst, dequantize_block_q8_k),
        _ => {
            return Err(QuantError::UnsupportedType {
                ty,
                op: "dequantize",
            });
        }
    }
    Ok(())
}

/// Checks that `elements` is a whole number of blocks and `bytes` is exactly what they take.
pub(crate) fn check_lengths(ty: GgmlType, elements: usize, bytes: usize) -> Result<(), QuantError> {
    let bs = ty.block_size();
    let expected = (elements / bs).checked_mul(ty.type_size());
    match expected {
        Some(e) if elements.is_multiple_of(bs) && e == bytes => Ok(()),
        _ => Err(QuantError::BadLength {
            ty,
            elements,
            bytes,
            expected_bytes: if elements.is_multiple_of(bs) {
                expected.unwrap_or(0)
            } else {
                0
            },
        }),
    }
}

/// Runs a per-block function over matching chunks; lengths were checked by the caller.
#[inline(always)]
fn each_block<B: QuantBlock, const N: usize>(
    src: &[u8],
    dst: &mut [f32],
    f: fn(&B, &mut [f32; N]),
) {
    for (chunk, out) in src.chunks_exact(B::BYTES).zip(dst.chunks_exact_mut(N)) {
        let block = read_block_exact::<B>(chunk);
        // chunks_exact_mut(N) yields exactly N elements, so the conversion cannot fail.
        if let Ok(out) = <&mut [f32; N]>::try_from(out) {
            f(&block, out);
        }
    }
}

/// Q4_0: `y[j] = d * ((qs[j] & 15) - 8)`, `y[j + 16] = d * ((qs[j] >> 4) - 8)`.
pub fn dequantize_block_q4_0(b: &BlockQ4_0, y: &mut [f32; 32]) {
    let d = f16_bits_to_f32(b.d);
    for j in 0..16 {
        y[j] = ((b.qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: `y = q * d + m`.
pub fn dequantize_block_q4_1(b: &BlockQ4_1, y: &mut [f32; 32]) {
    let d = f16_bits_to_f32(b.d);
    let m = f16_bits_to_f32(b.m);
    for j in 0..16 {
        y[j] = (b.qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (b.qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0: `y = (q5 - 16) * d`, fifth bit of element `j` in bit `j` of `qh`.
pub fn dequantize_block_q5_0(b: &BlockQ5_0, y: &mut [f32; 32]) {
    let d = f16_bits_to_f32(b.d);
    let qh = u32::from_le_bytes(b.qh);
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((b.qs[j] & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((b.qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: `y = q5 * d + m`.
pub fn dequantize_block_q5_1(b: &BlockQ5_1, y: &mut [f32; 32]) {
    let d = f16_bits_to_f32(b.d);
    let m = f16_bits_to_f32(b.m);
    let qh = u32::from_le_bytes(b.qh);
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((b.qs[j] & 0xF) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((b.qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// Q8_0: `y = q * d`.
pub fn dequantize_block_q8_0(b: &BlockQ8_0, y: &mut [f32; 32]) {
    let d = f16_bits_to_f32(b.d);
    for (y, &q) in y.iter_mut().zip(&b.qs) {
        *y = q as f32 * d;
    }
}

/// Q8_1: `y = q * d` (`s` is only used by dot products).
pub fn dequantize_block_q8_1(b: &BlockQ8_1, y: &mut [f32; 32]) {
    let d = f16_bits_to_f32(b.d);
    for (y, &q) in y.iter_mut().zip(&b.qs) {
        *y = q as f32 * d;
    }
}

/// Q2_K: each 128-weight half uses 32 bytes of `qs`; within it, shift `2 k` (k = 0..4) gives
/// weights `32 k .. 32 k + 32`, whose two 16-weight groups take consecutive `scales` entries.
pub fn dequantize_block_q2_k(b: &BlockQ2K, y: &mut [f32; QK_K]) {
    let d = f16_bits_to_f32(b.d);
    let dmin = f16_bits_to_f32(b.dmin);
    for half in 0..2 {
        let q = &b.qs[32 * half..32 * half + 32];
        for k in 0..4 {
            let shift = 2 * k;
            for g in 0..2 {
                let sc = b.scales[8 * half + 2 * k + g];
                let dl = d * (sc & 0xF) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let base = 128 * half + 32 * k + 16 * g;
                for l in 0..16 {
                    y[base + l] = dl * ((q[16 * g + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// Q3_K: as Q2_K for the low two bits; the third bit comes from `hmask` (bit `e / 32` of byte
/// `e % 32`) and, when clear, subtracts 4.
pub fn dequantize_block_q3_k(b: &BlockQ3K, y: &mut [f32; QK_K]) {
    let d_all = f16_bits_to_f32(b.d);
    let scales = q3_k_scales(&b.scales);
    for half in 0..2 {
        let q = &b.qs[32 * half..32 * half + 32];
        for k in 0..4 {
            let shift = 2 * k;
            let hbit = 4 * half + k;
            for g in 0..2 {
                let dl = d_all * scales[8 * half + 2 * k + g] as f32;
                let base = 128 * half + 32 * k + 16 * g;
                for l in 0..16 {
                    let low = ((q[16 * g + l] >> shift) & 3) as i32;
                    let high = (b.hmask[16 * g + l] >> hbit) & 1;
                    let v = low - if high != 0 { 0 } else { 4 };
                    y[base + l] = dl * v as f32;
                }
            }
        }
    }
}

/// Q4_K: each 64 weights use 32 bytes of `qs`, low nibbles for the first 32 (scale pair `2 i`)
/// and high nibbles for the next 32 (pair `2 i + 1`).
pub fn dequantize_block_q4_k(b: &BlockQ4K, y: &mut [f32; QK_K]) {
    let d = f16_bits_to_f32(b.d);
    let dmin = f16_bits_to_f32(b.dmin);
    for i in 0..4 {
        let (sc1, m1) = get_scale_min_k4(2 * i, &b.scales);
        let (sc2, m2) = get_scale_min_k4(2 * i + 1, &b.scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &b.qs[32 * i..32 * i + 32];
        for l in 0..32 {
            y[64 * i + l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[64 * i + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: Q4_K's layout plus a fifth bit, element `e` in bit `e / 32` of `qh[e % 32]`.
pub fn dequantize_block_q5_k(b: &BlockQ5K, y: &mut [f32; QK_K]) {
    let d = f16_bits_to_f32(b.d);
    let dmin = f16_bits_to_f32(b.dmin);
    for i in 0..4 {
        let (sc1, m1) = get_scale_min_k4(2 * i, &b.scales);
        let (sc2, m2) = get_scale_min_k4(2 * i + 1, &b.scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &b.qs[32 * i..32 * i + 32];
        for l in 0..32 {
            let h1 = ((b.qh[l] >> (2 * i)) & 1) << 4;
            let h2 = ((b.qh[l] >> (2 * i + 1)) & 1) << 4;
            y[64 * i + l] = d1 * ((q[l] & 0xF) | h1) as f32 - m1;
            y[64 * i + 32 + l] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

/// Q6_K: each 128 weights use 64 bytes of `ql` and 32 of `qh`; weight `32 k + l` (k = 0..4)
/// takes nibble `k / 2` of `ql[l + 32 (k % 2)]` and bits `2 k ..= 2 k + 1` of `qh[l]`.
pub fn dequantize_block_q6_k(b: &BlockQ6K, y: &mut [f32; QK_K]) {
    let d = f16_bits_to_f32(b.d);
    for half in 0..2 {
        let ql = &b.ql[64 * half..64 * half + 64];
        let qh = &b.qh[32 * half..32 * half + 32];
        let sc = &b.scales[8 * half..8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
        }
    }
}

/// Q8_K: `y = d * q`.
pub fn dequantize_block_q8_k(b: &BlockQ8K, y: &mut [f32; QK_K]) {
    let d = f32::from_bits(u32::from_le(b.d.to_bits()));
    for (y, &q) in y.iter_mut().zip(&b.qs) {
        *y = d * q as f32;
    }
}
