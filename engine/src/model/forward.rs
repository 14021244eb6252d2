//! The forward pass: one batch of tokens through every block, composed from the shared
//! kernels of `strata-simd`.

use std::ops::Range;
use std::sync::Arc;

use strata_simd::matmul::{MatRef, MatmulScratch, matmul};
use strata_simd::ops::{
    AttnParams, attention, gelu_tanh_mul, rms_norm, rms_norm_inplace, silu_mul,
};
use strata_simd::pool::ThreadPool;
use strata_storage::quant::dequantize_row;
use strata_storage::residency::TensorHandle;

use super::{Activation, Mat, Model, ModelConfig};
use crate::error::EngineError;
use crate::kv::KvCache;

/// Which of a call's tokens get logits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token.
    All,
    /// Tokens in this range of the call's batch (perplexity).
    Range(Range<usize>),
    /// None (filling the cache only).
    None,
}

/// The per-sequence state of a model: its KV cache and the scratch buffers of the forward
/// pass, reused from step to step so that a decode step allocates nothing.
pub struct Context {
    pub(crate) kv: KvCache,
    pool: Arc<ThreadPool>,
    mm: MatmulScratch,
    buf: Buffers,
    logits: Vec<f32>,
    n_ubatch: usize,
    cs: Vec<(f32, f32)>,
}

#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
}

impl Context {
    pub(crate) fn new(c: &ModelConfig, n_ctx: usize, pool: Arc<ThreadPool>) -> Self {
        Self {
            kv: KvCache::new(c.n_layer, n_ctx, c.kv_dim()),
            pool,
            mm: MatmulScratch::new(),
            buf: Buffers::default(),
            logits: Vec::new(),
            n_ubatch: 512,
            cs: vec![(0.0, 0.0); c.n_rot / 2],
        }
    }

    /// Positions already in the cache.
    pub fn n_past(&self) -> usize {
        self.kv.len()
    }

    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx()
    }

    /// Drops every cached position from `n` on (to reuse a shared prefix).
    pub fn truncate(&mut self, n: usize) {
        self.kv.truncate(n);
    }

    pub fn clear(&mut self) {
        self.kv.clear();
    }

    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    pub fn kv_bytes(&self) -> usize {
        self.kv.size_bytes()
    }

    /// Sets how many tokens one pass through the layers takes at most (prefill chunking).
    pub fn set_n_ubatch(&mut self, n: usize) {
        self.n_ubatch = n.max(1);
    }
}

