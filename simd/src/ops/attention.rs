//! Attention over an f16 KV cache, for prefill (many queries, causal) and decode (one query).
//!
//! Work is split over (token, head) pairs across the pool. Numerics follow ggml's non-fused
//! CPU path, which the reference outputs come from: scores in f32 from an f16 key, a
//! max-subtracted softmax in f32, and probabilities rounded to f16 before they weight the f16
//! values.

use std::cell::RefCell;

use half::f16;

use super::f16v::{axpy_f16, dot_f16};
use crate::pool::ThreadPool;

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
/// `[position][n_head_kv][head_dim]`. Writes `out` in q's layout.
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
    let hd = p.head_dim;
    let stride = p.n_head_kv * hd;
    assert!(
        p.n_head.is_multiple_of(p.n_head_kv),
        "heads must be a multiple of KV heads"
    );
    assert!(q.len() >= n_tok * p.n_head * hd && out.len() >= n_tok * p.n_head * hd);
    assert!(k.len() >= (pos0 + n_tok) * stride && v.len() >= (pos0 + n_tok) * stride);
    let group = p.n_head / p.n_head_kv;
    let items = n_tok * p.n_head;
    let out_ptr = SyncPtr(out.as_mut_ptr());
    pool.run(|tid, nth| {
        let (lo, hi) = split(items, tid, nth);
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let Scratch { scores, qh } = &mut *scratch;
            qh.resize(hd, 0.0);
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
                let mut max = f32::NEG_INFINITY;
                for kp in start..=pos {
                    let off = kp * stride + kvh * hd;
                    let mut s = dot_f16(qh, &k[off..off + hd]) * p.scale;
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
                    let off = (start + j) * stride + kvh * hd;
                    axpy_f16(o, w, &v[off..off + hd]);
                }
            }
        });
    });
}

#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    qh: Vec<f32>,
}

thread_local! {
    // Pool threads are persistent, so these buffers are allocated once per thread.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

struct SyncPtr(*mut f32);
// SAFETY: only used to hand disjoint sub-slices of one `&mut [f32]` to pool threads.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// A method (not field access) so closures capture the whole `Sync` wrapper.
    fn get(&self) -> *mut f32 {
        self.0
    }
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
