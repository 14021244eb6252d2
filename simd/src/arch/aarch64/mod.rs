//! aarch64 kernels: baseline NEON, and `sdot` where the CPU has the `dotprod` extension
//! (checked at run time with `is_aarch64_feature_detected!`, never assumed from the target).

pub(crate) mod neon;

use strata_storage::quant::GgmlType;

/// Same shape as `matmul::kernels::DotFn`.
type DotFn = fn(usize, &[u8], &[u8]) -> f32;

/// Wraps an `unsafe` NEON kernel in a safe function. Sound because [`dot`] hands the `dotprod`
/// ones out only after runtime detection (baseline NEON is part of the aarch64 target), and
/// the row lengths are checked here.
macro_rules! wrap_dot {
    ($name:ident, $kernel:path, $wty:expr, $aty:expr) => {
        fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            assert!(
                n.is_multiple_of($wty.block_size())
                    && w.len() >= $wty.row_bytes(n)
                    && a.len() >= $aty.row_bytes(n),
                "dot kernel called with short rows"
            );
            // SAFETY: the CPU has the kernel's features (see the macro docs); the kernel
            // itself reads only inside whole blocks of `w` and `a`.
            unsafe { $kernel(n, w, a) }
        }
    };
}

use GgmlType as T;
wrap_dot!(sdot_q8_0, neon::dot_q8_0_dotprod, T::Q8_0, T::Q8_0);
wrap_dot!(sdot_q4_0, neon::dot_q4_0_dotprod, T::Q4_0, T::Q8_0);
wrap_dot!(sdot_q4_k, neon::dot_q4_k_dotprod, T::Q4K, T::Q8K);
wrap_dot!(neon_q8_0, neon::dot_q8_0, T::Q8_0, T::Q8_0);
wrap_dot!(neon_q4_0, neon::dot_q4_0, T::Q4_0, T::Q8_0);
wrap_dot!(neon_q4_k, neon::dot_q4_k, T::Q4K, T::Q8K);

/// Whether this CPU has `sdot` (logged by `dispatch::level`).
pub(crate) fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// The NEON dot product for weight type `ty`, if there is one; the scalar kernel otherwise.
pub(crate) fn dot(ty: GgmlType) -> Option<DotFn> {
    let sdot = has_dotprod();
    Some(match (ty, sdot) {
        (T::Q8_0, true) => sdot_q8_0,
        (T::Q4_0, true) => sdot_q4_0,
        (T::Q4K, true) => sdot_q4_k,
        (T::Q8_0, false) => neon_q8_0,
        (T::Q4_0, false) => neon_q4_0,
        (T::Q4K, false) => neon_q4_k,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar::dot as reference;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn f16_bytes(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_bits().to_le_bytes()
    }

    /// `nb` random blocks of `size` bytes whose f16 scales at `scales` are finite and small.
    fn blocks(rng: &mut StdRng, nb: usize, size: usize, scales: &[usize]) -> Vec<u8> {
        let mut b: Vec<u8> = (0..nb * size).map(|_| rng.r#gen()).collect();
        for blk in b.chunks_exact_mut(size) {
            for &off in scales {
                blk[off..off + 2].copy_from_slice(&f16_bytes(rng.gen_range(-0.05..0.05)));
            }
        }
        b
    }

    /// Q8_K activations: f32 scale, random quants, and their true 16-element sums.
    fn q8_k(rng: &mut StdRng, nb: usize) -> Vec<u8> {
        let mut b = vec![0u8; nb * 292];
        for blk in b.chunks_exact_mut(292) {
            blk[0..4].copy_from_slice(&rng.gen_range(0.001f32..0.1).to_le_bytes());
            for q in &mut blk[4..260] {
                *q = rng.gen_range(-127i8..=127) as u8;
            }
            for j in 0..16 {
                let s: i16 = blk[4 + 16 * j..20 + 16 * j]
                    .iter()
                    .map(|&q| q as i8 as i16)
                    .sum();
                blk[260 + 2 * j..262 + 2 * j].copy_from_slice(&s.to_le_bytes());
            }
        }
        b
    }

    /// The kernels reduce and scale in the scalar twins' order, so results are bit-identical
    /// (checked under qemu-aarch64 with `-cpu max` and `-cpu cortex-a72`, without `dotprod`).
    fn close(got: f32, want: f32) -> bool {
        got.to_bits() == want.to_bits()
    }

    /// Plain NEON kernel, `sdot` kernel, scalar twin, weight row, activation row.
    type Case<'a> = (DotFn, DotFn, DotFn, &'a [u8], &'a [u8]);

    #[test]
    fn neon_kernels_match_scalar() {
        let mut rng = StdRng::seed_from_u64(7);
        let sdot = has_dotprod();
        for n in [256usize, 512, 4096] {
            let a8 = blocks(&mut rng, n / 32, 34, &[0]);
            let w8 = blocks(&mut rng, n / 32, 34, &[0]);
            let w4 = blocks(&mut rng, n / 32, 18, &[0]);
            let wk = blocks(&mut rng, n / 256, 144, &[0, 2]);
            let ak = q8_k(&mut rng, n / 256);
            let cases: [Case<'_>; 3] = [
                (neon_q8_0, sdot_q8_0, reference::dot_q8_0, &w8, &a8),
                (neon_q4_0, sdot_q4_0, reference::dot_q4_0, &w4, &a8),
                (neon_q4_k, sdot_q4_k, reference::dot_q4_k, &wk, &ak),
            ];
            for (i, (plain, with_sdot, scalar, w, a)) in cases.into_iter().enumerate() {
                let want = scalar(n, w, a);
                let got = plain(n, w, a);
                assert!(
                    close(got, want),
                    "case {i} n={n}: neon {got} vs scalar {want}"
                );
                if sdot {
                    let got = with_sdot(n, w, a);
                    assert!(
                        close(got, want),
                        "case {i} n={n}: sdot {got} vs scalar {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn dispatch_covers_the_neon_types() {
        for ty in [T::Q8_0, T::Q4_0, T::Q4K] {
            assert!(dot(ty).is_some(), "{ty:?}");
        }
        assert!(
            dot(T::Q6K).is_none(),
            "Q6_K has no NEON kernel yet; scalar is used"
        );
    }
}
