//! AVX-512 kernels. Where 512-bit vectors buy nothing over AVX2 (the K-quant dot products
//! work on 32-byte groups) the dispatch table keeps the AVX2 kernel, as llama.cpp does; what
//! lives here is what the wider or newer instructions make faster:
//!
//! - `dot_f32`: 512-bit FMA.
//! - the legacy 32-element blocks with VNNI: one `vpdpbusd` replaces `maddubs` + `madd`.
//! - Q4_K and Q6_K with VNNI on 512-bit vectors: decode streams every weight byte once, and
//!   these halve the instructions per byte of the AVX2 kernels (two 32-element groups per
//!   vector, `vpdpwssd` fusing the scale multiply with the accumulation).
//!
//! Contract of every `unsafe fn`: the CPU has the features named in its `target_feature`, and
//! the slices hold at least the bytes of `n` elements in their formats.

use std::arch::x86_64::*;

use strata_storage::quant::QK_K;

use super::avx2::{bits32, f16x8, f32_at, hsum_f32x8, load, nibbles32, unpack_scales_mins_k4};
use super::interleaved::prefetch_block;
use crate::tune::Ahead;

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")]
pub(crate) unsafe fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (x, y) = (w.as_ptr().cast::<f32>(), a.as_ptr().cast::<f32>());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 16k + 16 <= n elements are readable in both rows.
            let (xv, yv) = unsafe {
                (
                    _mm512_loadu_ps(x.add(i + 16 * k)),
                    _mm512_loadu_ps(y.add(i + 16 * k)),
                )
            };
            *acc = _mm512_fmadd_ps(xv, yv, *acc);
        }
        i += 64;
    }
    while i + 16 <= n {
        // SAFETY: i + 16 <= n.
        let (xv, yv) = unsafe { (_mm512_loadu_ps(x.add(i)), _mm512_loadu_ps(y.add(i))) };
        acc[0] = _mm512_fmadd_ps(xv, yv, acc[0]);
        i += 16;
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let mut sum = _mm512_reduce_add_ps(s);
    while i < n {
        // SAFETY: i < n.
        sum += unsafe { x.add(i).read_unaligned() * y.add(i).read_unaligned() };
        i += 1;
    }
    sum
}

