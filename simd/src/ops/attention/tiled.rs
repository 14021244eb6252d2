//! Prefill attention on AVX-512, tiled so that each key and value row is converted from f16
//! once for 16 queries instead of once per query.
//!
//! A block is 16 queries that share one KV head (GQA: consecutive (token, head) pairs of the
//! head's group), one per vector lane. Scores for a key are one FMA chain over the head
//! dimension with the queries transposed (`qt[d]` holds dimension `d` of all 16 queries) and the
//! key's element broadcast; the softmax runs lane-wise over the block's keys with each lane's
//! causal (and sliding-window) range masked; the weighted sum of values keeps 16 dimensions ×
//! 16 queries in registers while it walks a tile of keys.
//!
//! Numerics are those of the scalar path (ggml's non-fused attention): queries rounded to f16,
//! f32 scores, max-subtracted exponentials summed in f64, probabilities rounded to f16 before
//! they weight the values, f32 accumulation.

use std::arch::x86_64::*;
use std::cell::RefCell;

use half::f16;

use strata_storage::quant::GgmlType;

use super::AttnParams;
use super::kv::KvPages;
use crate::ops::act::x86::exp;

/// Queries per block: one per lane.
pub(super) const LANES: usize = 16;
/// Keys converted to f32 at a time (a tile of 32 keys × 256 dimensions is 32 KiB, in L1).
pub(super) const KEY_TILE: usize = 32;

/// A block's working memory, shared by the 16- and the 8-lane kernel (`lanes` below is the
/// kernel's width).
#[derive(Default)]
pub(super) struct Scratch {
    /// Queries transposed: `[hd][lanes]`.
    pub(super) qt: Vec<f32>,
    /// Scores, then probabilities: `[keys][lanes]`.
    pub(super) s: Vec<f32>,
    /// A tile of keys or values in f32: `[KEY_TILE][hd]`.
    pub(super) kv: Vec<f32>,
    /// Output transposed: `[hd][lanes]`.
    pub(super) ot: Vec<f32>,
}

