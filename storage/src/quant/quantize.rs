//! Reference quantizers.
//!
//! F16, BF16 and Q4_0 … Q8_1 and Q8_K reproduce llama.cpp's `quantize_row_*_ref` (round to
//! nearest, same float operations), so activations quantized here match what llama.cpp's
//! kernels would see bit for bit. Q2_K … Q6_K use the same search llama.cpp's reference
//! quantizers use for the scales (`make_qkx2_quants` for the affine types, a least-squares
//! search for the symmetric ones) without importance weights: sound, not state of the art —
//! they exist for tests and for writing random-weight models.

use super::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K, QuantBlock, blocks_as_bytes, f32_to_f16_bits, pack_q3_k_scales,
    pack_scale_min_k4,
};
use super::dequant::check_lengths;
use super::{GgmlType, QK_K, QuantError};

/// Quantizes one row: `src.len()` elements (a multiple of `ty.block_size()`) into `dst`, which
/// must be exactly `ty.row_bytes(src.len())` bytes. `dst` may have any alignment.
///
/// Supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
/// and Q8_K; other types give [`QuantError::UnsupportedType`].
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_lengths(ty, src.len(), dst.len())?;
    match ty {
        GgmlType::F32 => {
            for (x, o) in src.iter().zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (x, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&half::f16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        GgmlType::Bf16 => {
            // half's conversion is ggml's `ggml_compute_fp32_to_bf16`: NaN made quiet, otherwise
            // round to nearest even.
            for (x, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        GgmlType::Q4_0 => each_block(src, dst, quantize_block_q4_0),
        GgmlType::Q4_1 => each_block(src, dst, quantize_block_q4_1),
        GgmlType::Q5_0 => each_block(src, dst, quantize_block_q5_0),
        GgmlType::Q5_1 => each_block(src, dst, quantize_block_q5_1),
        GgmlType::Q8_0 => each_block(src, dst, quantize_block_q8_0),
        GgmlType::Q8_1 => each_block(src, dst, quantize_block_q8_1),
        GgmlType::Q2K => each_block(src, dst, quantize_block_q2_k),
        GgmlType::Q3K => each_block(src, dst, quantize_block_q3_k),
        GgmlType::Q4K => each_block(src, dst, quantize_block_q4_k),
        GgmlType::Q5K => each_block(src, dst, quantize_block_q5_k),
        GgmlType::Q6K => each_block(src, dst, quantize_block_q6_k),
        GgmlType::Q8K => each_block(src, dst, quantize_block_q8_k),
        _ => {
            return Err(QuantError::UnsupportedType { ty, op: "quantize" });
        }
    }
    Ok(())
}

/// Runs a per-block quantizer over matching chunks; lengths were checked by the caller.
#[inline(always)]
fn each_block<B: QuantBlock, const N: usize>(src: &[f32], dst: &mut [u8], f: fn(&[f32; N]) -> B) {
    for (x, out) in src.chunks_exact(N).zip(dst.chunks_exact_mut(B::BYTES)) {
        // chunks_exact(N) yields exactly N elements, so the conversion cannot fail.
        if let Ok(x) = <&[f32; N]>::try_from(x) {
            out.copy_from_slice(blocks_as_bytes(std::slice::from_ref(&f(x))));
        }
    }
}

/// ggml's `nearest_int`: round half to even (exact for the magnitudes quantizers produce).
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// The element of largest magnitude, with its sign (the first one on ties, as ggml scans).
#[inline(always)]
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    (min, max)
}

#[inline(always)]
fn inverse(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Q4_0 (`quantize_row_q4_0_ref`): the largest-magnitude element maps to −8.
pub fn quantize_block_q4_0(x: &[f32; 32]) -> BlockQ4_0 {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let x0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let x1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        qs[j] = x0 | (x1 << 4);
    }
    BlockQ4_0 {
        d: f32_to_f16_bits(d),
        qs,
    }
}

/// Q4_1 (`quantize_row_q4_1_ref`): min and max map to 0 and 15.
pub fn quantize_block_q4_1(x: &[f32; 32]) -> BlockQ4_1 {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let x0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let x1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        qs[j] = x0 | (x1 << 4);
    }
    BlockQ4_1 {
        d: f32_to_f16_bits(d),
        m: f32_to_f16_bits(min),
        qs,
    }
}

/// Q5_0 (`quantize_row_q5_0_ref`): the largest-magnitude element maps to −16.
pub fn quantize_block_q5_0(x: &[f32; 32]) -> BlockQ5_0 {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    let mut qs = [0u8; 16];
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let x1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        qs[j] = (x0 & 0xF) | ((x1 & 0xF) << 4);
        qh |= u32::from(x0 >> 4) << j;
        qh |= u32::from(x1 >> 4) << (j + 16);
    }
    BlockQ5_0 {
        d: f32_to_f16_bits(d),
        qh: qh.to_le_bytes(),
        qs,
    }
}

