//! f32 × f16 vector loops for attention over an f16 KV cache.

use half::f16;

#[cfg(target_arch = "x86_64")]
use crate::dispatch::{Level, level};

/// `sum_i a[i] * b[i]`.
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        let lvl = level();
        if lvl >= Level::Avx512 && a.len().is_multiple_of(16) {
            // SAFETY: AVX-512F is present (dispatch checked it) and the lengths match.
            return unsafe { x86::dot_avx512(a, b) };
        }
        if lvl >= Level::Avx2 && a.len().is_multiple_of(8) {
            // SAFETY: AVX2, FMA and F16C are present (dispatch checked them) and lengths match.
            return unsafe { x86::dot_avx2(a, b) };
        }
    }
    dot_scalar(a, b)
}

/// `y[i] += alpha * x[i]`.
pub fn axpy_f16(y: &mut [f32], alpha: f32, x: &[f16]) {
    debug_assert_eq!(y.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    {
        let lvl = level();
        if lvl >= Level::Avx512 && y.len().is_multiple_of(16) {
            // SAFETY: AVX-512F is present and the lengths match.
            unsafe { x86::axpy_avx512(y, alpha, x) };
            return;
        }
        if lvl >= Level::Avx2 && y.len().is_multiple_of(8) {
            // SAFETY: AVX2, FMA and F16C are present and the lengths match.
            unsafe { x86::axpy_avx2(y, alpha, x) };
            return;
        }
    }
    axpy_scalar(y, alpha, x)
}

pub fn dot_scalar(a: &[f32], b: &[f16]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| x * y.to_f32()).sum()
}

pub fn axpy_scalar(y: &mut [f32], alpha: f32, x: &[f16]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// # Safety
    /// The CPU must support AVX-512F; `a.len() == b.len()` and a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512(a: &[f32], b: &[f16]) -> f32 {
        let mut acc = _mm512_setzero_ps();
        for i in (0..a.len()).step_by(16) {
            // SAFETY: i + 16 <= len for both slices; unaligned loads are used.
            unsafe {
                let va = _mm512_loadu_ps(a.as_ptr().add(i));
                let vb = _mm512_cvtph_ps(_mm256_loadu_si256(b.as_ptr().add(i) as *const __m256i));
                acc = _mm512_fmadd_ps(va, vb, acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// # Safety
    /// The CPU must support AVX-512F; `y.len() == x.len()` and a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn axpy_avx512(y: &mut [f32], alpha: f32, x: &[f16]) {
        let va = _mm512_set1_ps(alpha);
        for i in (0..y.len()).step_by(16) {
            // SAFETY: i + 16 <= len for both slices.
            unsafe {
                let vx = _mm512_cvtph_ps(_mm256_loadu_si256(x.as_ptr().add(i) as *const __m256i));
                let p = y.as_mut_ptr().add(i);
                _mm512_storeu_ps(p, _mm512_fmadd_ps(va, vx, _mm512_loadu_ps(p)));
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `a.len() == b.len()` and a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f16]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for i in (0..a.len()).step_by(8) {
            // SAFETY: i + 8 <= len for both slices.
            unsafe {
                let va = _mm256_loadu_ps(a.as_ptr().add(i));
                let vb = _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().add(i) as *const __m128i));
                acc = _mm256_fmadd_ps(va, vb, acc);
            }
        }
        let hi = _mm256_extractf128_ps(acc, 1);
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `y.len() == x.len()` and a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_avx2(y: &mut [f32], alpha: f32, x: &[f16]) {
        let va = _mm256_set1_ps(alpha);
        for i in (0..y.len()).step_by(8) {
            // SAFETY: i + 8 <= len for both slices.
            unsafe {
                let vx = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i) as *const __m128i));
                let p = y.as_mut_ptr().add(i);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(va, vx, _mm256_loadu_ps(p)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_matches_scalar() {
        for n in [8usize, 16, 64, 128, 256, 24] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.13)
                .collect();
            let b: Vec<f16> = (0..n)
                .map(|i| f16::from_f32(((i * 17 % 7) as f32 - 3.0) * 0.21))
                .collect();
            let d = dot_f16(&a, &b);
            let r = dot_scalar(&a, &b);
            assert!((d - r).abs() <= 1e-4 * (1.0 + r.abs()), "n={n} {d} vs {r}");
            let mut y1 = a.clone();
            let mut y2 = a.clone();
            axpy_f16(&mut y1, 0.7, &b);
            axpy_scalar(&mut y2, 0.7, &b);
            for (p, q) in y1.iter().zip(&y2) {
                assert!((p - q).abs() <= 1e-5);
            }
        }
    }
}
