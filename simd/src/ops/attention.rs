//! Attention over a KV cache (f16, Q8_0 or Q4_0, in pages), for prefill (many queries, causal) and decode (one query).
//!
//! On AVX-512 and AVX2, queries that share a KV head run in blocks of 16 or 8, one per lane
//! ([`tiled`], [`tiled_avx2`]: the two give the same bits); otherwise work is split over
//! (token, head) pairs across the pool. Numerics follow ggml's non-fused
//! CPU path, which the reference outputs come from: scores in f32 from an f16 key, a
//! max-subtracted softmax in f32, and probabilities rounded to f16 before they weight the f16
//! values.

use std::cell::RefCell;

use half::f16;
use strata_storage::quant::GgmlType;

use super::f16v::{axpy_f16, dot_f16};
use crate::dispatch::{Level, level};
use crate::pool::{SyncPtr, ThreadPool};

mod kv;
#[cfg(target_arch = "x86_64")]
mod tiled;
#[cfg(target_arch = "x86_64")]
mod tiled_avx2;

pub use kv::{KV_TYPES, KvPages, f16_bytes, kv_store_row, kv_type_fits};

/// Shape and options of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Multiplies q·k before the softmax.
    pub scale: f32,
    /// Sliding window: a query at position p sees keys at positions > p - window.
    pub window: Option<usize>,
    /// Logit soft-capping `cap * tanh(s / cap)` (Gemma 2).
    pub softcap: Option<f32>,
}

/// `q` holds `n_tok` tokens × `n_head` heads × `head_dim`; token `t` sits at position
/// `pos0 + t`. `k` and `v` hold at least `pos0 + n_tok` positions laid out
/// `[position][n_head_kv][head_dim]` in f16. Writes `out` in q's layout.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    pool: &ThreadPool,
    p: &AttnParams,
    q: &[f32],
    n_tok: usize,
    pos0: usize,
    k: &[f16],
    v: &[f16],
    out: &mut [f32],
) {
    let width = p.n_head_kv * p.head_dim;
    let (kb, vb) = ([f16_bytes(k)], [f16_bytes(v)]);
    let kp = KvPages::new(GgmlType::F16, k.len() / width, width, &kb);
    let vp = KvPages::new(GgmlType::F16, v.len() / width, width, &vb);
    attention_at(level(), pool, p, q, n_tok, pos0, &kp, &vp, out)
}

/// [`attention`] over a paged cache of any of [`KV_TYPES`] (keys and values may differ).
#[allow(clippy::too_many_arguments)]
pub fn attention_paged(
    pool: &ThreadPool,
    p: &AttnParams,
    q: &[f32],
    n_tok: usize,
    pos0: usize,
    k: &KvPages,
    v: &KvPages,
    out: &mut [f32],
) {
    attention_at(level(), pool, p, q, n_tok, pos0, k, v, out)
}

