//! The CPU executor: each phase of a layer on the SIMD kernels of `strata-simd`, over
//! activations in host memory, weights reached through storage's residency API (resident,
//! streamed by layer or by row range, or experts from the expert cache).

mod moe;
#[cfg(test)]
mod moe_tests;
pub(crate) mod repack;

use std::ops::Range;

use strata_simd::matmul::{
    INTERLEAVE_ROWS, Layout, MatRef, MatmulScratch, SHARED_MAX_TOKENS, deinterleave_tile, matmul,
    matmul_shared,
};
use strata_simd::ops::{
    AttnParams, attention::attention_paged, gelu_tanh_mul, rms_norm, rms_norm_inplace, silu_mul,
};
use strata_simd::pool::ThreadPool;
use strata_storage::quant::dequantize_row;
use strata_storage::residency::TensorHandle;

use super::{Act, Pass, Slot};
use crate::error::EngineError;
use crate::model::predict::Guesses;
use crate::model::{Activation, Ffn, Mat, Model};

/// The CPU's activations and scratch, kept between passes so that a decode step allocates
/// nothing once warm.
#[derive(Default)]
pub(crate) struct CpuExec {
    b: Buffers,
    mm: MatmulScratch,
    /// RoPE's (cos, sin) of one position.
    cs: Vec<(f32, f32)>,
    guesses: Guesses,
    moe: moe::MoeBuffers,
}

/// The named activations ([`Act`]) and the phases' intermediates, one row per token.
#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    /// A normed copy of `x`, and a phase's output before the residual.
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    /// The gated FFN's two projections.
    g: Vec<f32>,
    u: Vec<f32>,
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

