//! Gated activations of the feed-forward block.
//!
//! Both are `x · σ(z) · up`: SiLU with `z = x`, the tanh GELU with `z = 2·√(2/π)·(x + 0.044715
//! x³)` (since `½(1 + tanh y) = σ(2y)`). The AVX-512 and AVX2 paths evaluate `σ` with a vector
//! `exp` (range reduction to `|r| ≤ ln2/2`, a degree-7 polynomial, then the power of two:
//! within 2 ulp of libm; both widths give the same bits); the scalar twins call libm.

#[cfg(target_arch = "x86_64")]
use crate::dispatch::{Level, level};

/// `gate = silu(gate) * up` (SwiGLU).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    {
        let lvl = level();
        if lvl >= Level::Avx512 {
            // SAFETY: AVX-512F is present (dispatch checked it) and the lengths match.
            unsafe { x86::gated(gate, up, x86::Act::Silu) };
            return;
        }
        if lvl >= Level::Avx2 {
            // SAFETY: AVX2 and FMA are present (dispatch checked them) and the lengths match.
            unsafe { x86::gated_avx2(gate, up, x86::Act::Silu) };
            return;
        }
    }
    silu_mul_scalar(gate, up)
}

/// `gate = gelu(gate) * up` (GeGLU) with the tanh approximation Gemma uses.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    {
        let lvl = level();
        if lvl >= Level::Avx512 {
            // SAFETY: AVX-512F is present (dispatch checked it) and the lengths match.
            unsafe { x86::gated(gate, up, x86::Act::GeluTanh) };
            return;
        }
        if lvl >= Level::Avx2 {
            // SAFETY: AVX2 and FMA are present (dispatch checked them) and the lengths match.
            unsafe { x86::gated_avx2(gate, up, x86::Act::GeluTanh) };
            return;
        }
    }
    gelu_tanh_mul_scalar(gate, up)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF_A: f32 = 0.044_715;