/// [`attention_paged`] at an explicit SIMD level (lowered to what the CPU has), for tests and
/// benches that compare the tiled path with the per-query one.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn attention_at(
    level: Level,
    pool: &ThreadPool,
    p: &AttnParams,
    q: &[f32],
    n_tok: usize,
    pos0: usize,
    k: &KvPages,
    v: &KvPages,
    out: &mut [f32],
) {
    #[cfg_attr(
        not(target_arch = "x86_64"),
        expect(unused_variables, reason = "only x86 has a wider attention kernel")
    )]
    let level = level.min(crate::dispatch::detected());
    let hd = p.head_dim;
    assert!(
        p.n_head.is_multiple_of(p.n_head_kv),
        "heads must be a multiple of KV heads"
    );
    assert!(q.len() >= n_tok * p.n_head * hd && out.len() >= n_tok * p.n_head * hd);
    assert!(k.positions() >= pos0 + n_tok && v.positions() >= pos0 + n_tok);
    assert!(kv_type_fits(k.ty(), hd) && kv_type_fits(v.ty(), hd));
    let group = p.n_head / p.n_head_kv;
    let out_ptr = SyncPtr(out.as_mut_ptr());
    // Decode takes the same path as prefill: a query's result then does not depend on how
    // many tokens came with it (the per-query path sums in another order and rounds
    // probabilities to f16 at other points), so prefill and token-by-token agree closely.
    // The choice depends on the level and the head size only, never on `n_tok`.
    #[cfg(target_arch = "x86_64")]
    {
        if hd.is_multiple_of(16) && level >= Level::Avx512 {
            tiled_attention(Wide::Avx512, pool, p, q, n_tok, pos0, k, v, &out_ptr);
            return;
        }
        if hd.is_multiple_of(8) && level >= Level::Avx2 {
            tiled_attention(Wide::Avx2, pool, p, q, n_tok, pos0, k, v, &out_ptr);
            return;
        }
    }
    let items = n_tok * p.n_head;
    let f16_kv = (k.ty(), v.ty()) == (GgmlType::F16, GgmlType::F16);
    pool.run(|tid, nth| {
        let (lo, hi) = split(items, tid, nth);
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let Scratch { scores, qh, row } = &mut *scratch;
            qh.resize(hd, 0.0);
            row.resize(hd, 0.0);
            for item in lo..hi {
                let (t, h) = (item / p.n_head, item % p.n_head);
                let kvh = h / group;
                let pos = pos0 + t;
                let start = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                // ggml rounds the query to f16 when it multiplies it with an f16 key.
                for (d, &s) in qh.iter_mut().zip(&q[item * hd..(item + 1) * hd]) {
                    *d = f16::from_f32(s).to_f32();
                }
                scores.clear();
                // Grown 256 positions at a time (a KV cache page), as the tiled kernel's.
                let n_keys = pos + 1 - start;
                if scores.capacity() < n_keys {
                    scores.reserve_exact(n_keys.next_multiple_of(256));
                }
                let mut max = f32::NEG_INFINITY;
                for kp in start..=pos {
                    let mut s = if f16_kv {
                        dot_f16(qh, k.head_f16(kp, kvh, hd))
                    } else {
                        k.head_to_f32(kp, kvh, hd, row);
                        qh.iter().zip(row.iter()).map(|(a, b)| a * b).sum()
                    } * p.scale;
                    if let Some(cap) = p.softcap {
                        s = cap * (s / cap).tanh();
                    }
                    max = max.max(s);
                    scores.push(s);
                }
                let mut sum = 0f64;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s as f64;
                }
                let inv = (1.0 / sum) as f32;
                // SAFETY: item ranges of different threads are disjoint, so each thread writes
                // a disjoint `hd`-sized slice of `out`, which outlives `pool.run`.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(item * hd), hd) };
                o.fill(0.0);
                for (j, &s) in scores.iter().enumerate() {
                    let w = f16::from_f32(s * inv).to_f32();
                    if f16_kv {
                        axpy_f16(o, w, v.head_f16(start + j, kvh, hd));
                    } else {
                        v.head_to_f32(start + j, kvh, hd, row);
                        o.iter_mut().zip(row.iter()).for_each(|(o, x)| *o += w * x);
                    }
                }
            }
        });
    });
}

/// The tiled kernels' widths.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Wide {
    /// [`tiled::block`], 16 lanes.
    Avx512,
    /// [`tiled_avx2::block`], 8 lanes.
    Avx2,
}