/// Q5_1 (`quantize_row_q5_1_ref`): min and max map to 0 and 31.
pub fn quantize_block_q5_1(x: &[f32; 32]) -> BlockQ5_1 {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    let mut qs = [0u8; 16];
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = (((x[j] - min) * id + 0.5) as u8).min(31);
        let x1 = (((x[j + 16] - min) * id + 0.5) as u8).min(31);
        qs[j] = (x0 & 0xF) | ((x1 & 0xF) << 4);
        qh |= u32::from(x0 >> 4) << j;
        qh |= u32::from(x1 >> 4) << (j + 16);
    }
    BlockQ5_1 {
        d: f32_to_f16_bits(d),
        m: f32_to_f16_bits(min),
        qh: qh.to_le_bytes(),
        qs,
    }
}

/// Q8_0 (`quantize_row_q8_0_ref`): `d = amax / 127`, quants rounded half away from zero.
pub fn quantize_block_q8_0(x: &[f32; 32]) -> BlockQ8_0 {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    let qs = std::array::from_fn(|j| (x[j] * id).round() as i8);
    BlockQ8_0 {
        d: f32_to_f16_bits(d),
        qs,
    }
}

/// Q8_1 (`quantize_row_q8_1_ref`): as Q8_0, plus `s = d * sum(qs)`.
pub fn quantize_block_q8_1(x: &[f32; 32]) -> BlockQ8_1 {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    let qs: [i8; 32] = std::array::from_fn(|j| (x[j] * id).round() as i8);
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    BlockQ8_1 {
        d: f32_to_f16_bits(d),
        s: f32_to_f16_bits(sum as f32 * d),
        qs,
    }
}

/// Q8_K (`quantize_row_q8_K_ref`): the largest-magnitude element maps to −127, `d` is stored
/// as f32, and `bsums` holds the sum of each 16 quants.
pub fn quantize_block_q8_k(x: &[f32; QK_K]) -> BlockQ8K {
    let max = signed_absmax(x);
    let mut b = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    if max == 0.0 {
        return b;
    }
    let iscale = -127.0 / max;
    for (q, &v) in b.qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).clamp(-128, 127) as i8;
    }
    for (j, s) in b.bsums.iter_mut().enumerate() {
        let sum: i32 = b.qs[16 * j..16 * j + 16]
            .iter()
            .map(|&q| i32::from(q))
            .sum();
        *s = (sum as i16).to_le();
    }
    b.d = f32::from_bits((1.0 / iscale).to_bits().to_le());
    b
}