/// Signed x signed byte dot products via `vpdpbusd` (which is unsigned x signed): |x| times
/// y carrying x's sign.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
fn mul_sum_i8_pairs_f32(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
fn mul_sum_us8_pairs_f32(ax: __m256i, sy: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy))
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..n / 32 {
        // SAFETY: block i (34 bytes) is inside both rows.
        unsafe {
            let x = w.as_ptr().add(34 * i);
            let y = a.as_ptr().add(34 * i);
            let d = _mm256_mul_ps(f16x8(x), f16x8(y));
            let q = mul_sum_i8_pairs_f32(load(x.add(2)), load(y.add(2)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q4_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let off = _mm256_set1_epi8(8);
    for i in 0..n / 32 {
        // SAFETY: block i is inside both rows (18 and 34 bytes).
        unsafe {
            let x = w.as_ptr().add(18 * i);
            let y = a.as_ptr().add(34 * i);
            let d = _mm256_mul_ps(f16x8(x), f16x8(y));
            let qx = _mm256_sub_epi8(nibbles32(x.add(2)), off);
            let q = mul_sum_i8_pairs_f32(qx, load(y.add(2)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q5_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let f0 = _mm256_set1_epi8(0xF0u8 as i8);
    for i in 0..n / 32 {
        // SAFETY: block i is inside both rows (22 and 34 bytes).
        unsafe {
            let x = w.as_ptr().add(22 * i);
            let y = a.as_ptr().add(34 * i);
            let d = _mm256_mul_ps(f16x8(x), f16x8(y));
            let hi = _mm256_andnot_si256(bits32(x.add(2)), f0);
            let qx = _mm256_or_si256(nibbles32(x.add(6)), hi);
            let q = mul_sum_i8_pairs_f32(qx, load(y.add(2)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q4_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = _mm256_setzero_ps();
    for i in 0..n / 32 {
        // SAFETY: block i is inside both rows (20 and 36 bytes).
        unsafe {
            let x = w.as_ptr().add(20 * i);
            let y = a.as_ptr().add(36 * i);
            summs = _mm256_fmadd_ps(f16x8(x.add(2)), f16x8(y.add(2)), summs);
            let d = _mm256_mul_ps(f16x8(x), f16x8(y));
            let q = mul_sum_us8_pairs_f32(nibbles32(x.add(4)), load(y.add(4)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc) + _mm256_cvtss_f32(summs)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q5_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = _mm256_setzero_ps();
    let b4 = _mm256_set1_epi8(0x10);
    for i in 0..n / 32 {
        // SAFETY: block i is inside both rows (24 and 36 bytes).
        unsafe {
            let x = w.as_ptr().add(24 * i);
            let y = a.as_ptr().add(36 * i);
            summs = _mm256_fmadd_ps(f16x8(x.add(2)), f16x8(y.add(2)), summs);
            let d = _mm256_mul_ps(f16x8(x), f16x8(y));
            let hi = _mm256_and_si256(bits32(x.add(4)), b4);
            let qx = _mm256_or_si256(nibbles32(x.add(8)), hi);
            let q = mul_sum_us8_pairs_f32(qx, load(y.add(4)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc) + _mm256_cvtss_f32(summs)
}

/// Loads 64 bytes from `p`.
///
/// # Safety
/// `p` must be valid for reading 64 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn load512(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 64 readable bytes; loadu needs no alignment.
    unsafe { _mm512_loadu_si512(p.cast()) }
}

/// `vpermw` indices that put 16-bit lane `lo` in the low 256 bits and `hi` in the high 256.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")]
fn idx_halves(lo: i16, hi: i16) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi16(lo)),
        _mm256_set1_epi16(hi),
    )
}

/// The 16 i32 lanes of `v` folded to 8 (exact: integer adds).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")]
fn fold_i32x16(v: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
}

/// Q4_K against Q8_K, 512 bits at a time.
///
/// A 64-byte load of `qs` holds two 32-byte groups: its low nibbles are elements
/// `[0..32 | 64..96]` of the 128 it covers, its high nibbles `[32..64 | 96..128]`; the
/// activations are recombined to match, and each half takes its group's scale through
/// `vpermw`. The same arithmetic, lane for lane, as `multi::vnni::q4_k` for one token.
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q4_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    // SAFETY: forwarded.
    unsafe { q4_k_row::<false>(n, w, a, Ahead::NONE) }
}

/// As [`dot_q4_k`], against an activation row that [`prep_q4_k`] rearranged: decode runs
/// every row of a matrix against one token, so the rearranging is paid once per piece of rows
/// instead of once per row (a quarter of a row's vector work here). Each block asks for the bytes
/// `ahead` further on as it starts (a hint, which may point past the row).
///
/// # Safety
/// See the module docs (`a` in the rearranged format, of Q8_K's size).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q4_k_prepared(n: usize, w: &[u8], a: &[u8], ahead: Ahead) -> f32 {
    // SAFETY: forwarded.
    unsafe { q4_k_row::<true>(n, w, a, ahead) }
}

/// Where a rearranged Q8_K block keeps each nibble plane's activations: 4 × 64 bytes from
/// [`PREP_YA`], then the 8 sums of each 32-element group (i16) at [`PREP_Q8S`].
const PREP_YA: usize = 4;
const PREP_Q8S: usize = 260;
/// For nibble plane `k`, the offsets in a Q8_K block of the 32 activations of its low and high
/// 256-bit halves.
const PLANE_ACTS: [(usize, usize); 4] = [(4, 68), (36, 100), (132, 196), (164, 228)];

/// Rearranges a Q8_K row of `n` elements for [`dot_q4_k_prepared`], block by block in place
/// of the same size: `d` stays at 0; the activations of nibble plane `k` (see
/// [`PLANE_ACTS`]) are the 64 bytes at `4 + 64 k`; the 8 group sums (pairs of Q8_K's 16-element
/// sums, added as `vphaddw` adds: wrapping) at 260; zeros to the block's end.
pub(crate) fn prep_q4_k(n: usize, a: &[u8], out: &mut [u8]) {
    for (src, dst) in a
        .chunks_exact(292)
        .zip(out.chunks_exact_mut(292))
        .take(n / QK_K)
    {
        dst[..4].copy_from_slice(&src[..4]);
        for (k, &(lo, hi)) in PLANE_ACTS.iter().enumerate() {
            let at = PREP_YA + 64 * k;
            dst[at..at + 32].copy_from_slice(&src[lo..lo + 32]);
            dst[at + 32..at + 64].copy_from_slice(&src[hi..hi + 32]);
        }
        for g in 0..8 {
            let sum = |i: usize| i16::from_le_bytes([src[260 + 2 * i], src[261 + 2 * i]]);
            let s = sum(2 * g).wrapping_add(sum(2 * g + 1));
            dst[PREP_Q8S + 2 * g..PREP_Q8S + 2 * g + 2].copy_from_slice(&s.to_le_bytes());
        }
        dst[PREP_Q8S + 16..].fill(0);
    }
}

/// The body of [`dot_q4_k`] (`PREPARED = false`) and [`dot_q4_k_prepared`].
///
/// # Safety
/// See the module docs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
unsafe fn q4_k_row<const PREPARED: bool>(n: usize, w: &[u8], a: &[u8], ahead: Ahead) -> f32 {
    let m4 = _mm512_set1_epi8(0xF);
    // Groups (0, 2), (1, 3), (4, 6), (5, 7): low and high nibbles of the two 64-byte loads.
    let ix = [
        idx_halves(0, 2),
        idx_halves(1, 3),
        idx_halves(4, 6),
        idx_halves(5, 7),
    ];
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for i in 0..n / QK_K {
        // SAFETY: block i is inside both rows (144 and 292 bytes); every offset below is
        // within those bounds.
        unsafe {
            let x = w.as_ptr().add(144 * i);
            prefetch_block(x, 144, ahead);
            let y = a.as_ptr().add(292 * i);
            // [d, dmin] of the block times the activations' d, converted together.
            let dd = _mm_mul_ps(
                _mm_set1_ps(f32_at(y)),
                _mm_cvtph_ps(_mm_cvtsi32_si128(x.cast::<i32>().read_unaligned())),
            );
            let d = _mm256_broadcastss_ps(dd);
            let dmin = _mm_permute_ps::<0b01_01_01_01>(dd);
            let mins_scales = _mm256_cvtepu8_epi16(unpack_scales_mins_k4(x.add(4)));
            let q8s = if PREPARED {
                _mm_loadu_si128(y.add(PREP_Q8S).cast())
            } else {
                let bsums = load(y.add(260));
                _mm_hadd_epi16(
                    _mm256_castsi256_si128(bsums),
                    _mm256_extracti128_si256::<1>(bsums),
                )
            };
            let prod = _mm_madd_epi16(_mm256_extracti128_si256::<1>(mins_scales), q8s);
            acc_m = _mm_fnmadd_ps(dmin, _mm_cvtepi32_ps(prod), acc_m);
            let sc = _mm512_zextsi128_si512(_mm256_castsi256_si128(mins_scales));

            let q0 = load512(x.add(16));
            let q1 = load512(x.add(80));
            let q = [
                _mm512_and_si512(q0, m4),
                _mm512_and_si512(_mm512_srli_epi16::<4>(q0), m4),
                _mm512_and_si512(q1, m4),
                _mm512_and_si512(_mm512_srli_epi16::<4>(q1), m4),
            ];
            let mut sumi = _mm512_setzero_si512();
            for k in 0..4 {
                let ya = if PREPARED {
                    load512(y.add(PREP_YA + 64 * k))
                } else {
                    // Inserted from memory: an insert takes either vector port, a shuffle of
                    // two loads only the one every scale permute here also needs.
                    let (lo, hi) = PLANE_ACTS[k];
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(load(y.add(lo))),
                        load(y.add(hi)),
                    )
                };
                let p = _mm512_maddubs_epi16(q[k], ya);
                sumi = _mm512_dpwssd_epi32(sumi, p, _mm512_permutexvar_epi16(ix[k], sc));
            }
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(fold_i32x16(sumi)), acc);
        }
    }
    let acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    let acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
    hsum_f32x8(acc) + _mm_cvtss_f32(acc_m)
}

/// `vpermw` indices for Q6_K: 16-bit lane `l` of 32 takes scale `base + l / 8` (a scale
/// covers 16 elements, 8 lanes of `maddubs` pairs).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")]
fn idx_q6(base: i16) -> __m512i {
    let lo = _mm256_set_m128i(_mm_set1_epi16(base + 1), _mm_set1_epi16(base));
    let hi = _mm256_set_m128i(_mm_set1_epi16(base + 3), _mm_set1_epi16(base + 2));
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Q6_K against Q8_K, 512 bits at a time. A 64-byte load of `ql` holds the low nibbles of
/// elements `0..64` of its half-block and the high nibbles of `64..128`, both contiguous in
/// the activations. The `- 32` offset comes out of the loop as `32 Σ sc·bsum` (exact).
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q6_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    // SAFETY: forwarded.
    unsafe { dot_q6_k_ahead(n, w, a, Ahead::NONE) }
}

/// As [`dot_q6_k`], each block asking for the bytes `ahead` further on as it starts (a hint,
/// which may point past the row).
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q6_k_ahead(n: usize, w: &[u8], a: &[u8], ahead: Ahead) -> f32 {
    let m4 = _mm512_set1_epi8(0xF);
    let m2 = _mm512_set1_epi8(3);
    let ix = [idx_q6(0), idx_q6(4), idx_q6(8), idx_q6(12)];
    let mut acc = _mm256_setzero_ps();
    for i in 0..n / QK_K {
        // SAFETY: block i is inside both rows (210 and 292 bytes).
        unsafe {
            let x = w.as_ptr().add(210 * i);
            prefetch_block(x, 210, ahead);
            let y = a.as_ptr().add(292 * i);
            let d = _mm256_mul_ps(_mm256_set1_ps(f32_at(y)), f16x8(x.add(208)));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(192).cast()));
            let sc = _mm512_castsi256_si512(sc16);
            let ms = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, load(y.add(260))));
            let mut sumi = _mm512_setzero_si512();
            for j in 0..2 {
                let ql = load512(x.add(64 * j));
                let qh = load(x.add(128 + 32 * j));
                // [qh | qh >> 2]: bits 0-1 then 2-3 of each byte in the low nibbles' halves,
                // bits 4-5 then 6-7 (after >> 4) in the high nibbles'.
                let h =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
                let h_lo = _mm512_slli_epi16::<4>(_mm512_and_si512(h, m2));
                let h_hi = _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<4>(h), m2));
                let q_lo = _mm512_or_si512(_mm512_and_si512(ql, m4), h_lo);
                let q_hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4), h_hi);
                let y8 = y.add(4 + 128 * j);
                let p_lo = _mm512_maddubs_epi16(q_lo, load512(y8));
                let p_hi = _mm512_maddubs_epi16(q_hi, load512(y8.add(64)));
                sumi = _mm512_dpwssd_epi32(sumi, p_lo, _mm512_permutexvar_epi16(ix[2 * j], sc));
                sumi = _mm512_dpwssd_epi32(sumi, p_hi, _mm512_permutexvar_epi16(ix[2 * j + 1], sc));
            }
            let sumi = _mm256_sub_epi32(fold_i32x16(sumi), ms);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_f32x8(acc)
}