/// Attention through the tiled kernels: each KV head's queries, (token, head) in order, cut
/// into blocks of up to one per lane, dealt to the threads round-robin so that the long causal
/// rows at the end are spread over all of them.
///
/// Where a full block per KV head would leave threads idle (decode: one token's group of
/// heads), the blocks are cut smaller so that every thread gets one. That keeps the results:
/// a lane computes the same sums in the same order whatever else shares its block (keys
/// outside its range enter as exact zeros).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn tiled_attention(
    wide: Wide,
    pool: &ThreadPool,
    p: &AttnParams,
    q: &[f32],
    n_tok: usize,
    pos0: usize,
    k: &KvPages,
    v: &KvPages,
    out: &SyncPtr<f32>,
) {
    let group = p.n_head / p.n_head_kv;
    let per_head = n_tok * group;
    let lanes = match wide {
        Wide::Avx512 => tiled::LANES,
        Wide::Avx2 => tiled_avx2::LANES,
    };
    let want_per_head = pool.n_threads().div_ceil(p.n_head_kv).max(1);
    let per_block = lanes.min(per_head.div_ceil(want_per_head)).max(1);
    let blocks_per_head = per_head.div_ceil(per_block);
    let blocks = p.n_head_kv * blocks_per_head;
    pool.run(|tid, nth| {
        for bi in (tid..blocks).step_by(nth) {
            let (g, blk) = (bi / blocks_per_head, bi % blocks_per_head);
            let b = tiled::Block {
                kv_head: g,
                queries: std::array::from_fn(|l| {
                    let i = blk * per_block + l;
                    (l < per_block && i < per_head).then(|| (i / group, g * group + i % group))
                }),
            };
            // SAFETY: the level was lowered to what the CPU has, so the kernel's features are
            // present, and hd is a multiple of its width (checked before choosing it);
            // `attention` asserted the lengths of q, k, v and out; blocks partition the
            // (token, head) pairs, so each output row is written by one thread only.
            unsafe {
                match wide {
                    Wide::Avx512 => tiled::block(p, q, pos0, k, v, &b, out.get()),
                    Wide::Avx2 => tiled_avx2::block(p, q, pos0, k, v, &b, out.get()),
                }
            }
        }
    });
}

#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    qh: Vec<f32>,
    /// One key or value row in f32 (a quantized cache).
    row: Vec<f32>,
}