impl CpuExec {
    pub(super) fn begin(&mut self, p: &Pass<'_>) {
        let c = &p.model.config;
        let (n, e, qd, kvd, ff) = (p.n, c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        self.cs.resize(c.n_rot / 2, (0.0, 0.0));
        let b = &mut self.b;
        for (buf, len) in [
            (&mut b.x, e),
            (&mut b.xb, e),
            (&mut b.q, qd),
            (&mut b.k, kvd),
            (&mut b.v, kvd),
            (&mut b.att, qd),
            (&mut b.g, ff),
            (&mut b.u, ff),
        ] {
            buf.resize(n * len, 0.0);
        }
    }

    fn act(&mut self, act: Act) -> &mut Vec<f32> {
        let b = &mut self.b;
        match act {
            Act::X => &mut b.x,
            Act::Q => &mut b.q,
            Act::K => &mut b.k,
            Act::V => &mut b.v,
            Act::Att => &mut b.att,
        }
    }

    pub(super) fn read(&self, act: Act, dst: &mut [f32]) {
        let b = &self.b;
        let src = match act {
            Act::X => &b.x,
            Act::Q => &b.q,
            Act::K => &b.k,
            Act::V => &b.v,
            Act::Att => &b.att,
        };
        dst.copy_from_slice(&src[..dst.len()]);
    }

    pub(super) fn write(&mut self, act: Act, src: &[f32]) {
        self.act(act)[..src.len()].copy_from_slice(src);
    }

    /// Token embeddings into `x`: only their rows are read.
    pub(super) fn embed(&mut self, p: &Pass<'_>, tokens: &[u32]) -> Result<(), EngineError> {
        let m = p.model;
        let (c, b) = (&m.config, &mut self.b);
        let e = c.n_embd;
        let emb = m.token_embd;
        let row_bytes = emb.ty.row_bytes(e);
        b.raw.resize(tokens.len() * row_bytes, 0);
        if m.cpu.layout(emb.id) == Layout::Interleaved {
            embedding_rows_interleaved(m, tokens, b)?;
        } else {
            b.rows.clear();
            b.rows.extend(tokens.iter().map(|&t| u64::from(t)));
            m.weights.read_rows(emb.id, &b.rows, &mut b.raw)?;
        }
        let scale = (e as f32).sqrt();
        for (t, src) in b.raw.chunks_exact(row_bytes).enumerate() {
            let dst = &mut b.x[t * e..(t + 1) * e];
            dequantize_row(emb.ty, src, dst)
                .map_err(|err| EngineError::Invalid(err.to_string()))?;
            if c.traits.embed_scale {
                dst.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Ok(())
    }

    /// Attention input: RMSNorm of `x`, the Q/K/V projections, their biases and QK-norm.
    pub(super) fn attn_input(&mut self, p: &Pass<'_>, il: usize) -> Result<(), EngineError> {
        let (c, layer) = (&p.model.config, &p.model.layers[il]);
        let (n, e, qd, kvd) = (p.n, c.n_embd, c.q_dim(), c.kv_dim());
        let (b, mm) = (&mut self.b, &mut self.mm);
        norm_rows(
            p.pool,
            &b.x[..n * e],
            &layer.attn_norm,
            c.rms_eps,
            &mut b.xb[..n * e],
        );
        mat_mul_shared(
            p,
            mm,
            &[layer.q, layer.k, layer.v],
            &b.xb,
            n,
            [&mut b.q, &mut b.k, &mut b.v],
        )?;
        for (out, bias, d) in [
            (&mut b.q, &layer.q_bias, qd),
            (&mut b.k, &layer.k_bias, kvd),
            (&mut b.v, &layer.v_bias, kvd),
        ] {
            if let Some(bias) = bias {
                for row in out.chunks_exact_mut(d) {
                    row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
                }
            }
        }
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            // Per head, or (OLMoE) over each row's whole projection.
            for (buf, w) in [(&mut b.q, qn), (&mut b.k, kn)] {
                p.pool.for_rows(buf, w.len(), PARALLEL_ELEMS, |_, rows| {
                    rows.chunks_exact_mut(w.len())
                        .for_each(|h| rms_norm_inplace(h, w, c.rms_eps))
                });
            }
        }
        Ok(())
    }

    /// Attention: RoPE on `q` and `k`, `k` and `v` stored in each slot's KV cache, and each
    /// slot's queries attending over its cache into `att`.
    pub(super) fn attend(
        &mut self,
        p: &Pass<'_>,
        il: usize,
        slots: &mut [Slot<'_>],
    ) -> Result<(), EngineError> {
        let m = p.model;
        let (c, layer) = (&m.config, &m.layers[il]);
        let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let (b, cs) = (&mut self.b, &mut self.cs);
        let rope = if layer.swa {
            &m.rope_swa
        } else {
            &m.rope_global
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
            if slot.n == 1 {
                // Decode: no pool round trip, and the angles' buffer is kept from step to step.
                rope.angles(slot.pos0, cs);
                rope.apply(&mut b.q[rows.start * qd..rows.end * qd], hd, cs);
                rope.apply(&mut b.k[rows.start * kvd..rows.end * kvd], hd, cs);
            } else {
                let (pos0, n_cs) = (slot.pos0, cs.len());
                p.pool.for_rows2(
                    &mut b.q[rows.start * qd..rows.end * qd],
                    qd,
                    &mut b.k[rows.start * kvd..rows.end * kvd],
                    kvd,
                    0,
                    |t0, q, k| {
                        // A prompt's pass: one small buffer per thread is nothing beside it.
                        let mut cs = vec![(0.0, 0.0); n_cs];
                        for (t, (q, k)) in q
                            .chunks_exact_mut(qd)
                            .zip(k.chunks_exact_mut(kvd))
                            .enumerate()
                        {
                            rope.angles(pos0 + t0 + t, &mut cs);
                            rope.apply(q, hd, &cs);
                            rope.apply(k, hd, &cs);
                        }
                    },
                );
            }
            let (kr, qr) = (
                rows.start * kvd..rows.end * kvd,
                rows.start * qd..rows.end * qd,
            );
            slot.kv.store(il, slot.pos0, &b.k[kr.clone()], &b.v[kr])?;
            slot.kv.prepare(il)?;
            let mut kpages = recycle(std::mem::take(&mut b.kpages));
            let mut vpages = recycle(std::mem::take(&mut b.vpages));
            slot.kv
                .view(il, slot.pos0 + slot.n, &mut kpages, &mut vpages);
            attention_paged(
                p.pool,
                &params,
                &b.q[qr.clone()],
                slot.n,
                slot.pos0,
                &slot.kv.pages(0, &kpages),
                &slot.kv.pages(1, &vpages),
                &mut b.att[qr],
            );
            b.kpages = recycle(kpages);
            b.vpages = recycle(vpages);
        }
        Ok(())
    }

    /// Output and FFN: the output projection of `att` added to `x` (after the post-attention
    /// norm where the architecture has one), then the FFN (dense, or the mixture of experts
    /// with the prediction of the next layers' experts) on the normed `x`, added likewise.
    pub(super) fn ffn(&mut self, p: &Pass<'_>, il: usize) -> Result<(), EngineError> {
        let m = p.model;
        let (c, layer) = (&m.config, &m.layers[il]);
        let (n, e) = (p.n, c.n_embd);
        {
            let (b, mm) = (&mut self.b, &mut self.mm);
            mat_mul(p, mm, layer.o, &b.att, n, &mut b.xb)?;
            residual(
                p.pool,
                &mut b.x[..n * e],
                &mut b.xb[..n * e],
                layer.post_attn_norm.as_deref(),
                e,
                c.rms_eps,
            );
            norm_rows(
                p.pool,
                &b.x[..n * e],
                &layer.ffn_norm,
                c.rms_eps,
                &mut b.xb[..n * e],
            );
            m.predict_experts(&mut self.guesses, il, n, |router, out| {
                mat_mul(p, mm, router, &b.xb, n, out)
            })?;
        }
        match &layer.ffn {
            Ffn::Dense { gate, up, down } => {
                let (b, mm) = (&mut self.b, &mut self.mm);
                // A MoE layer before may have left them shorter.
                b.g.resize(n * gate.rows, 0.0);
                b.u.resize(n * gate.rows, 0.0);
                mat_mul_shared(p, mm, &[*gate, *up], &b.xb, n, [&mut b.g, &mut b.u])?;
                activate(
                    p.pool,
                    m,
                    &mut b.g[..n * gate.rows],
                    &b.u[..n * gate.rows],
                    gate.rows,
                );
                mat_mul(p, mm, *down, &b.g, n, &mut b.xb)?;
            }
            Ffn::Moe(moe) => self.moe(p, il, moe)?,
        }
        self.guesses.next_layer();
        let b = &mut self.b;
        residual(
            p.pool,
            &mut b.x[..n * e],
            &mut b.xb[..n * e],
            layer.post_ffn_norm.as_deref(),
            e,
            c.rms_eps,
        );
        Ok(())
    }

    /// Final norm and the output projection for batch rows `rows`, written to `out`.
    pub(super) fn head(
        &mut self,
        p: &Pass<'_>,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        let m = p.model;
        let (c, b) = (&m.config, &mut self.b);
        let e = c.n_embd;
        let n = rows.len();
        for (i, t) in rows.enumerate() {
            rms_norm(
                &b.x[t * e..(t + 1) * e],
                &m.output_norm,
                c.rms_eps,
                &mut b.xb[i * e..(i + 1) * e],
            );
        }
        mat_mul(p, &mut self.mm, m.output, &b.xb[..n * e], n, out)
    }
}

/// From this many elements on, a pass's element-wise steps (norms, RoPE, activations,
/// residuals) are spread over the pool: a prompt's, not a decode step's (waking the pool
/// costs more than a few thousand elements take).
const PARALLEL_ELEMS: usize = 1 << 15;

/// `out = rms_norm(x) · w`, row by row (rows of `w.len()`).
fn norm_rows(pool: &ThreadPool, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let e = w.len();
    pool.for_rows(out, e, PARALLEL_ELEMS, |r0, out| {
        for (i, o) in out.chunks_exact_mut(e).enumerate() {
            rms_norm(&x[(r0 + i) * e..(r0 + i + 1) * e], w, eps, o);
        }
    });
}

/// `g = act(g) * up`, the gated activation of every FFN (rows of `width`: one per token).
fn activate(pool: &ThreadPool, m: &Model, g: &mut [f32], u: &[f32], width: usize) {
    pool.for_rows(g, width, PARALLEL_ELEMS, |r0, g| {
        let u = &u[r0 * width..r0 * width + g.len()];
        match m.config.traits.act {
            Activation::Silu => silu_mul(g, u),
            Activation::GeluTanh => gelu_tanh_mul(g, u),
        }
    });
}

/// `x += norm(y)` (or `x += y` without a post-norm), row by row.
fn residual(
    pool: &ThreadPool,
    x: &mut [f32],
    y: &mut [f32],
    post_norm: Option<&[f32]>,
    e: usize,
    eps: f32,
) {
    pool.for_rows2(x, e, y, e, PARALLEL_ELEMS, |_, x, y| {
        for (xr, yr) in x.chunks_exact_mut(e).zip(y.chunks_exact_mut(e)) {
            if let Some(w) = post_norm {
                rms_norm_inplace(yr, w, eps);
            }
            xr.iter_mut().zip(yr.iter()).for_each(|(a, b)| *a += b);
        }
    });
}

/// The embedding rows of `tokens` into `b.raw` from an interleaved table: each token's whole
/// tile is read and taken apart (rows past the last tile are row-major).
fn embedding_rows_interleaved(
    model: &Model,
    tokens: &[u32],
    b: &mut Buffers,
) -> Result<(), EngineError> {
    let m = model.token_embd;
    let row_bytes = m.ty.row_bytes(m.cols);
    let tiles = m.rows / INTERLEAVE_ROWS;
    b.tile.resize(2 * INTERLEAVE_ROWS * row_bytes, 0);
    let (tile, rows) = b.tile.split_at_mut(INTERLEAVE_ROWS * row_bytes);
    for (i, &t) in tokens.iter().enumerate() {
        let t = t as usize;
        let dst = &mut b.raw[i * row_bytes..(i + 1) * row_bytes];
        b.rows.clear();
        if t / INTERLEAVE_ROWS < tiles {
            let first = (t / INTERLEAVE_ROWS * INTERLEAVE_ROWS) as u64;
            b.rows.extend(first..first + INTERLEAVE_ROWS as u64);
            model.weights.read_rows(m.id, &b.rows, tile)?;
            deinterleave_tile(m.ty, tile, m.cols, rows)?;
            let r = t % INTERLEAVE_ROWS;
            dst.copy_from_slice(&rows[r * row_bytes..(r + 1) * row_bytes]);
        } else {
            b.rows.push(t as u64);
            model.weights.read_rows(m.id, &b.rows, dst)?;
        }
    }
    Ok(())
}

/// `outs[i] = ms[i] · x` for `n` rows of `x`: matrices that read the same input (a layer's Q,
/// K and V; its gate and up projections), in one pass of the pool when each is held whole
/// (`strata_simd::matmul::matmul_shared`: one barrier instead of one per matrix in a decode
/// step, the same bits), else one [`mat_mul`] after another.
fn mat_mul_shared<const N: usize>(
    p: &Pass<'_>,
    mm: &mut MatmulScratch,
    ms: &[Mat; N],
    x: &[f32],
    n: usize,
    outs: [&mut Vec<f32>; N],
) -> Result<(), EngineError> {
    let weights = &p.model.weights;
    let mut whole = true;
    for m in ms {
        whole &= weights.parts(m.id)? == 1 && m.cols == ms[0].cols;
    }
    if !whole || n > SHARED_MAX_TOKENS {
        for (m, out) in ms.iter().zip(outs) {
            mat_mul(p, mm, *m, x, n, out)?;
        }
        return Ok(());
    }
    // Arrays, not vectors: a decode step allocates nothing once warm.
    let mut handles: [Option<TensorHandle>; N] = [const { None }; N];
    for (h, m) in handles.iter_mut().zip(ms) {
        *h = Some(weights.acquire(m.id)?);
    }
    let ws: [MatRef<'_>; N] = std::array::from_fn(|i| MatRef {
        ty: ms[i].ty,
        data: handles[i].as_ref().map_or(&[][..], |h| h.bytes()),
        rows: ms[i].rows,
        cols: ms[i].cols,
        layout: handles[i]
            .as_ref()
            .map_or(Layout::Rows, |h| p.model.cpu.layout_of(ms[i].id, h)),
    });
    let mut i = 0;
    let mut outs: [&mut [f32]; N] = outs.map(|o| {
        let rows = ms[i].rows;
        i += 1;
        &mut o[..n * rows]
    });
    matmul_shared(p.pool, &ws, &x[..n * ms[0].cols], n, &mut outs, mm)?;
    Ok(())
}

/// `out = m · x` for `n` rows of `x`, with `m`'s bytes held while it computes: whole, or (a
/// matrix streamed in row ranges, larger than a streaming buffer) part by part, each part
/// giving its rows of every token's output.
fn mat_mul(
    p: &Pass<'_>,
    mm: &mut MatmulScratch,
    m: Mat,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), EngineError> {
    let weights = &p.model.weights;
    let x = &x[..n * m.cols];
    let out = &mut out[..n * m.rows];
    let parts = weights.parts(m.id)?;
    if parts == 1 {
        let h = weights.acquire(m.id)?;
        let w = MatRef {
            ty: m.ty,
            data: h.bytes(),
            rows: m.rows,
            cols: m.cols,
            layout: p.model.cpu.layout_of(m.id, &h),
        };
        matmul(p.pool, w, x, n, out, mm)?;
        return Ok(());
    }
    let mut tmp = Vec::new();
    for part in 0..parts {
        let (h, rows) = weights.acquire_part(m.id, part)?;
        let (r0, r1) = (rows.start as usize, rows.end as usize);
        // Parts are streamed, so never repacked.
        let w = MatRef {
            ty: m.ty,
            data: h.bytes(),
            rows: r1 - r0,
            cols: m.cols,
            layout: Layout::Rows,
        };
        if n == 1 {
            matmul(p.pool, w, x, 1, &mut out[r0..r1], mm)?;
        } else {
            tmp.resize(n * (r1 - r0), 0.0);
            matmul(p.pool, w, x, n, &mut tmp, mm)?;
            for (t, row) in tmp.chunks_exact(r1 - r0).enumerate() {
                out[t * m.rows + r0..t * m.rows + r1].copy_from_slice(row);
            }
        }
    }
    Ok(())
}