thread_local! {
    pub(super) static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Where a block's queries are: the (token, head) of each lane (`None` past the last query;
/// an 8-lane kernel reads the first 8).
pub(super) struct Block {
    pub(super) queries: [Option<(usize, usize)>; LANES],
    pub(super) kv_head: usize,
}

/// What the 16- and 8-lane kernels share around their vector bodies: each of `N` lanes' key
/// range and the block's key span `kmin..=kmax`, the queries' loading and the outputs' storing.
pub(super) struct Prepared<const N: usize> {
    /// Lane ranges `[start, end]` of key positions; an unused lane copies lane 0's.
    pub(super) start: [i32; N],
    pub(super) end: [i32; N],
    pub(super) kmin: usize,
    pub(super) kmax: usize,
}

impl<const N: usize> Prepared<N> {
    /// The ranges of `b`'s first `N` lanes; `None` for an empty block.
    pub(super) fn new(p: &AttnParams, pos0: usize, b: &Block) -> Option<Self> {
        let (first_t, _) = b.queries[0]?;
        let mut start = [0i32; N];
        let mut end = [0i32; N];
        for (l, slot) in b.queries.iter().take(N).enumerate() {
            let (t, _) = slot.unwrap_or((first_t, 0));
            let pos = pos0 + t;
            end[l] = pos as i32;
            start[l] = p.window.map_or(0, |w| (pos + 1).saturating_sub(w)) as i32;
        }
        let kmin = *start.iter().min().unwrap_or(&0) as usize;
        let kmax = *end.iter().max().unwrap_or(&0) as usize;
        Some(Self {
            start,
            end,
            kmin,
            kmax,
        })
    }

    pub(super) fn n_keys(&self) -> usize {
        self.kmax + 1 - self.kmin
    }

    /// Sizes `sc` for this block and writes the queries transposed into `sc.qt` (in f32: the
    /// kernel rounds them to f16, as ggml does when it multiplies them with an f16 key, a
    /// vector at a time).
    pub(super) fn load(&self, p: &AttnParams, q: &[f32], b: &Block, sc: &mut Scratch) {
        let hd = p.head_dim;
        let nk = self.n_keys();
        let Scratch { qt, s, kv, ot } = sc;
        qt.resize(hd * N, 0.0);
        // Grown 256 keys at a time (a KV cache page), so that decode allocates here only when
        // the cache itself takes a new page.
        if s.capacity() < nk * N {
            s.reserve_exact(nk.next_multiple_of(256) * N - s.len());
        }
        s.resize(nk * N, 0.0);
        kv.resize(KEY_TILE * hd, 0.0);
        ot.resize(hd * N, 0.0);
        for (l, slot) in b.queries.iter().take(N).enumerate() {
            match slot {
                Some((t, h)) => {
                    let row = &q[(t * p.n_head + h) * hd..][..hd];
                    for (d, &x) in row.iter().enumerate() {
                        qt[d * N + l] = x;
                    }
                }
                None => (0..hd).for_each(|d| qt[d * N + l] = 0.0),
            }
        }
    }

    /// Writes each used lane's row of `ot` to its query's output row.
    ///
    /// # Safety
    /// `out` is valid for writing the rows of `b`'s queries, which no other thread touches.
    pub(super) unsafe fn store(&self, p: &AttnParams, b: &Block, ot: &[f32], out: *mut f32) {
        let hd = p.head_dim;
        for (l, slot) in b.queries.iter().take(N).enumerate() {
            if let Some((t, h)) = slot {
                // SAFETY: this query's output row is this thread's (caller's contract).
                let o =
                    unsafe { std::slice::from_raw_parts_mut(out.add((t * p.n_head + h) * hd), hd) };
                for (d, x) in o.iter_mut().enumerate() {
                    *x = ot[d * N + l];
                }
            }
        }
    }
}

/// Computes one block of queries and writes their outputs.
///
/// # Safety
/// The CPU must support AVX-512F; `p.head_dim` is a multiple of 16; `q`, `k`, `v` hold what
/// `attention` asserts; `out` is valid for writing the rows of this block's queries
/// (`(t * n_head + h) * hd ..+ hd`), which no other thread touches during the call.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
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

        // SAFETY (whole block): AVX-512F/F16C/FMA are present (caller); every pointer below
        // indexes `qt`, `s`, `kv`, `ot` within the lengths set above, or `k`/`v` rows
        // kmin..=kmax of this KV head, which `attention` checked exist.
        unsafe {
            for d in 0..hd {
                let qp = qt.as_mut_ptr().add(d * LANES);
                let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_loadu_ps(qp));
                _mm512_storeu_ps(qp, _mm512_cvtph_ps(h));
            }
            let vstart = _mm512_loadu_si512(start.as_ptr().cast());
            let vend = _mm512_loadu_si512(end.as_ptr().cast());
            let scale = _mm512_set1_ps(p.scale);
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut vmax = ninf;

            // Scores.
            let mut j0 = kmin;
            while j0 <= kmax {
                let nt = (kmax + 1 - j0).min(KEY_TILE);
                convert_rows(k, j0, nt, b.kv_head, hd, kv.as_mut_ptr());
                let mut jj = 0;
                while jj < nt {
                    let n4 = (nt - jj).min(4);
                    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
                    let kp = kv.as_ptr().add(jj * hd);
                    for d in (0..hd).step_by(2) {
                        let q0 = _mm512_loadu_ps(qt.as_ptr().add(d * LANES));
                        let q1 = _mm512_loadu_ps(qt.as_ptr().add((d + 1) * LANES));
                        for (r, a) in acc.iter_mut().enumerate() {
                            let kr = kp.add(r * hd + d);
                            a[0] = _mm512_fmadd_ps(q0, _mm512_set1_ps(*kr), a[0]);
                            a[1] = _mm512_fmadd_ps(q1, _mm512_set1_ps(*kr.add(1)), a[1]);
                        }
                    }
                    for (r, a) in acc.iter().enumerate().take(n4) {
                        let j = j0 + jj + r;
                        let mut sc = _mm512_mul_ps(_mm512_add_ps(a[0], a[1]), scale);
                        if let Some(cap) = p.softcap {
                            sc = softcap(sc, cap);
                        }
                        let vj = _mm512_set1_epi32(j as i32);
                        let ok =
                            _mm512_cmple_epi32_mask(vstart, vj) & _mm512_cmple_epi32_mask(vj, vend);
                        let sc = _mm512_mask_blend_ps(ok, ninf, sc);
                        vmax = _mm512_max_ps(vmax, sc);
                        _mm512_storeu_ps(s.as_mut_ptr().add((j - kmin) * LANES), sc);
                    }
                    jj += 4;
                }
                j0 += nt;
            }

            // Softmax: exponentials summed in f64, probabilities rounded to f16.
            let mut sum_lo = _mm512_setzero_pd();
            let mut sum_hi = _mm512_setzero_pd();
            for j in 0..nk {
                let sp = s.as_mut_ptr().add(j * LANES);
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(sp), vmax));
                _mm512_storeu_ps(sp, e);
                sum_lo = _mm512_add_pd(sum_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
                sum_hi = _mm512_add_pd(sum_hi, _mm512_cvtps_pd(hi));
            }
            let one = _mm512_set1_pd(1.0);
            let inv = _mm512_insertf32x8::<1>(
                _mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_div_pd(one, sum_lo))),
                _mm512_cvtpd_ps(_mm512_div_pd(one, sum_hi)),
            );
            for j in 0..nk {
                let sp = s.as_mut_ptr().add(j * LANES);
                let pr = _mm512_mul_ps(_mm512_loadu_ps(sp), inv);
                let pr = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(pr));
                _mm512_storeu_ps(sp, pr);
            }

            // Weighted sum of values: 16 dimensions × 16 queries in registers per key tile.
            ot.fill(0.0);
            let mut j0 = kmin;
            while j0 <= kmax {
                let nt = (kmax + 1 - j0).min(KEY_TILE);
                convert_rows(v, j0, nt, b.kv_head, hd, kv.as_mut_ptr());
                for d0 in (0..hd).step_by(16) {
                    let op = ot.as_mut_ptr().add(d0 * LANES);
                    let mut acc: [__m512; 16] =
                        std::array::from_fn(|dd| _mm512_loadu_ps(op.add(dd * LANES)));
                    for jj in 0..nt {
                        let pr = _mm512_loadu_ps(s.as_ptr().add((j0 + jj - kmin) * LANES));
                        let vr = kv.as_ptr().add(jj * hd + d0);
                        for (dd, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(pr, _mm512_set1_ps(*vr.add(dd)), *a);
                        }
                    }
                    for (dd, a) in acc.iter().enumerate() {
                        _mm512_storeu_ps(op.add(dd * LANES), *a);
                    }
                }
                j0 += nt;
            }
        }

        // SAFETY: the rows of this block's queries are this thread's (caller's contract).
        unsafe { pre.store(p, b, ot, out) };
    });
}

