//! The tiled attention kernel of [`super::tiled`] in 256-bit registers: blocks of 8 queries
//! sharing a KV head, one per lane, each key and value row converted to f32 once per block.
//!
//! Every lane computes what a lane of the 16-lane kernel computes in the same order (two FMA
//! chains over even and odd dimensions per score, the same `exp`, f64 sums over the keys in
//! order, probabilities rounded to f16, values accumulated key by key), so the two kernels give
//! the same bits, and a lane's result does not depend on the other lanes of its block.
//!
//! AVX2 has 16 vector registers: scores run 4 keys × 2 chains (8 accumulators, the two query
//! rows and a broadcast), the weighted sum 8 dimensions × 8 queries per pass over a key tile.

use std::arch::x86_64::*;

use half::f16;

use strata_storage::quant::GgmlType;

use super::AttnParams;
use super::kv::KvPages;
use super::tiled::{Block, KEY_TILE, Prepared, SCRATCH, Scratch};
use crate::ops::act::x86::exp256;

/// Queries per block: one per lane.
pub(super) const LANES: usize = 8;

/// Computes one block of queries (the first [`LANES`] of `b`) and writes their outputs.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `p.head_dim` is a multiple of 8; `q`, `k`, `v`
/// hold what `attention` asserts; `out` is valid for writing the rows of this block's queries
/// (`(t * n_head + h) * hd ..+ hd`), which no other thread touches during the call.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn block(
    p: &AttnParams,
    q: &[f32],
    pos0: usize,
    k: &KvPages,
    v: &KvPages,
    b: &Block,
    out: *mut f32,
) {
    let hd = p.head_dim;
    let Some(pre) = Prepared::<LANES>::new(p, pos0, b) else {
        return;
    };
    let (start, end, kmin, kmax) = (pre.start, pre.end, pre.kmin, pre.kmax);
    let nk = pre.n_keys();

    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        pre.load(p, q, b, &mut scratch);
        let Scratch { qt, s, kv, ot } = &mut *scratch;

        // SAFETY (whole block): AVX2/FMA/F16C are present (caller); every pointer below
        // indexes `qt`, `s`, `kv`, `ot` within the lengths `load` set, or `k`/`v` rows
        // kmin..=kmax of this KV head, which `attention` checked exist.
        unsafe {
            for d in 0..hd {
                let qp = qt.as_mut_ptr().add(d * LANES);
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(qp));
                _mm256_storeu_ps(qp, _mm256_cvtph_ps(h));
            }
            // `start - 1 < j` and `j < end + 1` as the signed compares AVX2 has.
            let vstart_m1 = _mm256_sub_epi32(
                _mm256_loadu_si256(start.as_ptr().cast()),
                _mm256_set1_epi32(1),
            );
            let vend_p1 = _mm256_add_epi32(
                _mm256_loadu_si256(end.as_ptr().cast()),
                _mm256_set1_epi32(1),
            );
            let scale = _mm256_set1_ps(p.scale);
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut vmax = ninf;

            // Scores.
            let mut j0 = kmin;
            while j0 <= kmax {
                let nt = (kmax + 1 - j0).min(KEY_TILE);
                convert_rows(k, j0, nt, b.kv_head, hd, kv.as_mut_ptr());
                let mut jj = 0;
                while jj < nt {
                    let n4 = (nt - jj).min(4);
                    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                    let kp = kv.as_ptr().add(jj * hd);
                    for d in (0..hd).step_by(2) {
                        let q0 = _mm256_loadu_ps(qt.as_ptr().add(d * LANES));
                        let q1 = _mm256_loadu_ps(qt.as_ptr().add((d + 1) * LANES));
                        for (r, a) in acc.iter_mut().enumerate() {
                            let kr = kp.add(r * hd + d);
                            a[0] = _mm256_fmadd_ps(q0, _mm256_broadcast_ss(&*kr), a[0]);
                            a[1] = _mm256_fmadd_ps(q1, _mm256_broadcast_ss(&*kr.add(1)), a[1]);
                        }
                    }
                    for (r, a) in acc.iter().enumerate().take(n4) {
                        let j = j0 + jj + r;
                        let mut sc = _mm256_mul_ps(_mm256_add_ps(a[0], a[1]), scale);
                        if let Some(cap) = p.softcap {
                            sc = softcap(sc, cap);
                        }
                        let vj = _mm256_set1_epi32(j as i32);
                        let ok = _mm256_and_si256(
                            _mm256_cmpgt_epi32(vj, vstart_m1),
                            _mm256_cmpgt_epi32(vend_p1, vj),
                        );
                        let sc = _mm256_blendv_ps(ninf, sc, _mm256_castsi256_ps(ok));
                        vmax = _mm256_max_ps(vmax, sc);
                        _mm256_storeu_ps(s.as_mut_ptr().add((j - kmin) * LANES), sc);
                    }
                    jj += 4;
                }
                j0 += nt;
            }

            // Softmax: exponentials summed in f64, probabilities rounded to f16.
            let mut sum_lo = _mm256_setzero_pd();
            let mut sum_hi = _mm256_setzero_pd();
            for j in 0..nk {
                let sp = s.as_mut_ptr().add(j * LANES);
                let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sp), vmax));
                _mm256_storeu_ps(sp, e);
                sum_lo = _mm256_add_pd(sum_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
                sum_hi = _mm256_add_pd(sum_hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
            }
            let one = _mm256_set1_pd(1.0);
            let inv = _mm256_set_m128(
                _mm256_cvtpd_ps(_mm256_div_pd(one, sum_hi)),
                _mm256_cvtpd_ps(_mm256_div_pd(one, sum_lo)),
            );
            for j in 0..nk {
                let sp = s.as_mut_ptr().add(j * LANES);
                let pr = _mm256_mul_ps(_mm256_loadu_ps(sp), inv);
                let pr = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(pr));
                _mm256_storeu_ps(sp, pr);
            }

            // Weighted sum of values: 8 dimensions × 8 queries in registers per key tile.
            ot.fill(0.0);
            let mut j0 = kmin;
            while j0 <= kmax {
                let nt = (kmax + 1 - j0).min(KEY_TILE);
                convert_rows(v, j0, nt, b.kv_head, hd, kv.as_mut_ptr());
                for d0 in (0..hd).step_by(8) {
                    let op = ot.as_mut_ptr().add(d0 * LANES);
                    let mut acc: [__m256; 8] =
                        std::array::from_fn(|dd| _mm256_loadu_ps(op.add(dd * LANES)));
                    for jj in 0..nt {
                        let pr = _mm256_loadu_ps(s.as_ptr().add((j0 + jj - kmin) * LANES));
                        let vr = kv.as_ptr().add(jj * hd + d0);
                        for (dd, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(pr, _mm256_broadcast_ss(&*vr.add(dd)), *a);
                        }
                    }
                    for (dd, a) in acc.iter().enumerate() {
                        _mm256_storeu_ps(op.add(dd * LANES), *a);
                    }
                }
                j0 += nt;
            }
        }

        // SAFETY: the rows of this block's queries are this thread's (caller's contract).
        unsafe { pre.store(p, b, ot, out) };
    });
}

