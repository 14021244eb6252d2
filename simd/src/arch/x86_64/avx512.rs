//! AVX-512 kernels. Where 512-bit vectors buy nothing over AVX2 (the K-quant dot products
//! work on 32-byte groups) the dispatch table keeps the AVX2 kernel, as llama.cpp does; what
//! lives here is what the wider or newer instructions make faster:
//!
//! - `dot_f32`: 512-bit FMA.
//! - the legacy 32-element blocks with VNNI: one `vpdpbusd` replaces `maddubs` + `madd`.
//!
//! Contract of every `unsafe fn`: the CPU has the features named in its `target_feature`, and
//! the slices hold at least the bytes of `n` elements in their formats.

use std::arch::x86_64::*;

use super::avx2::{bits32, f16x8, hsum_f32x8, load, nibbles32};

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
