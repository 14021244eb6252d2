//! Gated activations of the feed-forward block.
//!
//! Both are `x · σ(z) · up`: SiLU with `z = x`, the tanh GELU with `z = 2·√(2/π)·(x + 0.044715
//! x³)` (since `½(1 + tanh y) = σ(2y)`). The AVX-512 path evaluates `σ` with a vector `exp`
//! (range reduction to `|r| ≤ ln2/2`, a degree-7 polynomial, `vscalefps` for the power of
//! two: within 2 ulp of libm); the scalar twins call libm.

#[cfg(target_arch = "x86_64")]
use crate::dispatch::{Level, level};

/// `gate = silu(gate) * up` (SwiGLU).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    if level() >= Level::Avx512 {
        // SAFETY: AVX-512F is present (dispatch checked it) and the lengths match.
        unsafe { x86::gated(gate, up, x86::Act::Silu) };
        return;
    }
    silu_mul_scalar(gate, up)
}

/// `gate = gelu(gate) * up` (GeGLU) with the tanh approximation Gemma uses.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    if level() >= Level::Avx512 {
        // SAFETY: AVX-512F is present (dispatch checked it) and the lengths match.
        unsafe { x86::gated(gate, up, x86::Act::GeluTanh) };
        return;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    type Gated = fn(&mut [f32], &[f32]);

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
        let pairs: [(Gated, Gated); 2] = [
            (silu_mul, silu_mul_scalar),
            (gelu_tanh_mul, gelu_tanh_mul_scalar),
        ];
        for n in [1usize, 15, 16, 17, 100, 1000] {
            let mut x: Vec<f32> = (0..n).map(|_| rnd() * 24.0).collect();
            x[0] = if n > 1 { -200.0 } else { 3.0 };
            if n > 2 {
                x[1] = 200.0;
            }
            let u: Vec<f32> = (0..n).map(|_| rnd() * 4.0).collect();
            for (fast, slow) in pairs {
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
}