thread_local! {
    // Pool threads are persistent, so these buffers are allocated once per thread.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The `tid`-th of `nth` near-equal contiguous ranges of `0..n`.
pub(crate) fn split(n: usize, tid: usize, nth: usize) -> (usize, usize) {
    let per = n / nth;
    let rem = n % nth;
    let lo = tid * per + tid.min(rem);
    (lo, lo + per + usize::from(tid < rem))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 attention for comparison.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        p: &AttnParams,
        q: &[f32],
        n_tok: usize,
        pos0: usize,
        k: &[f16],
        v: &[f16],
    ) -> Vec<f32> {
        let hd = p.head_dim;
        let stride = p.n_head_kv * hd;
        let mut out = vec![0f32; n_tok * p.n_head * hd];
        for t in 0..n_tok {
            for h in 0..p.n_head {
                let kvh = h / (p.n_head / p.n_head_kv);
                let pos = pos0 + t;
                let start = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let qv = &q[(t * p.n_head + h) * hd..][..hd];
                let s: Vec<f64> = (start..=pos)
                    .map(|kp| {
                        let kr = &k[kp * stride + kvh * hd..][..hd];
                        qv.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * b.to_f64())
                            .sum::<f64>()
                            * p.scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    let vr = &v[(start + j) * stride + kvh * hd..][..hd];
                    for d in 0..hd {
                        out[(t * p.n_head + h) * hd + d] += (w / z * vr[d].to_f64()) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_with_gqa_and_window() {
        let pool = ThreadPool::new(2);
        let (n_head, n_head_kv, hd) = (4, 2, 32);
        let total = 19;
        let mut seed = 12345u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let k: Vec<f16> = (0..total * n_head_kv * hd)
            .map(|_| f16::from_f32(rnd()))
            .collect();
        let v: Vec<f16> = (0..total * n_head_kv * hd)
            .map(|_| f16::from_f32(rnd()))
            .collect();
        for (n_tok, pos0, window) in [
            (7, 12, None),
            (1, 18, None),
            (19, 0, Some(5)),
            (3, 10, Some(4)),
        ] {
            let q: Vec<f32> = (0..n_tok * n_head * hd).map(|_| rnd() * 4.0).collect();
            let p = AttnParams {
                n_head,
                n_head_kv,
                head_dim: hd,
                scale: 0.3,
                window,
                softcap: None,
            };
            let mut out = vec![0f32; q.len()];
            attention(&pool, &p, &q, n_tok, pos0, &k, &v, &mut out);
            let want = naive(&p, &q, n_tok, pos0, &k, &v);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 2e-3, "{a} vs {b}");
            }
        }
    }

    /// The levels with a tiled kernel that this CPU has.
    fn tiled_levels() -> Vec<Level> {
        let lv: Vec<Level> = [Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|&l| crate::dispatch::available(l))
            .collect();
        if lv.is_empty() {
            eprintln!("tiled kernels skipped: no AVX2");
        }
        lv
    }

    /// The tiled paths (16 and 8 lanes) against the per-query one (their scalar twin) over head
    /// sizes, GQA groups that do and do not divide the lanes, cache offsets, windows and
    /// soft-capping; and the two tiled kernels against each other, bit for bit (a head size
    /// that is a multiple of 8 but not 16 takes the 8-lane kernel at both levels).
    #[test]
    fn tiled_matches_per_query() {
        let levels = tiled_levels();
        let pool = ThreadPool::new(2);
        let mut seed = 777u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (n_head, n_head_kv, hd) in [
            (4, 1, 256),
            (12, 2, 128),
            (3, 3, 16),
            (8, 8, 64),
            (6, 2, 24),
        ] {
            for (n_tok, pos0, window, softcap) in [
                (1, 0, None, None),
                (2, 0, None, None),
                (5, 3, None, None),
                (37, 0, None, None),
                (40, 21, Some(9), None),
                (19, 50, None, Some(30.0)),
            ] {
                let total = pos0 + n_tok;
                let stride = n_head_kv * hd;
                let k: Vec<f16> = (0..total * stride).map(|_| f16::from_f32(rnd())).collect();
                let v: Vec<f16> = (0..total * stride).map(|_| f16::from_f32(rnd())).collect();
                let q: Vec<f32> = (0..n_tok * n_head * hd).map(|_| rnd() * 3.0).collect();
                let p = AttnParams {
                    n_head,
                    n_head_kv,
                    head_dim: hd,
                    scale: 1.0 / (hd as f32).sqrt(),
                    window,
                    softcap,
                };
                let (kb, vb) = ([f16_bytes(&k)], [f16_bytes(&v)]);
                let kp = KvPages::new(GgmlType::F16, total, stride, &kb);
                let vp = KvPages::new(GgmlType::F16, total, stride, &vb);
                let run = |lvl: Level| {
                    let mut o = vec![f32::NAN; q.len()];
                    attention_at(lvl, &pool, &p, &q, n_tok, pos0, &kp, &vp, &mut o);
                    o
                };
                let want = run(Level::Scalar);
                let mut first: Option<Vec<f32>> = None;
                for &lvl in &levels {
                    let got = run(lvl);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        // Sums in a different order; probabilities rounded to f16 in both, so
                        // one may land on the other side of an f16 rounding step (2^-11
                        // relative).
                        assert!(
                            (a - b).abs() < 2e-4,
                            "{lvl:?} heads {n_head}/{n_head_kv} hd {hd} n_tok {n_tok} pos0 \
                             {pos0} window {window:?} softcap {softcap:?} [{i}]: {a} vs {b}"
                        );
                    }
                    match &first {
                        None => first = Some(got),
                        Some(f) => assert_eq!(
                            f.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            "AVX2 and AVX-512 kernels differ: hd {hd} n_tok {n_tok}"
                        ),
                    }
                }
            }
        }
    }

    /// A query's output is the same bits whether it comes alone (decode) or in a batch of
    /// tokens (prefill), whichever block and lane it lands in, at every level this CPU has
    /// and with 1, 2 or 3 threads (the tiled path sizes its blocks by the thread count).
    /// Pins the invariant of `attention_at`'s comment: decode and prefill take one path.
    #[test]
    fn query_result_independent_of_batch() {
        let mut seed = 4242u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let mut levels = vec![Level::Scalar];
        levels.extend(tiled_levels());
        for (n_head, n_head_kv, hd, window, softcap) in [
            (4, 1, 256, None, None),
            (12, 2, 128, Some(7), None),
            (6, 3, 64, None, Some(20.0)),
            (6, 2, 24, None, None),
        ] {
            let (pos0, n_tok) = (5usize, 21usize);
            let total = pos0 + n_tok;
            let stride = n_head_kv * hd;
            let k: Vec<f16> = (0..total * stride).map(|_| f16::from_f32(rnd())).collect();
            let v: Vec<f16> = (0..total * stride).map(|_| f16::from_f32(rnd())).collect();
            let q: Vec<f32> = (0..n_tok * n_head * hd).map(|_| rnd() * 3.0).collect();
            let p = AttnParams {
                n_head,
                n_head_kv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
                softcap,
            };
            let (kb, vb) = ([f16_bytes(&k)], [f16_bytes(&v)]);
            let kp = KvPages::new(GgmlType::F16, total, stride, &kb);
            let vp = KvPages::new(GgmlType::F16, total, stride, &vb);
            let row = n_head * hd;
            for &lvl in &levels {
                for threads in [1, 2, 3] {
                    let pool = ThreadPool::new(threads);
                    let mut batch = vec![f32::NAN; q.len()];
                    attention_at(lvl, &pool, &p, &q, n_tok, pos0, &kp, &vp, &mut batch);
                    // Each token alone, and the batch's tail from a middle token on.
                    for t in 0..n_tok {
                        let mut one = vec![f32::NAN; row];
                        let qt = &q[t * row..][..row];
                        attention_at(lvl, &pool, &p, qt, 1, pos0 + t, &kp, &vp, &mut one);
                        assert_eq!(
                            one.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            batch[t * row..][..row]
                                .iter()
                                .map(|x| x.to_bits())
                                .collect::<Vec<_>>(),
                            "{lvl:?} {threads} threads hd {hd} token {t}"
                        );
                    }
                    let t0 = 9;
                    let mut tail = vec![f32::NAN; (n_tok - t0) * row];
                    let qt = &q[t0 * row..];
                    attention_at(
                        lvl,
                        &pool,
                        &p,
                        qt,
                        n_tok - t0,
                        pos0 + t0,
                        &kp,
                        &vp,
                        &mut tail,
                    );
                    assert_eq!(
                        tail.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        batch[t0 * row..]
                            .iter()
                            .map(|x| x.to_bits())
                            .collect::<Vec<_>>(),
                        "{lvl:?} {threads} threads hd {hd} tail"
                    );
                }
            }
        }
    }

    /// A paged cache of each type: f16 pages give exactly the contiguous result; quantized
    /// ones match the naive attention over their dequantized values, on every level present.
    #[test]
    fn paged_and_quantized_caches() {
        let pool = ThreadPool::new(2);
        let mut seed = 99u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let (n_head, n_head_kv, hd, page) = (6usize, 2usize, 64usize, 16usize);
        let width = n_head_kv * hd;
        let (n_tok, pos0) = (9usize, 40usize);
        let total = pos0 + n_tok;
        let n_pages = total.div_ceil(page);
        let kf: Vec<f32> = (0..n_pages * page * width).map(|_| rnd()).collect();
        let vf: Vec<f32> = (0..n_pages * page * width).map(|_| rnd()).collect();
        let q: Vec<f32> = (0..n_tok * n_head * hd).map(|_| rnd() * 3.0).collect();
        let p = AttnParams {
            n_head,
            n_head_kv,
            head_dim: hd,
            scale: 0.125,
            window: None,
            softcap: None,
        };
        for ty in KV_TYPES {
            let rb = ty.row_bytes(width);
            // Pages as separate allocations of u16 (aligned for f16), rows quantized one by one.
            let pages = |src: &[f32]| -> Vec<Vec<u16>> {
                (0..n_pages)
                    .map(|pi| {
                        let mut buf = vec![0u16; (page * rb).div_ceil(2)];
                        // SAFETY: u16 storage viewed as bytes, same memory.
                        let bytes = unsafe {
                            std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), page * rb)
                        };
                        for r in 0..page {
                            let pos = pi * page + r;
                            kv_store_row(
                                ty,
                                &src[pos * width..][..width],
                                &mut bytes[r * rb..][..rb],
                            );
                        }
                        buf
                    })
                    .collect()
            };
            let (kpg, vpg) = (pages(&kf), pages(&vf));
            let as_bytes = |v: &Vec<Vec<u16>>| -> Vec<Vec<u8>> {
                v.iter()
                    .map(|b| b.iter().flat_map(|x| x.to_ne_bytes()).collect())
                    .collect()
            };
            let (kraw, vraw) = (as_bytes(&kpg), as_bytes(&vpg));
            let kslices: Vec<&[u8]> = kpg
                .iter()
                .map(|b| &f16_bytes(u16_as_f16(b))[..page * rb])
                .collect();
            let vslices: Vec<&[u8]> = vpg
                .iter()
                .map(|b| &f16_bytes(u16_as_f16(b))[..page * rb])
                .collect();
            let kp = KvPages::new(ty, page, width, &kslices);
            let vp = KvPages::new(ty, page, width, &vslices);
            // What the cache holds, in f16 for the naive reference (exact for Q8_0/Q4_0 values
            // up to f16 rounding of the product).
            let deq = |raw: &Vec<Vec<u8>>| -> Vec<f16> {
                let mut all = Vec::new();
                for pg in raw {
                    for r in 0..page {
                        let mut row = vec![0f32; width];
                        strata_storage::quant::dequantize_row(ty, &pg[r * rb..][..rb], &mut row)
                            .unwrap();
                        all.extend(row.iter().map(|&x| f16::from_f32(x)));
                    }
                }
                all
            };
            let (kd, vd) = (deq(&kraw), deq(&vraw));
            let want = naive(&p, &q, n_tok, pos0, &kd, &vd);
            for lvl in [Level::Scalar, Level::Avx2, Level::Avx512] {
                let mut got = vec![f32::NAN; q.len()];
                attention_at(lvl, &pool, &p, &q, n_tok, pos0, &kp, &vp, &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() < 3e-3, "{ty:?} {lvl:?} [{i}]: {a} vs {b}");
                }
                if ty == GgmlType::F16 {
                    // Bit for bit what one contiguous page gives.
                    let (kb, vb) = ([f16_bytes(&kd)], [f16_bytes(&vd)]);
                    let kc = KvPages::new(ty, n_pages * page, width, &kb);
                    let vc = KvPages::new(ty, n_pages * page, width, &vb);
                    let mut flat = vec![f32::NAN; q.len()];
                    attention_at(lvl, &pool, &p, &q, n_tok, pos0, &kc, &vc, &mut flat);
                    assert_eq!(got, flat, "{lvl:?}");
                }
            }
        }
    }

    fn u16_as_f16(x: &[u16]) -> &[f16] {
        // SAFETY: f16 is a transparent u16.
        unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f16>(), x.len()) }
    }

    #[test]
    fn split_covers_everything() {
        for n in [0usize, 1, 5, 100] {
            for nth in 1..5 {
                let mut next = 0;
                for tid in 0..nth {
                    let (lo, hi) = split(n, tid, nth);
                    assert_eq!(lo, next);
                    next = hi;
                }
                assert_eq!(next, n);
            }
        }
    }
}