/// llama.cpp's `make_qkx2_quants`: finds `scale` and `min <= 0` so that
/// `x ≈ scale * L + min` with `L` in `0..=nmax`, trying `nstep + 1` scales around
/// `nmax / (max - min)` and refining each by weighted least squares. Returns `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, max) = min_max(x);
    let sum_w: f32 = weights.iter().sum();
    let sum_x: f32 = x.iter().zip(weights).map(|(x, w)| w * x).sum();
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        best_error += weights[i] * err(scale * l as f32 + min - x[i]);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error: f32 = (0..n)
                .map(|i| weights[i] * err(this_scale * laux[i] as f32 + this_min - x[i]))
                .sum();
            if cur_error < best_error {
                l_out.copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Symmetric scale search for Q3_K/Q6_K: `x ≈ scale * L` with `L` in `-nmax..nmax`. Tries
/// scales around `-nmax / max` (so the largest magnitude lands on `-nmax`, the only end with
/// room) and keeps the least-squares scale of the choice with the smallest squared error.
fn make_symmetric_scale(x: &[f32], nmax: i32) -> f32 {
    let max = signed_absmax(x);
    if max == 0.0 {
        return 0.0;
    }
    let mut best = (f32::INFINITY, 0.0f32);
    for is in -9..=9 {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (mut sum_xl, mut sum_l2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            sum_xl += v * l;
            sum_l2 += l * l;
        }
        if sum_l2 <= 0.0 {
            continue;
        }
        let scale = sum_xl / sum_l2;
        let id = inverse(scale);
        let error: f32 = x
            .iter()
            .map(|&v| {
                let l = nearest_int(id * v).clamp(-nmax, nmax - 1) as f32;
                (scale * l - v) * (scale * l - v)
            })
            .sum();
        if error < best.0 {
            best = (error, scale);
        }
    }
    best.1
}

/// Quantizes per-group `(scale, min)` pairs to `bits`-bit integers under one f16 super-scale
/// each, returning `(d bits, dmin bits, scale ints, min ints)`.
fn quantize_super_scales<const G: usize>(
    scales: &[f32; G],
    mins: &[f32; G],
    qmax: f32,
) -> (u16, u16, [u8; G], [u8; G]) {
    let max_scale = scales.iter().fold(0.0f32, |a, &s| a.max(s));
    let max_min = mins.iter().fold(0.0f32, |a, &m| a.max(m));
    let inv_scale = if max_scale > 0.0 {
        qmax / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { qmax / max_min } else { 0.0 };
    let ls =
        std::array::from_fn(|j| nearest_int(inv_scale * scales[j]).clamp(0, qmax as i32) as u8);
    let lm = std::array::from_fn(|j| nearest_int(inv_min * mins[j]).clamp(0, qmax as i32) as u8);
    (
        f32_to_f16_bits(max_scale / qmax),
        f32_to_f16_bits(max_min / qmax),
        ls,
        lm,
    )
}

/// Requantizes group `x` against the final (f16-rounded) scale and min.
#[inline(always)]
fn affine_levels(x: &[f32], d: f32, dm: f32, nmax: i32, out: &mut [u8]) {
    let id = inverse(d);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = nearest_int((v + dm) * id).clamp(0, nmax) as u8;
    }
}

/// Q2_K: 16 groups of 16, 4-bit scales and mins, mean-absolute-error search (as llama.cpp).
pub fn quantize_block_q2_k(x: &[f32; QK_K]) -> BlockQ2K {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    for g in 0..16 {
        let xs = &x[16 * g..16 * g + 16];
        let w: [f32; 16] = std::array::from_fn(|i| xs[i].abs());
        (scales[g], mins[g]) =
            make_qkx2_quants(xs, &w, 3, &mut l[16 * g..16 * g + 16], -0.5, 0.1, 15, true);
    }
    let (d, dmin, ls, lm) = quantize_super_scales(&scales, &mins, 15.0);
    let (df, dminf) = (
        super::blocks::f16_bits_to_f32(d),
        super::blocks::f16_bits_to_f32(dmin),
    );
    let mut b = BlockQ2K {
        scales: std::array::from_fn(|g| ls[g] | (lm[g] << 4)),
        qs: [0; 64],
        d,
        dmin,
    };
    for g in 0..16 {
        let dl = df * ls[g] as f32;
        if dl == 0.0 {
            continue;
        }
        affine_levels(
            &x[16 * g..16 * g + 16],
            dl,
            dminf * lm[g] as f32,
            3,
            &mut l[16 * g..16 * g + 16],
        );
    }
    for half in 0..2 {
        for i in 0..32 {
            let e = 128 * half + i;
            b.qs[32 * half + i] = l[e] | (l[e + 32] << 2) | (l[e + 64] << 4) | (l[e + 96] << 6);
        }
    }
    b
}

/// Q3_K: 16 groups of 16, signed 6-bit scales, quants in −4..=3.
pub fn quantize_block_q3_k(x: &[f32; QK_K]) -> BlockQ3K {
    let scales: [f32; 16] =
        std::array::from_fn(|g| make_symmetric_scale(&x[16 * g..16 * g + 16], 4));
    let max_scale = signed_absmax(&scales);
    let mut b = BlockQ3K {
        hmask: [0; 32],
        qs: [0; 64],
        scales: [0; 12],
        d: 0,
    };
    if max_scale == 0.0 {
        b.scales = pack_q3_k_scales(&[0; 16]);
        return b;
    }
    let iscale = -32.0 / max_scale;
    let ls: [i8; 16] =
        std::array::from_fn(|g| nearest_int(iscale * scales[g]).clamp(-32, 31) as i8);
    b.scales = pack_q3_k_scales(&ls);
    b.d = f32_to_f16_bits(1.0 / iscale);
    let d = super::blocks::f16_bits_to_f32(b.d);
    let mut l = [4u8; QK_K];
    for ((lg, xg), &s) in l.chunks_exact_mut(16).zip(x.chunks_exact(16)).zip(&ls) {
        let dl = d * s as f32;
        if dl == 0.0 {
            continue;
        }
        for (o, &v) in lg.iter_mut().zip(xg) {
            *o = (nearest_int(v / dl).clamp(-4, 3) + 4) as u8;
        }
    }
    for (e, &v) in l.iter().enumerate() {
        if v > 3 {
            b.hmask[e % 32] |= 1 << (e / 32);
        }
    }
    for half in 0..2 {
        for i in 0..32 {
            let e = 128 * half + i;
            let q = |k: usize| l[e + 32 * k] & 3;
            b.qs[32 * half + i] = q(0) | (q(1) << 2) | (q(2) << 4) | (q(3) << 6);
        }
    }
    b
}

/// Scales and levels of Q4_K/Q5_K: 8 groups of 32, `make_qkx2_quants` with llama.cpp's
/// weights `rms(x) + |x|`, then 6-bit scales and mins under f16 super-scales.
fn quantize_k_affine(
    x: &[f32; QK_K],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> (u16, u16, [u8; 12], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for g in 0..8 {
        let xs = &x[32 * g..32 * g + 32];
        let av_x = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        (scales[g], mins[g]) = make_qkx2_quants(
            xs,
            &w,
            nmax,
            &mut l[32 * g..32 * g + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
    }
    let (d, dmin, ls, lm) = quantize_super_scales(&scales, &mins, 63.0);
    let (df, dminf) = (
        super::blocks::f16_bits_to_f32(d),
        super::blocks::f16_bits_to_f32(dmin),
    );
    for g in 0..8 {
        let dl = df * ls[g] as f32;
        if dl == 0.0 {
            continue;
        }
        affine_levels(
            &x[32 * g..32 * g + 32],
            dl,
            dminf * lm[g] as f32,
            nmax,
            &mut l[32 * g..32 * g + 32],
        );
    }
    (d, dmin, pack_scale_min_k4(&ls, &lm), l)
}

/// Q4_K: 8 groups of 32, 6-bit scales and mins, quants in 0..=15.
pub fn quantize_block_q4_k(x: &[f32; QK_K]) -> BlockQ4K {
    let (d, dmin, scales, l) = quantize_k_affine(x, 15, -1.0, 20);
    let mut qs = [0u8; 128];
    for i in 0..4 {
        for j in 0..32 {
            qs[32 * i + j] = l[64 * i + j] | (l[64 * i + 32 + j] << 4);
        }
    }
    BlockQ4K {
        d,
        dmin,
        scales,
        qs,
    }
}

/// Q5_K: as Q4_K with quants in 0..=31, the fifth bit in `qh`.
pub fn quantize_block_q5_k(x: &[f32; QK_K]) -> BlockQ5K {
    let (d, dmin, scales, l) = quantize_k_affine(x, 31, -0.5, 15);
    let mut qs = [0u8; 128];
    let mut qh = [0u8; 32];
    for i in 0..4 {
        for j in 0..32 {
            let (l1, l2) = (l[64 * i + j], l[64 * i + 32 + j]);
            qs[32 * i + j] = (l1 & 0xF) | ((l2 & 0xF) << 4);
            qh[j] |= ((l1 >> 4) << (2 * i)) | ((l2 >> 4) << (2 * i + 1));
        }
    }
    BlockQ5K {
        d,
        dmin,
        scales,
        qh,
        qs,
    }
}

/// Q6_K: 16 groups of 16, signed 8-bit scales, quants in −32..=31.
pub fn quantize_block_q6_k(x: &[f32; QK_K]) -> BlockQ6K {
    let scales: [f32; 16] =
        std::array::from_fn(|g| make_symmetric_scale(&x[16 * g..16 * g + 16], 32));
    let max_scale = signed_absmax(&scales);
    let mut b = BlockQ6K {
        ql: [0; 128],
        qh: [0; 64],
        scales: [0; 16],
        d: 0,
    };
    let mut l = [32u8; QK_K];
    if max_scale != 0.0 {
        let iscale = -128.0 / max_scale;
        b.scales = std::array::from_fn(|g| nearest_int(iscale * scales[g]).clamp(-128, 127) as i8);
        b.d = f32_to_f16_bits(1.0 / iscale);
        let d = super::blocks::f16_bits_to_f32(b.d);
        for g in 0..16 {
            let dl = d * b.scales[g] as f32;
            if dl == 0.0 {
                continue;
            }
            for i in 16 * g..16 * g + 16 {
                l[i] = (nearest_int(x[i] / dl).clamp(-32, 31) + 32) as u8;
            }
        }
    }
    for half in 0..2 {
        let e = 128 * half;
        for i in 0..32 {
            let q = |k: usize| l[e + 32 * k + i];
            b.ql[64 * half + i] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
            b.ql[64 * half + 32 + i] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
            b.qh[32 * half + i] =
                (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
    b
}
