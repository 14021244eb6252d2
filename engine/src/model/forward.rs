//! The forward pass: one batch of tokens through every block, composed from the shared
//! kernels of `strata-simd`.

use std::ops::Range;
use std::sync::Arc;

use strata_simd::matmul::{
    INTERLEAVE_ROWS, Layout, MatRef, MatmulScratch, deinterleave_tile, matmul,
};
use strata_simd::ops::{
    AttnParams, attention::attention_paged, gelu_tanh_mul, rms_norm, rms_norm_inplace, silu_mul,
};
use strata_simd::pool::ThreadPool;
use strata_storage::quant::dequantize_row;

use strata_storage::residency::TensorHandle;

use super::{Activation, ExpertPrefetch, Experts, Ffn, Mat, Model, ModelConfig, Moe};
use crate::error::EngineError;
use crate::kv::{KvCache, KvOptions, SpillStats};

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
    scratch: Scratch,
    n_ubatch: usize,
}

/// The activations of one forward pass, one row per token of the batch, kept between calls so
/// that a decode step allocates nothing. Each [`Context`] has one; a scheduler that decodes
/// several sequences together with [`Model::decode_batch`] keeps one for the batch.
#[derive(Default)]
pub struct Scratch {
    buf: Buffers,
    mm: MatmulScratch,
    cs: Vec<(f32, f32)>,
    logits: Vec<f32>,
}

impl Scratch {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Rows `row0..row0 + n` of a batch: `n` tokens of one sequence at positions `pos0..`.
struct Slot<'a> {
    kv: &'a mut KvCache,
    pos0: usize,
    row0: usize,
    n: usize,
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
    /// Mixture of experts: router logits, (expert, weight) per token and slot, the tokens of
    /// one expert with their weights, their gathered inputs and outputs, the weighted sum.
    router: Vec<f32>,
    route: Vec<(usize, f32)>,
    /// Experts guessed for this layer and for the next (one flag per expert; empty when not
    /// predicting).
    pred: Vec<bool>,
    pred_next: Vec<bool>,
    /// The experts a layer used, and a guess as a list (prediction scratch).
    used: Vec<bool>,
    guess: Vec<usize>,
    picked: Vec<(usize, f32)>,
    /// Per expert: guessed for the layer being predicted, and the guess's summed probability.
    pick: Vec<bool>,
    score: Vec<f32>,
    slots: Vec<f32>,
    ex_x: Vec<f32>,
    ex_y: Vec<f32>,
    acc: Vec<f32>,
    /// Token ids as embedding rows, and those rows' raw bytes.
    rows: Vec<u64>,
    raw: Vec<u8>,
    /// An interleaved embedding tile and its rows, for the lookup.
    tile: Vec<u8>,
    /// The KV pages of the layer attending (keys, values): kept empty between layers, only
    /// for their allocation ([`recycle`]).
    kpages: Vec<&'static [u8]>,
    vpages: Vec<&'static [u8]>,
}

/// An empty list of slices of another lifetime in the same allocation (collecting in place
/// reuses it), so that a layer's page list costs no allocation once warm.
#[expect(
    clippy::unnecessary_filter_map,
    reason = "it changes the element's lifetime, which filter cannot"
)]
fn recycle<'b>(mut v: Vec<&[u8]>) -> Vec<&'b [u8]> {
    v.clear();
    v.into_iter().filter_map(|_| None).collect()
}