/// `cap · tanh(s / cap)`, with `tanh y = 1 - 2 / (e^{2y} + 1)`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
fn softcap(s: __m512, cap: f32) -> __m512 {
    let e = exp(_mm512_mul_ps(s, _mm512_set1_ps(2.0 / cap)));
    let one = _mm512_set1_ps(1.0);
    let th = _mm512_sub_ps(
        one,
        _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e, one)),
    );
    _mm512_mul_ps(th, _mm512_set1_ps(cap))
}

/// Converts `n` rows (positions `j0..j0 + n`, KV head `kvh`, `hd` values each) of a cache to
/// f32 rows of `hd` at `dst`.
///
/// # Safety
/// The CPU must support AVX-512F/BW; the positions are inside `src`, `dst` is valid for
/// `n * hd` f32, `hd` is a multiple of 32 for a quantized cache and of 16 for f16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn convert_rows(src: &KvPages, j0: usize, n: usize, kvh: usize, hd: usize, dst: *mut f32) {
    match src.ty() {
        GgmlType::Q8_0 => {
            for jj in 0..n {
                let row = src.head(j0 + jj, kvh, hd);
                for (b, blk) in row.chunks_exact(34).enumerate() {
                    let d = _mm512_set1_ps(f16::from_le_bytes([blk[0], blk[1]]).to_f32());
                    for half in 0..2 {
                        // SAFETY: 16 quants at 2 + 16 * half inside the 34-byte block; the
                        // destination is this row's block b, inside `dst` (contract).
                        unsafe {
                            let q = _mm_loadu_si128(blk.as_ptr().add(2 + 16 * half).cast());
                            let x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                            _mm512_storeu_ps(
                                dst.add(jj * hd + 32 * b + 16 * half),
                                _mm512_mul_ps(x, d),
                            );
                        }
                    }
                }
            }
        }
        GgmlType::Q4_0 => {
            let mask = _mm_set1_epi8(0x0f);
            let eight = _mm512_set1_epi32(8);
            for jj in 0..n {
                let row = src.head(j0 + jj, kvh, hd);
                for (b, blk) in row.chunks_exact(18).enumerate() {
                    let d = _mm512_set1_ps(f16::from_le_bytes([blk[0], blk[1]]).to_f32());
                    // SAFETY: 16 quant bytes at 2 inside the 18-byte block; the destination is
                    // this row's block b, inside `dst` (contract).
                    unsafe {
                        let q = _mm_loadu_si128(blk.as_ptr().add(2).cast());
                        let lo = _mm_and_si128(q, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                        for (half, nib) in [lo, hi].into_iter().enumerate() {
                            let x = _mm512_sub_epi32(_mm512_cvtepu8_epi32(nib), eight);
                            let x = _mm512_mul_ps(_mm512_cvtepi32_ps(x), d);
                            _mm512_storeu_ps(dst.add(jj * hd + 32 * b + 16 * half), x);
                        }
                    }
                }
            }
        }
        _ => {
            for jj in 0..n {
                let row = src.head_f16(j0 + jj, kvh, hd);
                for d in (0..hd).step_by(16) {
                    // SAFETY: d + 16 <= hd, inside `row` and inside `dst`'s row jj (contract).
                    unsafe {
                        let h = _mm256_loadu_si256(row.as_ptr().add(d).cast());
                        _mm512_storeu_ps(dst.add(jj * hd + d), _mm512_cvtph_ps(h));
                    }
                }
            }
        }
    }
}