impl Model {
    /// Appends `tokens` to the context's sequence and returns logits for the rows `logits`
    /// asks for, `n_vocab` floats per row.
    pub fn forward<'c>(
        &self,
        ctx: &'c mut Context,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<&'c [f32], EngineError> {
        let n = tokens.len();
        let c = &self.config;
        if n == 0 {
            return Err(EngineError::Invalid("forward called with no tokens".into()));
        }
        let pos0 = ctx.kv.len();
        if pos0 + n > ctx.kv.n_ctx() {
            return Err(EngineError::ContextFull {
                needed: pos0 + n,
                n_ctx: ctx.kv.n_ctx(),
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(EngineError::BadToken {
                id,
                n_vocab: c.n_vocab,
            });
        }
        let want = match logits {
            Logits::Last => n - 1..n,
            Logits::All => 0..n,
            Logits::None => 0..0,
            Logits::Range(r) if r.start <= r.end && r.end <= n => r,
            Logits::Range(r) => {
                return Err(EngineError::Invalid(format!(
                    "logits range {r:?} outside a batch of {n}"
                )));
            }
        };
        ctx.logits.resize(want.len() * c.n_vocab, 0.0);
        let mut start = 0;
        while start < n {
            let end = (start + ctx.n_ubatch).min(n);
            self.ubatch(ctx, &tokens[start..end], pos0 + start)?;
            ctx.kv.set_len(pos0 + end);
            let (lo, hi) = (want.start.max(start), want.end.min(end));
            if lo < hi {
                self.output_logits(ctx, lo - start..hi - start, lo - want.start)?;
            }
            start = end;
        }
        Ok(&ctx.logits)
    }

    /// One pass of `tokens` (at positions `pos0..`) through all layers; leaves the final
    /// hidden states in `ctx.buf.x`.
    fn ubatch(&self, ctx: &mut Context, tokens: &[u32], pos0: usize) -> Result<(), EngineError> {
        let c = &self.config;
        let n = tokens.len();
        let (e, qd, kvd, ff, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.head_dim);
        let Context {
            kv,
            pool,
            mm,
            buf,
            cs,
            ..
        } = ctx;
        let pool: &ThreadPool = pool;
        for (b, len) in [
            (&mut buf.x, e),
            (&mut buf.xb, e),
            (&mut buf.q, qd),
            (&mut buf.k, kvd),
            (&mut buf.v, kvd),
            (&mut buf.att, qd),
            (&mut buf.g, ff),
            (&mut buf.u, ff),
        ] {
            b.resize(n * len, 0.0);
        }

        // Token embeddings.
        let embd = self.acquire(self.token_embd)?;
        let row_bytes = self.token_embd.ty.row_bytes(e);
        let scale = (e as f32).sqrt();
        for (t, &tok) in tokens.iter().enumerate() {
            let src = &embd.bytes()[tok as usize * row_bytes..][..row_bytes];
            let dst = &mut buf.x[t * e..(t + 1) * e];
            dequantize_row(self.token_embd.ty, src, dst)
                .map_err(|err| EngineError::Invalid(err.to_string()))?;
            if c.traits.embed_scale {
                dst.iter_mut().for_each(|v| *v *= scale);
            }
        }
        drop(embd);

        for (il, layer) in self.layers.iter().enumerate() {
            // Attention block.
            for t in 0..n {
                rms_norm(
                    &buf.x[t * e..(t + 1) * e],
                    &layer.attn_norm,
                    c.rms_eps,
                    &mut buf.xb[t * e..(t + 1) * e],
                );
            }
            self.matmul(pool, mm, layer.q, &buf.xb, n, &mut buf.q)?;
            self.matmul(pool, mm, layer.k, &buf.xb, n, &mut buf.k)?;
            self.matmul(pool, mm, layer.v, &buf.xb, n, &mut buf.v)?;
            for (out, bias, d) in [
                (&mut buf.q, &layer.q_bias, qd),
                (&mut buf.k, &layer.k_bias, kvd),
                (&mut buf.v, &layer.v_bias, kvd),
            ] {
                if let Some(b) = bias {
                    for row in out.chunks_exact_mut(d) {
                        row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                    }
                }
            }
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                buf.q
                    .chunks_exact_mut(hd)
                    .for_each(|h| rms_norm_inplace(h, qn, c.rms_eps));
                buf.k
                    .chunks_exact_mut(hd)
                    .for_each(|h| rms_norm_inplace(h, kn, c.rms_eps));
            }
            let rope = if layer.swa {
                &self.rope_swa
            } else {
                &self.rope_global
            };
            for t in 0..n {
                rope.angles(pos0 + t, cs);
                rope.apply(&mut buf.q[t * qd..(t + 1) * qd], hd, cs);
                rope.apply(&mut buf.k[t * kvd..(t + 1) * kvd], hd, cs);
            }
            kv.store(il, pos0, &buf.k, &buf.v);
            let (kc, vc) = kv.layer(il);
            let params = AttnParams {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim: hd,
                scale: c.attn_scale,
                window: if layer.swa { c.sliding_window } else { None },
                softcap: None,
            };
            attention(pool, &params, &buf.q, n, pos0, kc, vc, &mut buf.att);
            self.matmul(pool, mm, layer.o, &buf.att, n, &mut buf.xb)?;
            residual(
                &mut buf.x,
                &mut buf.xb,
                layer.post_attn_norm.as_deref(),
                e,
                c.rms_eps,
            );

            // Feed-forward block.
            for t in 0..n {
                rms_norm(
                    &buf.x[t * e..(t + 1) * e],
                    &layer.ffn_norm,
                    c.rms_eps,
                    &mut buf.xb[t * e..(t + 1) * e],
                );
            }
            self.matmul(pool, mm, layer.gate, &buf.xb, n, &mut buf.g)?;
            self.matmul(pool, mm, layer.up, &buf.xb, n, &mut buf.u)?;
            match c.traits.act {
                Activation::Silu => silu_mul(&mut buf.g, &buf.u),
                Activation::GeluTanh => gelu_tanh_mul(&mut buf.g, &buf.u),
            }
            self.matmul(pool, mm, layer.down, &buf.g, n, &mut buf.xb)?;
            residual(
                &mut buf.x,
                &mut buf.xb,
                layer.post_ffn_norm.as_deref(),
                e,
                c.rms_eps,
            );
        }
        Ok(())
    }

    /// Final norm and the output projection for ubatch rows `rows`, written to the context's
    /// logits from row `out_row` on.
    fn output_logits(
        &self,
        ctx: &mut Context,
        rows: Range<usize>,
        out_row: usize,
    ) -> Result<(), EngineError> {
        let c = &self.config;
        let e = c.n_embd;
        let m = rows.len();
        let Context {
            pool,
            mm,
            buf,
            logits,
            ..
        } = ctx;
        for (i, t) in rows.enumerate() {
            rms_norm(
                &buf.x[t * e..(t + 1) * e],
                &self.output_norm,
                c.rms_eps,
                &mut buf.xb[i * e..(i + 1) * e],
            );
        }
        let out = &mut logits[out_row * c.n_vocab..(out_row + m) * c.n_vocab];
        self.matmul(pool, mm, self.output, &buf.xb[..m * e], m, out)
    }

    fn acquire(&self, m: Mat) -> Result<TensorHandle, EngineError> {
        Ok(self.weights.acquire(m.id)?)
    }

    fn matmul(
        &self,
        pool: &ThreadPool,
        mm: &mut MatmulScratch,
        m: Mat,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        let h = self.acquire(m)?;
        let w = MatRef {
            ty: m.ty,
            data: h.bytes(),
            rows: m.rows,
            cols: m.cols,
        };
        matmul(pool, w, &x[..n * m.cols], n, &mut out[..n * m.rows], mm)?;
        Ok(())
    }
}

/// `x += norm(y)` (or `x += y` without a post-norm), row by row.
fn residual(x: &mut [f32], y: &mut [f32], post_norm: Option<&[f32]>, e: usize, eps: f32) {
    let n = x.len() / e;
    for t in 0..n {
        let yr = &mut y[t * e..(t + 1) * e];
        if let Some(w) = post_norm {
            rms_norm_inplace(yr, w, eps);
        }
        x[t * e..(t + 1) * e]
            .iter_mut()
            .zip(yr.iter())
            .for_each(|(a, b)| *a += b);
    }
}