impl Context {
    pub(crate) fn new(
        c: &ModelConfig,
        n_ctx: usize,
        pool: Arc<ThreadPool>,
        kv: &KvOptions,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            kv: KvCache::new(c.n_layer, n_ctx, c.kv_dim(), c.head_dim, kv)?,
            pool,
            scratch: Scratch::default(),
            n_ubatch: 512,
        })
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

    /// Computes the next passes on `pool` instead (llama.cpp's `--threads-batch`: one pool for
    /// reading a prompt, another for decoding). The scratch buffers do not depend on it.
    pub fn set_pool(&mut self, pool: Arc<ThreadPool>) {
        self.pool = pool;
    }

    /// Bytes the cached positions take, wherever they are.
    pub fn kv_bytes(&self) -> usize {
        self.kv.size_bytes()
    }

    /// Bytes of KV pages held in RAM.
    pub fn kv_ram_bytes(&self) -> usize {
        self.kv.ram_bytes()
    }

    /// The KV cache's SSD tier, when it has one.
    pub fn kv_spill_stats(&self) -> Option<SpillStats> {
        self.kv.spill_stats()
    }

    /// Writes the whole cache to its SSD tier and gives the RAM back (an idle sequence);
    /// it is read again when next used. Does nothing without a spill directory.
    pub fn kv_spill_all(&mut self) -> Result<(), EngineError> {
        self.kv.spill_all()
    }

    /// Makes this context hold the first `n` positions of `other`'s cache (a shared prompt
    /// prefix) without recomputing them: full pages are shared, not copied.
    pub fn share_prefix(&mut self, other: &Context, n: usize) -> Result<(), EngineError> {
        self.kv.share_prefix(&other.kv, n)
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
        let Context {
            kv,
            pool,
            scratch,
            n_ubatch,
        } = ctx;
        let mut logits = std::mem::take(&mut scratch.logits);
        logits.resize(want.len() * c.n_vocab, 0.0);
        let mut start = 0;
        while start < n {
            let end = (start + *n_ubatch).min(n);
            let mut slot = [Slot {
                kv: &mut *kv,
                pos0: pos0 + start,
                row0: 0,
                n: end - start,
            }];
            self.run_layers(pool, scratch, &tokens[start..end], &mut slot)?;
            kv.set_len(pos0 + end)?;
            let (lo, hi) = (want.start.max(start), want.end.min(end));
            if lo < hi {
                let out = &mut logits[(lo - want.start) * c.n_vocab..(hi - want.start) * c.n_vocab];
                self.output_logits(pool, scratch, lo - start..hi - start, out)?;
            }
            start = end;
        }
        scratch.logits = logits;
        Ok(&ctx.scratch.logits)
    }

    /// One decode step for several sequences at once (continuous batching): `tokens[i]` is
    /// appended to `ctxs[i]`, every weight matrix is read once for all of them, and the result
    /// holds one row of `n_vocab` logits per sequence, in order. Attention still runs per
    /// sequence, over each one's own KV cache.
    pub fn decode_batch<'s>(
        &self,
        pool: &ThreadPool,
        ctxs: &mut [&mut Context],
        tokens: &[u32],
        scratch: &'s mut Scratch,
    ) -> Result<&'s [f32], EngineError> {
        let c = &self.config;
        if ctxs.len() != tokens.len() || tokens.is_empty() {
            return Err(EngineError::Invalid(format!(
                "decode_batch needs one token per sequence, got {} tokens for {} sequences",
                tokens.len(),
                ctxs.len()
            )));
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(EngineError::BadToken {
                id,
                n_vocab: c.n_vocab,
            });
        }
        if let Some(full) = ctxs.iter().find(|x| x.kv.len() >= x.kv.n_ctx()) {
            return Err(EngineError::ContextFull {
                needed: full.kv.len() + 1,
                n_ctx: full.kv.n_ctx(),
            });
        }
        let mut slots: Vec<Slot<'_>> = ctxs
            .iter_mut()
            .enumerate()
            .map(|(i, x)| {
                let pos0 = x.kv.len();
                Slot {
                    kv: &mut x.kv,
                    pos0,
                    row0: i,
                    n: 1,
                }
            })
            .collect();
        self.run_layers(pool, scratch, tokens, &mut slots)?;
        let mut spilled = Ok(());
        for s in slots {
            // Every length moves on; a failed write to disk only leaves pages in RAM.
            let r = s.kv.set_len(s.pos0 + 1);
            spilled = spilled.and(r);
        }
        spilled?;
        let n = tokens.len();
        let mut logits = std::mem::take(&mut scratch.logits);
        logits.resize(n * c.n_vocab, 0.0);
        let r = self.output_logits(pool, scratch, 0..n, &mut logits);
        scratch.logits = logits;
        r?;
        Ok(&scratch.logits)
    }

    /// One pass of `tokens` through all layers, row `i` of the batch belonging to the slot that
    /// covers it; leaves the final hidden states in `scratch.buf.x`.
    fn run_layers(
        &self,
        pool: &ThreadPool,
        scratch: &mut Scratch,
        tokens: &[u32],
        slots: &mut [Slot<'_>],
    ) -> Result<(), EngineError> {
        let c = &self.config;
        let n = tokens.len();
        let (e, qd, kvd, ff, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.head_dim);
        let Scratch { buf, mm, cs, .. } = scratch;
        cs.resize(c.n_rot / 2, (0.0, 0.0));
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

        // Token embeddings: only their rows are read.
        let row_bytes = self.token_embd.ty.row_bytes(e);
        buf.raw.resize(n * row_bytes, 0);
        if self.token_embd.layout == Layout::Interleaved {
            self.embedding_rows_interleaved(tokens, buf)?;
        } else {
            buf.rows.clear();
            buf.rows.extend(tokens.iter().map(|&t| u64::from(t)));
            self.weights
                .read_rows(self.token_embd.id, &buf.rows, &mut buf.raw)?;
        }
        let scale = (e as f32).sqrt();
        for (t, src) in buf.raw.chunks_exact(row_bytes).enumerate() {
            let dst = &mut buf.x[t * e..(t + 1) * e];
            dequantize_row(self.token_embd.ty, src, dst)
                .map_err(|err| EngineError::Invalid(err.to_string()))?;
            if c.traits.embed_scale {
                dst.iter_mut().for_each(|v| *v *= scale);
            }
        }

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
                // Per head, or (OLMoE) over each row's whole projection.
                buf.q
                    .chunks_exact_mut(qn.len())
                    .for_each(|h| rms_norm_inplace(h, qn, c.rms_eps));
                buf.k
                    .chunks_exact_mut(kn.len())
                    .for_each(|h| rms_norm_inplace(h, kn, c.rms_eps));
            }
            let rope = if layer.swa {
                &self.rope_swa
            } else {
                &self.rope_global
            };
            let params = AttnParams {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim: hd,
                scale: c.attn_scale,
                window: if layer.swa { c.sliding_window } else { None },
                softcap: None,
            };
            for slot in slots.iter_mut() {
                let rows = slot.row0..slot.row0 + slot.n;
                for (t, row) in rows.clone().enumerate() {
                    rope.angles(slot.pos0 + t, cs);
                    rope.apply(&mut buf.q[row * qd..(row + 1) * qd], hd, cs);
                    rope.apply(&mut buf.k[row * kvd..(row + 1) * kvd], hd, cs);
                }
                let (kr, qr) = (
                    rows.start * kvd..rows.end * kvd,
                    rows.start * qd..rows.end * qd,
                );
                slot.kv
                    .store(il, slot.pos0, &buf.k[kr.clone()], &buf.v[kr])?;
                slot.kv.prepare(il)?;
                let mut kpages = recycle(std::mem::take(&mut buf.kpages));
                let mut vpages = recycle(std::mem::take(&mut buf.vpages));
                slot.kv
                    .view(il, slot.pos0 + slot.n, &mut kpages, &mut vpages);
                attention_paged(
                    pool,
                    &params,
                    &buf.q[qr.clone()],
                    slot.n,
                    slot.pos0,
                    &slot.kv.pages(0, &kpages),
                    &slot.kv.pages(1, &vpages),
                    &mut buf.att[qr],
                );
                buf.kpages = recycle(kpages);
                buf.vpages = recycle(vpages);
            }
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
            self.predict_experts(pool, mm, buf, il, n)?;
            match &layer.ffn {
                Ffn::Dense { gate, up, down } => {
                    self.matmul(pool, mm, *gate, &buf.xb, n, &mut buf.g)?;
                    self.matmul(pool, mm, *up, &buf.xb, n, &mut buf.u)?;
                    self.activate(&mut buf.g[..n * gate.rows], &buf.u[..n * gate.rows]);
                    self.matmul(pool, mm, *down, &buf.g, n, &mut buf.xb)?;
                }
                Ffn::Moe(moe) => {
                    self.moe(pool, mm, buf, moe, n)?;
                    self.learn_prior(buf, il);
                }
            }
            // The guess made for the next layer is scored when it runs.
            std::mem::swap(&mut buf.pred, &mut buf.pred_next);
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

    /// Final norm and the output projection for batch rows `rows`, written to `out`.
    fn output_logits(
        &self,
        pool: &ThreadPool,
        scratch: &mut Scratch,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        let c = &self.config;
        let e = c.n_embd;
        let m = rows.len();
        let Scratch { buf, mm, .. } = scratch;
        for (i, t) in rows.enumerate() {
            rms_norm(
                &buf.x[t * e..(t + 1) * e],
                &self.output_norm,
                c.rms_eps,
                &mut buf.xb[i * e..(i + 1) * e],
            );
        }
        self.matmul(pool, mm, self.output, &buf.xb[..m * e], m, out)
    }

    /// Cross-layer expert prediction: when the next layers' experts stream from disk, apply
    /// the routers of the next [`lookahead`] MoE layers to this layer's FFN input (`buf.xb`;
    /// the residual stream changes little from layer to layer) and read their likely experts
    /// (top-k plus a margin, `STRATA_EXPERT_MARGIN`, default 0) while this layer computes,
    /// the next layer's first and the likeliest first. The next layer's guess is kept in
    /// `buf.pred` and scored against the real routing when that layer runs.
    fn predict_experts(
        &self,
        pool: &ThreadPool,
        mm: &mut MatmulScratch,
        buf: &mut Buffers,
        il: usize,
        n: usize,
    ) -> Result<(), EngineError> {
        buf.pred_next.clear();
        let Some(mc) = self.config.moe else {
            return Ok(());
        };
        let ne = mc.n_expert;
        // The MoE calls made so far, and the recorded routing when replaying.
        let (calls, log) = {
            let c = self.experts.lock().unwrap_or_else(|p| p.into_inner());
            match &c.mode {
                ExpertPrefetch::Off => return Ok(()),
                ExpertPrefetch::Replay(log) => (c.calls, Some(Arc::clone(log))),
                _ => (c.calls, None),
            }
        };
        let is_moe = matches!(self.layers.get(il).map(|l| &l.ffn), Some(Ffn::Moe(_)));
        let mut ahead = 0;
        for (d, layer) in self.layers.iter().enumerate().skip(il + 1) {
            let Ffn::Moe(next) = &layer.ffn else {
                continue;
            };
            ahead += 1;
            if ahead > lookahead() {
                break;
            }
            if !self.weights.experts_streamed(next.gate.mat.id) {
                continue;
            }
            buf.pick.clear();
            buf.pick.resize(ne, false);
            buf.score.clear();
            buf.score.resize(ne, 0.0);
            match &log {
                // The MoE call of layer `d` is `ahead` calls after this layer's (or, when
                // this layer is dense, after the last one).
                Some(log) => {
                    let call = calls + ahead - usize::from(!is_moe);
                    for &x in log.get(call).map(Vec::as_slice).unwrap_or(&[]) {
                        if x < ne {
                            buf.pick[x] = true;
                        }
                    }
                }
                None => {
                    buf.router.resize(n * ne, 0.0);
                    self.matmul(pool, mm, next.router, &buf.xb, n, &mut buf.router)?;
                    softmax_rows(&mut buf.router[..n * ne], ne);
                    // Blended with the layer's activation-frequency prior:
                    // (1 − λ)·p(router) + λ·π(layer).
                    let lambda = prior_weight();
                    if lambda > 0.0 {
                        let c = self.experts.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(f) = c.prior.get(d).filter(|f| f.len() == ne) {
                            let total: f32 = f.iter().sum();
                            if total > 0.0 {
                                for row in buf.router[..n * ne].chunks_exact_mut(ne) {
                                    row.iter_mut().zip(f).for_each(|(p, &v)| {
                                        *p = (1.0 - lambda) * *p + lambda * v / total
                                    });
                                }
                            }
                        }
                    }
                    let k = (mc.n_expert_used + prefetch_margin()).min(ne);
                    // `route` takes logits: the logarithm keeps the order.
                    buf.router[..n * ne]
                        .iter_mut()
                        .for_each(|p| *p = p.max(f32::MIN_POSITIVE).ln());
                    route(&mut buf.router, &mut buf.route, n, ne, k, false);
                    // Ranked by probability summed over the batch's tokens.
                    for &(ex, w) in &buf.route {
                        buf.pick[ex] = true;
                        buf.score[ex] += w;
                    }
                }
            }
            if d == il + 1 {
                buf.pred_next.clone_from(&buf.pick);
            }
            // The likeliest first: read first, and the last to be dropped when the routing
            // comes before they are read.
            buf.guess.clear();
            buf.guess.extend((0..ne).filter(|&x| buf.pick[x]));
            let score = &buf.score;
            buf.guess
                .sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
            let ids = [next.gate.mat.id, next.up.mat.id, next.down.mat.id];
            self.weights.prefetch_experts(&ids, &buf.guess)?;
        }
        Ok(())
    }

    /// Adds this layer's routing (in `buf.route`) to its activation-frequency prior, decayed
    /// per call so that it follows the text. Only while predicting.
    fn learn_prior(&self, buf: &Buffers, il: usize) {
        let Some(mc) = self.config.moe else { return };
        if !self.weights.experts_streamed_any() {
            return;
        }
        let mut c = self.experts.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(c.mode, ExpertPrefetch::Predict) {
            return;
        }
        if c.prior.len() <= il {
            c.prior.resize_with(il + 1, Vec::new);
        }
        let f = &mut c.prior[il];
        f.resize(mc.n_expert, 0.0);
        f.iter_mut().for_each(|v| *v *= PRIOR_DECAY);
        for &(ex, _) in &buf.route {
            if let Some(v) = f.get_mut(ex) {
                *v += 1.0;
            }
        }
    }

    /// Precision and recall of the last guess against the routing in `buf.route`; counts the
    /// MoE call and records its experts when recording.
    fn score_prediction(&self, buf: &mut Buffers, ne: usize) {
        let used = &mut buf.used;
        used.clear();
        used.resize(ne, false);
        buf.route.iter().for_each(|&(ex, _)| used[ex] = true);
        {
            let mut c = self.experts.lock().unwrap_or_else(|p| p.into_inner());
            c.calls += 1;
            if matches!(c.mode, ExpertPrefetch::Record) {
                c.log.push((0..ne).filter(|&x| used[x]).collect());
            }
        }
        if buf.pred.len() != ne {
            return;
        }
        let guessed = buf.pred.iter().filter(|&&p| p).count() as u64;
        let actual = used.iter().filter(|&&u| u).count() as u64;
        let right = (0..ne).filter(|&x| used[x] && buf.pred[x]).count() as u64;
        let p = &self.prediction;
        p.guessed
            .fetch_add(guessed, std::sync::atomic::Ordering::Relaxed);
        p.actual
            .fetch_add(actual, std::sync::atomic::Ordering::Relaxed);
        p.right
            .fetch_add(right, std::sync::atomic::Ordering::Relaxed);
    }

    /// `g = act(g) * up`, the gated activation of every FFN.
    fn activate(&self, g: &mut [f32], u: &[f32]) {
        match self.config.traits.act {
            Activation::Silu => silu_mul(g, u),
            Activation::GeluTanh => gelu_tanh_mul(g, u),
        }
    }

    /// The mixture-of-experts FFN on `buf.xb` (normed input, `n` rows), result in `buf.xb`:
    /// each token goes to its top-k experts by router softmax; each expert runs once on the
    /// tokens routed to it; outputs are summed with the routing weights (renormalised over the
    /// chosen experts where the architecture does), plus the gated shared expert if any.
    fn moe(
        &self,
        pool: &ThreadPool,
        mm: &mut MatmulScratch,
        buf: &mut Buffers,
        moe: &Moe,
        n: usize,
    ) -> Result<(), EngineError> {
        let c = &self.config;
        let e = c.n_embd;
        let Some(mc) = c.moe else {
            return Err(EngineError::Invalid("MoE layer in a dense model".into()));
        };
        let (ne, k, nff) = (mc.n_expert, mc.n_expert_used, mc.n_ff_exp);
        buf.router.resize(n * ne, 0.0);
        self.matmul(pool, mm, moe.router, &buf.xb, n, &mut buf.router)?;
        route(&mut buf.router, &mut buf.route, n, ne, k, mc.norm_topk);
        self.score_prediction(buf, ne);
        // The experts this call uses, in the order they are computed: where they stream, those
        // held first, so that they compute while the rest are read.
        buf.guess.clear();
        buf.guess
            .extend((0..ne.min(moe.gate.n_expert)).filter(|&x| buf.used[x]));
        let ids = [moe.gate.mat.id, moe.up.mat.id, moe.down.mat.id];
        if self.weights.experts_streamed(moe.gate.mat.id) {
            self.weights.experts_held_first(&ids, &mut buf.guess);
            // The cache learns the routing before the experts are asked for: it keeps those
            // it holds and reads the rest in the order they will run.
            self.weights.route_experts(&ids, &buf.guess)?;
        }
        // Each (token, slot)'s weighted expert output, summed per token in slot order below,
        // so that the result does not depend on the order the experts ran in.
        buf.slots.clear();
        buf.slots.resize(n * k * e, 0.0);
        for gi in 0..buf.guess.len() {
            let ex = buf.guess[gi];
            buf.picked.clear();
            buf.picked.extend(
                buf.route
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.0 == ex)
                    .map(|(i, r)| (i, r.1)),
            );
            let m = buf.picked.len();
            if m == 0 {
                continue;
            }
            buf.ex_x.resize(m * e, 0.0);
            for (i, &(s, _)) in buf.picked.iter().enumerate() {
                let t = s / k;
                buf.ex_x[i * e..(i + 1) * e].copy_from_slice(&buf.xb[t * e..(t + 1) * e]);
            }
            buf.g.resize(m * nff, 0.0);
            buf.u.resize(m * nff, 0.0);
            // One expert's three matrices, from the expert cache when experts stream.
            let slab = |x: &Experts| -> Result<_, EngineError> {
                Ok((self.weights.expert_slab(x.mat.id, ex)?, x.mat))
            };
            let (hg, hu, hd) = (slab(&moe.gate)?, slab(&moe.up)?, slab(&moe.down)?);
            fn mat_ref(h: &(TensorHandle, Mat)) -> MatRef<'_> {
                MatRef {
                    ty: h.1.ty,
                    data: h.0.bytes(),
                    rows: h.1.rows,
                    cols: h.1.cols,
                    // Interleaved when the experts are resident (a streamed slab never is).
                    layout: h.1.layout,
                }
            }
            matmul(pool, mat_ref(&hg), &buf.ex_x, m, &mut buf.g[..m * nff], mm)?;
            matmul(pool, mat_ref(&hu), &buf.ex_x, m, &mut buf.u[..m * nff], mm)?;
            self.activate(&mut buf.g[..m * nff], &buf.u[..m * nff]);
            buf.ex_y.resize(m * e, 0.0);
            matmul(pool, mat_ref(&hd), &buf.g[..m * nff], m, &mut buf.ex_y, mm)?;
            for (i, &(s, w)) in buf.picked.iter().enumerate() {
                buf.slots[s * e..(s + 1) * e]
                    .iter_mut()
                    .zip(&buf.ex_y[i * e..(i + 1) * e])
                    .for_each(|(a, y)| *a = w * y);
            }
        }
        buf.acc.clear();
        buf.acc.resize(n * e, 0.0);
        for (s, y) in buf.slots.chunks_exact(e).enumerate() {
            let t = s / k;
            buf.acc[t * e..(t + 1) * e]
                .iter_mut()
                .zip(y)
                .for_each(|(a, y)| *a += y);
        }
        if let Some((gate, up, down, gate_inp)) = &moe.shared {
            let sf = gate.rows;
            buf.g.resize(n * sf, 0.0);
            buf.u.resize(n * sf, 0.0);
            self.matmul(pool, mm, *gate, &buf.xb, n, &mut buf.g)?;
            self.matmul(pool, mm, *up, &buf.xb, n, &mut buf.u)?;
            self.activate(&mut buf.g[..n * sf], &buf.u[..n * sf]);
            buf.ex_y.resize(n * e, 0.0);
            self.matmul(pool, mm, *down, &buf.g, n, &mut buf.ex_y)?;
            for t in 0..n {
                let x = &buf.xb[t * e..(t + 1) * e];
                let z: f32 = x.iter().zip(gate_inp).map(|(a, b)| a * b).sum();
                let s = 1.0 / (1.0 + (-z).exp());
                buf.acc[t * e..(t + 1) * e]
                    .iter_mut()
                    .zip(&buf.ex_y[t * e..(t + 1) * e])
                    .for_each(|(a, y)| *a += s * y);
            }
        }
        buf.xb[..n * e].copy_from_slice(&buf.acc);
        Ok(())
    }

    /// The embedding rows of `tokens` into `buf.raw` from an interleaved table: each token's
    /// whole tile is read and taken apart (rows past the last tile are row-major).
    fn embedding_rows_interleaved(
        &self,
        tokens: &[u32],
        buf: &mut Buffers,
    ) -> Result<(), EngineError> {
        let m = self.token_embd;
        let row_bytes = m.ty.row_bytes(m.cols);
        let tiles = m.rows / INTERLEAVE_ROWS;
        buf.tile.resize(2 * INTERLEAVE_ROWS * row_bytes, 0);
        let (tile, rows) = buf.tile.split_at_mut(INTERLEAVE_ROWS * row_bytes);
        for (i, &t) in tokens.iter().enumerate() {
            let t = t as usize;
            let dst = &mut buf.raw[i * row_bytes..(i + 1) * row_bytes];
            buf.rows.clear();
            if t / INTERLEAVE_ROWS < tiles {
                let first = (t / INTERLEAVE_ROWS * INTERLEAVE_ROWS) as u64;
                buf.rows.extend(first..first + INTERLEAVE_ROWS as u64);
                self.weights.read_rows(m.id, &buf.rows, tile)?;
                deinterleave_tile(m.ty, tile, m.cols, rows)?;
                let r = t % INTERLEAVE_ROWS;
                dst.copy_from_slice(&rows[r * row_bytes..(r + 1) * row_bytes]);
            } else {
                buf.rows.push(t as u64);
                self.weights.read_rows(m.id, &buf.rows, dst)?;
            }
        }
        Ok(())
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
        let x = &x[..n * m.cols];
        let out = &mut out[..n * m.rows];
        let parts = self.weights.parts(m.id)?;
        if parts == 1 {
            let h = self.weights.acquire(m.id)?;
            let w = MatRef {
                ty: m.ty,
                data: h.bytes(),
                rows: m.rows,
                cols: m.cols,
                layout: m.layout,
            };
            matmul(pool, w, x, n, out, mm)?;
            return Ok(());
        }
        // A matrix streamed in row ranges (larger than a streaming buffer): each part gives
        // its rows of every token's output.
        let mut tmp = Vec::new();
        for part in 0..parts {
            let (h, rows) = self.weights.acquire_part(m.id, part)?;
            let (r0, r1) = (rows.start as usize, rows.end as usize);
            let w = MatRef {
                ty: m.ty,
                data: h.bytes(),
                rows: r1 - r0,
                cols: m.cols,
                layout: Layout::Rows,
            };
            if n == 1 {
                matmul(pool, w, x, 1, &mut out[r0..r1], mm)?;
            } else {
                tmp.resize(n * (r1 - r0), 0.0);
                matmul(pool, w, x, n, &mut tmp, mm)?;
                for (t, row) in tmp.chunks_exact(r1 - r0).enumerate() {
                    out[t * m.rows + r0..t * m.rows + r1].copy_from_slice(row);
                }
            }
        }
        Ok(())
    }
}