/// `cap · tanh(s / cap)`, with `tanh y = 1 - 2 / (e^{2y} + 1)` (as the 16-lane kernel).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn softcap(s: __m256, cap: f32) -> __m256 {
    let e = exp256(_mm256_mul_ps(s, _mm256_set1_ps(2.0 / cap)));
    let one = _mm256_set1_ps(1.0);
    let th = _mm256_sub_ps(
        one,
        _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(e, one)),
    );
    _mm256_mul_ps(th, _mm256_set1_ps(cap))
}

/// Converts `n` rows (positions `j0..j0 + n`, KV head `kvh`, `hd` values each) of a cache to
/// f32 rows of `hd` at `dst`.
///
/// # Safety
/// The CPU must support AVX2/F16C; the positions are inside `src`, `dst` is valid for
/// `n * hd` f32, `hd` is a multiple of 32 for a quantized cache and of 8 for f16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn convert_rows(src: &KvPages, j0: usize, n: usize, kvh: usize, hd: usize, dst: *mut f32) {
    match src.ty() {
        GgmlType::Q8_0 => {
            for jj in 0..n {
                let row = src.head(j0 + jj, kvh, hd);
                for (b, blk) in row.chunks_exact(34).enumerate() {
                    let d = _mm256_set1_ps(f16::from_le_bytes([blk[0], blk[1]]).to_f32());
                    for part in 0..4 {
                        // SAFETY: 8 quants at 2 + 8 * part inside the 34-byte block; the
                        // destination is this row's block b, inside `dst` (contract).
                        unsafe {
                            let q = _mm_loadl_epi64(blk.as_ptr().add(2 + 8 * part).cast());
                            let x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                            _mm256_storeu_ps(
                                dst.add(jj * hd + 32 * b + 8 * part),
                                _mm256_mul_ps(x, d),
                            );
                        }
                    }
                }
            }
        }
        GgmlType::Q4_0 => {
            let mask = _mm_set1_epi8(0x0f);
            let eight = _mm256_set1_epi32(8);
            for jj in 0..n {
                let row = src.head(j0 + jj, kvh, hd);
                for (b, blk) in row.chunks_exact(18).enumerate() {
                    let d = _mm256_set1_ps(f16::from_le_bytes([blk[0], blk[1]]).to_f32());
                    // SAFETY: 16 quant bytes at 2 inside the 18-byte block; the destination is
                    // this row's block b, inside `dst` (contract).
                    unsafe {
                        let q = _mm_loadu_si128(blk.as_ptr().add(2).cast());
                        let lo = _mm_and_si128(q, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                        // Low nibbles are elements 0..16 of the block, high ones 16..32.
                        for (half, nib) in [lo, hi].into_iter().enumerate() {
                            for part in 0..2 {
                                let bytes = if part == 0 {
                                    nib
                                } else {
                                    _mm_srli_si128::<8>(nib)
                                };
                                let x = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), eight);
                                let x = _mm256_mul_ps(_mm256_cvtepi32_ps(x), d);
                                _mm256_storeu_ps(
                                    dst.add(jj * hd + 32 * b + 16 * half + 8 * part),
                                    x,
                                );
                            }
                        }
                    }
                }
            }
        }
        _ => {
            for jj in 0..n {
                let row = src.head_f16(j0 + jj, kvh, hd);
                for d in (0..hd).step_by(8) {
                    // SAFETY: d + 8 <= hd, inside `row` and inside `dst`'s row jj (contract).
                    unsafe {
                        let h = _mm_loadu_si128(row.as_ptr().add(d).cast());
                        _mm256_storeu_ps(dst.add(jj * hd + d), _mm256_cvtph_ps(h));
                    }
                }
            }
        }
    }
}