/// The scalar twin of [`silu_mul`].
pub fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// The scalar twin of [`gelu_tanh_mul`].
pub fn gelu_tanh_mul_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let inner = SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x);
        *g = 0.5 * x * (1.0 + inner.tanh()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{GELU_COEF_A, SQRT_2_OVER_PI};

    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Act {
        Silu,
        GeluTanh,
    }

    /// `e^x` in 16 lanes; saturates to 0 and +inf outside the f32 range.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-150.0)),
            _mm512_set1_ps(150.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 split so that n · LN2_HI is exact.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// `gate = gate · σ(z) · up` for [`Act`]'s `z`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `gate.len() == up.len()`.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn gated(gate: &mut [f32], up: &[f32], act: Act) {
        let n = gate.len().min(up.len());
        let one = _mm512_set1_ps(1.0);
        let c1 = _mm512_set1_ps(-2.0 * SQRT_2_OVER_PI);
        let c3 = _mm512_set1_ps(-2.0 * SQRT_2_OVER_PI * GELU_COEF_A);
        let mut i = 0;
        while i < n {
            let left = n - i;
            let mask: __mmask16 = if left >= 16 { 0xFFFF } else { (1 << left) - 1 };
            // SAFETY: the masked lanes are inside both slices (i + popcount(mask) <= n).
            unsafe {
                let g = _mm512_maskz_loadu_ps(mask, gate.as_ptr().add(i));
                let u = _mm512_maskz_loadu_ps(mask, up.as_ptr().add(i));
                let neg_z = match act {
                    Act::Silu => _mm512_sub_ps(_mm512_setzero_ps(), g),
                    Act::GeluTanh => {
                        let g2 = _mm512_mul_ps(g, g);
                        _mm512_mul_ps(g, _mm512_fmadd_ps(c3, g2, c1))
                    }
                };
                let den = _mm512_add_ps(one, exp(neg_z));
                let v = _mm512_div_ps(_mm512_mul_ps(g, u), den);
                _mm512_mask_storeu_ps(gate.as_mut_ptr().add(i), mask, v);
            }
            i += 16;
        }
    }

    /// [`exp`] in 8 lanes, bit for bit. AVX2 has no `vscalefps`: `2^n` (`|n| ≤ 217` after the
    /// clamp) is applied as two powers of two built from exponent bits, `2^⌊n/2⌋ · 2^(n-⌊n/2⌋)`;
    /// each factor is a normal float, the first product is exact and the second rounds once,
    /// to a subnormal, 0 or +inf where the result leaves the normal range, as `vscalefps` does.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp256(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-150.0)),
            _mm256_set1_ps(150.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(ni);
        let n2 = _mm256_sub_epi32(ni, n1);
        let bias = _mm256_set1_epi32(127);
        let pow =
            |k: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k, bias)));
        _mm256_mul_ps(_mm256_mul_ps(p, pow(n1)), pow(n2))
    }

    /// [`gated`] in 8 lanes, the tail through masked loads and stores.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `gate.len() == up.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn gated_avx2(gate: &mut [f32], up: &[f32], act: Act) {
        let n = gate.len().min(up.len());
        let one = _mm256_set1_ps(1.0);
        let c1 = _mm256_set1_ps(-2.0 * SQRT_2_OVER_PI);
        let c3 = _mm256_set1_ps(-2.0 * SQRT_2_OVER_PI * GELU_COEF_A);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut i = 0;
        while i < n {
            let left = (n - i).min(8) as i32;
            // Lane l is active when l < left (the sign bit of l - left).
            let mask = _mm256_sub_epi32(lane, _mm256_set1_epi32(left));
            // SAFETY: the masked lanes are inside both slices (i + left <= n); masked-off lanes
            // are neither read nor written.
            unsafe {
                let g = _mm256_maskload_ps(gate.as_ptr().add(i), mask);
                let u = _mm256_maskload_ps(up.as_ptr().add(i), mask);
                let neg_z = match act {
                    Act::Silu => _mm256_sub_ps(_mm256_setzero_ps(), g),
                    Act::GeluTanh => {
                        let g2 = _mm256_mul_ps(g, g);
                        _mm256_mul_ps(g, _mm256_fmadd_ps(c3, g2, c1))
                    }
                };
                let den = _mm256_add_ps(one, exp256(neg_z));
                let v = _mm256_div_ps(_mm256_mul_ps(g, u), den);
                _mm256_maskstore_ps(gate.as_mut_ptr().add(i), mask, v);
            }
            i += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Gated = fn(&mut [f32], &[f32]);

    /// The AVX2 and AVX-512 bodies called directly, whatever `level()` picked; each is used
    /// only after `available` said the CPU has it.
    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use super::super::x86::{Act, gated_avx2};
        pub(super) fn silu(g: &mut [f32], u: &[f32]) {
            // SAFETY: the caller checked AVX2/FMA; the test passes equal lengths.
            unsafe { gated_avx2(g, u, Act::Silu) }
        }
        pub(super) fn gelu(g: &mut [f32], u: &[f32]) {
            // SAFETY: as in `silu`.
            unsafe { gated_avx2(g, u, Act::GeluTanh) }
        }
    }
    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use super::super::x86::{Act, gated};
        pub(super) fn silu(g: &mut [f32], u: &[f32]) {
            // SAFETY: the caller checked AVX-512F; the test passes equal lengths.
            unsafe { gated(g, u, Act::Silu) }
        }
        pub(super) fn gelu(g: &mut [f32], u: &[f32]) {
            // SAFETY: as in `silu`.
            unsafe { gated(g, u, Act::GeluTanh) }
        }
    }

    #[test]
    fn known_values() {
        for (silu, gelu) in [
            (
                silu_mul as fn(&mut [f32], &[f32]),
                gelu_tanh_mul as fn(&mut [f32], &[f32]),
            ),
            (silu_mul_scalar, gelu_tanh_mul_scalar),
        ] {
            let mut g = [0.0f32, 1.0, -1.0];
            silu(&mut g, &[1.0, 2.0, 1.0]);
            assert!((g[0]).abs() < 1e-7);
            assert!((g[1] - 2.0 * 0.731_058_6).abs() < 1e-5);
            assert!((g[2] + 0.268_941_4).abs() < 1e-5);
            let mut g = [1.0f32, -3.0];
            gelu(&mut g, &[1.0, 1.0]);
            assert!((g[0] - 0.841_192).abs() < 1e-4);
            assert!((g[1] + 0.003_637).abs() < 1e-4);
        }
    }

    /// The vector paths against their scalar twins, over the range activations reach and the
    /// extremes (saturation to 0 and x), at lengths that leave a masked tail.
    #[test]
    fn vector_matches_scalar() {
        let mut seed = 99u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut pairs: Vec<(Gated, Gated)> = vec![
            (silu_mul, silu_mul_scalar),
            (gelu_tanh_mul, gelu_tanh_mul_scalar),
        ];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::dispatch::available;
            if available(Level::Avx2) {
                pairs.push((avx2::silu, silu_mul_scalar));
                pairs.push((avx2::gelu, gelu_tanh_mul_scalar));
            } else {
                eprintln!("AVX2 path skipped: not on this CPU");
            }
            if available(Level::Avx512) {
                pairs.push((avx512::silu, silu_mul_scalar));
                pairs.push((avx512::gelu, gelu_tanh_mul_scalar));
            } else {
                eprintln!("AVX-512 path skipped: not on this CPU");
            }
        }
        for n in [1usize, 7, 8, 9, 15, 16, 17, 100, 1000] {
            let mut x: Vec<f32> = (0..n).map(|_| rnd() * 24.0).collect();
            x[0] = if n > 1 { -200.0 } else { 3.0 };
            if n > 2 {
                x[1] = 200.0;
            }
            let u: Vec<f32> = (0..n).map(|_| rnd() * 4.0).collect();
            for &(fast, slow) in &pairs {
                let (mut a, mut b) = (x.clone(), x.clone());
                fast(&mut a, &u);
                slow(&mut b, &u);
                for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-6 + 2e-6 * q.abs(),
                        "n={n} i={i} x={}: {p} vs {q}",
                        x[i]
                    );
                }
            }
        }
    }

    /// The 8-lane `exp` against libm over the whole clamp range, including the subnormal
    /// results and the saturation to 0 and +inf that its power of two is built to give, and
    /// bit for bit against the 16-lane one where the CPU has both.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp256_range_and_saturation() {
        use std::arch::x86_64::*;
        if !crate::dispatch::available(Level::Avx2) {
            eprintln!("skipped: no AVX2");
            return;
        }
        let with512 = crate::dispatch::available(Level::Avx512);
        let mut xs: Vec<f32> = (-3200..=3200).map(|i| i as f32 * 0.05).collect();
        xs.extend([
            -200.0,
            -150.0,
            -104.0,
            -103.0,
            -88.0,
            -87.5,
            88.5,
            88.8,
            150.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
        ]);
        xs.resize(xs.len().next_multiple_of(16), 0.0);
        for c in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX2/FMA checked above; 8-float loads and stores inside 16-float arrays.
            unsafe {
                for h in 0..2 {
                    let v = x86::exp256(_mm256_loadu_ps(c.as_ptr().add(8 * h)));
                    _mm256_storeu_ps(got.as_mut_ptr().add(8 * h), v);
                }
            }
            for (&x, &e) in c.iter().zip(&got) {
                let want = x.clamp(-150.0, 150.0).exp();
                if want == 0.0 || want.is_infinite() {
                    assert_eq!(e, want, "x={x}");
                } else if want < f32::MIN_POSITIVE {
                    // Subnormal: an absolute error of an ulp or two of the smallest normal.
                    assert!(
                        (e - want).abs() <= 2.0 * f32::from_bits(1),
                        "x={x}: {e} vs {want}"
                    );
                } else {
                    let ulps = (e.to_bits() as i64 - want.to_bits() as i64).abs();
                    assert!(ulps <= 2, "x={x}: {e} vs {want} ({ulps} ulp)");
                }
            }
            if with512 {
                let mut wide = [0f32; 16];
                // SAFETY: AVX-512F checked; 16-float load and store.
                unsafe {
                    _mm512_storeu_ps(wide.as_mut_ptr(), x86::exp(_mm512_loadu_ps(c.as_ptr())))
                };
                assert_eq!(got.map(f32::to_bits), wide.map(f32::to_bits));
            }
        }
    }
}