/// Top-`k` routing: for each of `n` rows of `ne` router logits, the softmax's `k` largest
/// entries as `(expert, weight)`, renormalised to sum to 1 when `norm`. Writes `n * k` pairs.
pub(crate) fn route(
    logits: &mut [f32],
    out: &mut Vec<(usize, f32)>,
    n: usize,
    ne: usize,
    k: usize,
    norm: bool,
) {
    out.clear();
    softmax_rows(&mut logits[..n * ne], ne);
    for row in logits.chunks_exact_mut(ne).take(n) {
        let start = out.len();
        for _ in 0..k {
            // Highest probability not yet taken; ties go to the lower expert id.
            let best = (0..ne)
                .filter(|i| !out[start..].iter().any(|p| p.0 == *i))
                .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                .unwrap_or(0);
            out.push((best, row[best]));
        }
        if norm {
            let s: f32 = out[start..].iter().map(|p| p.1).sum();
            if s > 0.0 {
                out[start..].iter_mut().for_each(|p| p.1 /= s);
            }
        }
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

#[cfg(test)]
mod moe_tests;

/// Extra experts guessed per token beyond the `k` the router will pick (`STRATA_EXPERT_MARGIN`,
/// default 0): more guesses raise recall but spend disk bandwidth on wrong ones.
fn prefetch_margin() -> usize {
    static MARGIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MARGIN.get_or_init(|| env_parse("STRATA_EXPERT_MARGIN").unwrap_or(0).min(64))
}

/// The value of environment variable `name`, when it parses.
fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Per-call decay of the activation-frequency prior (a half-life of about 14 calls).
const PRIOR_DECAY: f32 = 0.95;

/// λ, the weight of the activation-frequency prior in a guess (`STRATA_EXPERT_PRIOR`, 0 to 1).
fn prior_weight() -> f32 {
    static W: std::sync::OnceLock<f32> = std::sync::OnceLock::new();
    *W.get_or_init(|| {
        env_parse("STRATA_EXPERT_PRIOR")
            .unwrap_or(0.2f32)
            .clamp(0.0, 1.0)
    })
}

/// Softmax of each row of `ne` values, in place.
fn softmax_rows(x: &mut [f32], ne: usize) {
    for row in x.chunks_exact_mut(ne) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        row.iter_mut().for_each(|v| *v /= sum);
    }
}

/// MoE layers ahead whose experts are guessed and read (`STRATA_EXPERT_LOOKAHEAD`, default 2,
/// 1 to 8): further guesses are less often right but give the disk more time.
fn lookahead() -> usize {
    static AHEAD: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *AHEAD.get_or_init(|| {
        env_parse("STRATA_EXPERT_LOOKAHEAD")
            .unwrap_or(2)
            .clamp(1, 8)
    })
}
